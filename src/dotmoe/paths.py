"""Locate the bundled reference model and data (the default for every command)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATA_SPLITS = ("train_sample", "validation", "test")


def reference_model_dir() -> Path:
    """Directory of the bundled dense reference LlamaForCausalLM (HF format)."""
    return ASSETS / "reference"


def reference_data_file(split: str = "validation") -> Path:
    """Bundled text split: 'train_sample' (for conversion), 'validation' or 'test'."""
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(DATA_SPLITS)}")
    return ASSETS / "data" / f"{split}.txt"


def tasks_dir() -> Path:
    """Bundled lm-eval task YAMLs (+ their local data)."""
    return ASSETS / "tasks"
