"""Matplotlib figures (PNG) of evaluation reports: quality vs budget, per-layer error, expert load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from dotmoe.written import note_written  # noqa: E402


def ppl_vs_active(points: dict[str, list[tuple[float, float]]], dense_ppl: float, path: str | Path) -> Path:
    """points: method -> [(active FFN fraction, PPL)], one line per method, dense PPL as a reference line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in sorted(points.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(dense_ppl, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("active fraction of FFN neurons")
    ax.set_ylabel("perplexity (test split)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def recon_per_layer(errors: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """errors: method -> per-layer relative MSE of the FFN output."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, errs in sorted(errors.items()):
        ax.plot(range(len(errs)), errs, marker="o", label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative MSE ||Y_hat - Y||^2 / ||Y||^2")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def load_heatmap(load: list[list[float]], path: str | Path, title: str = "") -> Path:
    """load: [layers][experts] fraction of routed tokens per expert."""
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of routed tokens")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    note_written(path, kind="plot")  # an eval replaces its earlier plots only while nobody changed them
    return path
