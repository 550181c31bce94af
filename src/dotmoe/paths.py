"""Locate the bundled reference model and data (the default for every command)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DATA_SPLITS = ("train_sample", "validation", "test", "wiki_train", "wiki_validation", "wiki_test", "news_test",
               "austen_train")
# which bundled split a command reads when no data is given: Python-docs text for the bundled reference model (its
# training domain), general English (Wikipedia; scripts/make_general_english.py) for any other model
_DEFAULT_SPLITS = {"train": ("train_sample", "wiki_train"), "validation": ("validation", "wiki_validation"),
                   "test": ("test", "wiki_test")}


def reference_model_dir() -> Path:
    """Directory of the bundled dense reference LlamaForCausalLM (HF format)."""
    return ASSETS / "reference"


def reference_data_file(split: str = "validation") -> Path:
    """Bundled text split: 'train_sample' (for conversion), 'validation' or 'test' (Python docs, the reference
    model's domain); 'wiki_train', 'wiki_validation', 'wiki_test' (general English: Wikipedia articles),
    'news_test' (held-out news articles) or 'austen_train' (more general-English training text: Jane Austen's
    novels, scripts/make_austen_text.py)."""
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(DATA_SPLITS)}")
    return ASSETS / "data" / f"{split}.txt"


def tasks_dir() -> Path:
    """Bundled lm-eval task YAMLs (+ their local data)."""
    return ASSETS / "tasks"


def default_data_file(role: str, model: str | Path | None) -> Path:
    """The bundled split a command uses for `role` ('train', 'validation' or 'test') when given no data: the
    Python-docs split for the bundled reference model, the general-English one for any other model."""
    reference = not model or Path(model).resolve() == reference_model_dir().resolve()
    return reference_data_file(_DEFAULT_SPLITS[role][0 if reference else 1])
