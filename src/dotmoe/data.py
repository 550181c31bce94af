"""Local text data through `datasets`: .txt (one document per file), .jsonl/.json and .parquet ('text' column)."""

from __future__ import annotations

from pathlib import Path

import torch

from dotmoe.errors import DotMoeError

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_texts(paths: list[str | Path], text_column: str = "text") -> list[str]:
    """Load documents from local files (never from a hub)."""
    if not paths:
        raise DotMoeError("no data files given")
    files = [Path(p) for p in paths]
    for f in files:
        if not f.exists():
            raise DotMoeError(f"data file not found: {f}")
        if not f.is_file():
            raise DotMoeError(f"data file {f} is not a regular file")
        if f.suffix not in _BUILDERS:
            raise DotMoeError(f"unsupported data file {f} (use .txt, .jsonl, .json or .parquet)")
    builders = {_BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise DotMoeError("mix of data file types; pass files of one type")
    import datasets

    builder = builders.pop()
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DotMoeError(f"could not read data files {', '.join(map(str, files))}: {exc}") from exc
    if text_column not in ds.column_names:
        raise DotMoeError(f"data has no {text_column!r} column (columns: {', '.join(ds.column_names)})")
    column = ds[text_column]
    if not all(isinstance(t, str) for t in column):
        raise DotMoeError(_non_text_error(builder, files, text_column, kwargs))
    texts = [t for t in column if t.strip()]
    if not texts:
        raise DotMoeError(f"data files {', '.join(map(str, files))} contain no text")
    return texts


def _non_text_error(builder: str, files: list[Path], text_column: str, kwargs: dict) -> str:
    """The message for a text column holding something other than strings, naming the file and row."""
    import datasets

    for f in files:
        column = datasets.load_dataset(builder, data_files=[str(f)], split="train", **kwargs)[text_column]
        for row, t in enumerate(column):
            if not isinstance(t, str):
                return (f"data file {f}: the {text_column!r} column must hold strings, row {row} holds "
                        f"{type(t).__name__} {str(t)[:40]!r}")
    return f"data files {', '.join(map(str, files))}: the {text_column!r} column must hold strings"


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """One id stream: every document followed by EOS (if the tokenizer has one)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut an id stream into [num_seqs, seq_len] rows (the tail shorter than seq_len is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise DotMoeError(f"data too short: {len(ids)} tokens, need at least seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
