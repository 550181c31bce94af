"""Shared fixtures: tiny random gated-FFN models saved as real HF directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from dotmoe_dev.tiny_models import save_tiny_gemma3, save_tiny_llama, write_tiny_text  # noqa: F401


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    return write_tiny_text(tmp_path_factory.mktemp("data") / "train.txt")


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI in process; assert exit code 2, no traceback and exactly one `dotmoe:` line on stderr (the rest
    of stderr is transformers' own loading progress); return that line."""
    from dotmoe.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dotmoe:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, (code, err[-2000:])
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): compare before and after to prove nothing was touched."""
    path = Path(path)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def tiny_convert_argv(config_dir: Path, model: Path, data: Path, out: Path, **settings) -> list[str]:
    """`dotmoe convert` argv for a few-second conversion of a tiny model (settings go through a YAML config)."""
    values = dict(experts=4, top_k=2, tokens=12 * 4 * 32, seq_len=32, batch_size=4, seed=5, checkpoint_every=2,
                  eval_tokens=256, calib_tokens=256, export_format="none")
    values.update(settings)
    import hashlib

    config = Path(config_dir) / f"convert-{hashlib.sha1(repr(sorted(values.items())).encode()).hexdigest()[:12]}.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return ["convert", "--config", str(config), "--model", str(model), "--data", str(data), "--eval-data", str(data),
            "--out", str(out)]


@pytest.fixture(scope="session")
def joint_reference(tiny_llama_dir, tiny_text, tmp_path_factory):
    """(convert argv without --out, output) of an uninterrupted 20-step conversion, checkpoint every 5 steps: what
    every killed, interrupted or failed run of the same argv must resume to."""
    from dotmoe.cli import main

    tmp = tmp_path_factory.mktemp("joint_reference")
    argv = tiny_convert_argv(tmp, tiny_llama_dir, tiny_text, tmp / "full", tokens=20 * 4 * 32, seed=7,
                             checkpoint_every=5)[:-2]
    assert main(argv + ["--out", str(tmp / "full")]) == 0
    return argv, tmp / "full"


@pytest.fixture
def layer_inputs_seen(monkeypatch) -> list:
    """The (FFN inputs, FFN outputs) each layer-wise `train_layer` call receives, in call order."""
    import dotmoe.layerwise as lw

    seen = []
    original = lw.train_layer

    def spy(cfg, mlp, x, y, caps, seed):
        seen.append((x.clone(), y.clone()))
        return original(cfg, mlp, x, y, caps, seed)

    monkeypatch.setattr(lw, "train_layer", spy)
    return seen


@pytest.fixture(autouse=True)
def _own_dense_ppl_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty dense-perplexity cache of its own (never the user's), outside its tmp_path."""
    monkeypatch.setenv("DOTMOE_PPL_CACHE", str(tmp_path_factory.mktemp("ppl_cache") / "dense_ppl.json"))


@pytest.fixture
def interrupt_training(monkeypatch):
    """`interrupt_training(n)`: the n-th training forward from now raises KeyboardInterrupt (a crash mid-step);
    `interrupt_training(None)` puts the real forward back."""
    from dotmoe.train import MoeTrainingModule

    original = MoeTrainingModule.forward

    def arm(n: int | None) -> None:
        if n is None:
            monkeypatch.setattr(MoeTrainingModule, "forward", original)
            return
        calls = {"n": 0}

        def dying_forward(self, input_ids, tau, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return original(self, input_ids, tau, **kwargs)

        monkeypatch.setattr(MoeTrainingModule, "forward", dying_forward)

    return arm


@pytest.fixture
def refit_calls(monkeypatch) -> list[bool]:
    """Spy on the recipe's refit_moe_down (before training and at the end): the list gets each call's keep_teacher
    flag, the refit still runs."""
    import dotmoe.joint_finish as finish
    import dotmoe.joint_setup as setup

    calls: list[bool] = []
    original = setup.refit_moe_down
    for module in (setup, finish):
        monkeypatch.setattr(module, "refit_moe_down",
                            lambda *a, **kw: calls.append(kw.get("keep_teacher", True)) or original(*a, **kw))
    return calls
