"""Local text data through `datasets`: .txt (one document per file), .jsonl/.json and .parquet ('text' column)."""

from __future__ import annotations

import math
import tempfile
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
    if builder in ("text", "json"):
        for f in files:
            check_utf8_text(f)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    datasets.disable_progress_bars()
    # a private, temporary cache: datasets would otherwise copy every file into ~/.cache/huggingface/datasets and
    # keep it (and fail on a read-only HOME); the column is read into memory before the cache goes
    with tempfile.TemporaryDirectory(prefix="dotmoe-datasets-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache,
                                       **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            cause = exc.__cause__ or exc.__context__ or exc
            raise DotMoeError(f"could not read data files {', '.join(map(str, files))}: "
                              f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from exc
        if text_column not in ds.column_names:
            raise DotMoeError(f"data has no {text_column!r} column (columns: {', '.join(ds.column_names)})")
        column = ds[text_column]
        del ds
        if not all(isinstance(t, str) for t in column):
            raise DotMoeError(_non_text_error(builder, files, text_column, {**kwargs, "cache_dir": cache}))
    texts = [t for t in column if t.strip()]
    if not texts:
        raise DotMoeError(f"data files {', '.join(map(str, files))} contain no text")
    return texts


def check_utf8_text(path: Path, block: int = 1 << 24) -> None:
    """A text data file is UTF-8 without NUL bytes (read in blocks), or a one-line error with the byte offset."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while data := fh.read(block):
            nul = data.find(b"\x00")
            if nul >= 0:
                raise DotMoeError(f"data file {path} holds a NUL byte at offset {offset + nul} (a binary file?); "
                                  "data files are UTF-8 text")
            pending = decoder.getstate()[0]  # the bytes of a character cut by the previous block
            try:
                decoder.decode(data)
            except UnicodeDecodeError as exc:  # exc.start counts from the start of pending + data
                raw = (pending + data)[exc.start]
                raise DotMoeError(f"data file {path} is not UTF-8 text: byte 0x{raw:02x} at offset "
                                  f"{offset - len(pending) + exc.start} ({exc.reason}); re-encode it as UTF-8") from None
            offset += len(data)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DotMoeError(f"data file {path} is not UTF-8 text: it ends inside a multi-byte character") from None


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


PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces cut at whitespace (memory ~ the piece, not the file)


def _pieces(text: str, size: int = PIECE_CHARS):
    """`text` in pieces of about `size` characters, each cut just before a whitespace character, so that a
    tokenizer that attaches the space to the following word gives the same tokens as for the whole text."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        cut = cut if cut > start else start + size  # no space in the window: a hard cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def _units(texts: list[str]):
    """(piece, ends a document) for every document, long ones in pieces."""
    for text in texts:
        pieces = list(_pieces(text)) if len(text) > PIECE_CHARS else [text]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def tokenize_stream(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """One id stream: every document followed by EOS (if the tokenizer has one); at most `max_tokens` (tokenizing
    stops there). A fast tokenizer holds hundreds of bytes per character of one call's input, so documents are
    tokenized in batches of about PIECE_CHARS characters, a longer document in pieces (`_pieces`), and the ids
    are kept as int64 tensors: memory follows the tokens, not the size of the largest file."""
    chunks: list[torch.Tensor] = []
    count, eos = 0, tokenizer.eos_token_id
    batch: list[tuple[str, bool]] = []

    def flush() -> None:
        nonlocal count
        ids: list[int] = []
        for enc, (_, ends) in zip(tokenizer([p for p, _ in batch], add_special_tokens=False)["input_ids"], batch):
            ids.extend(enc)
            if ends and eos is not None:
                ids.append(eos)
        chunks.append(torch.tensor(ids, dtype=torch.long))
        count += len(ids)
        batch.clear()

    chars = 0
    for unit in _units(texts):
        batch.append(unit)
        chars += len(unit[0])
        if chars >= PIECE_CHARS:
            flush()
            chars = 0
            if max_tokens is not None and count >= max_tokens:
                break
    if batch:
        flush()
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def pack_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut an id stream into [num_seqs, seq_len] rows (the tail shorter than seq_len is dropped)."""
    n = len(ids) // seq_len
    if n == 0:
        raise DotMoeError(f"data too short: {len(ids)} tokens, need at least seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def batch_order(cfg, num_seqs: int) -> torch.Tensor:
    """The order in which a training run (joint DOT-MoE or pruning + distillation) takes its `num_seqs` packed
    sequences: fresh permutations from seed + 2, enough of them for every step."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    epochs = math.ceil(cfg.steps * cfg.batch_size * cfg.grad_accum / num_seqs) + 1
    return torch.cat([torch.randperm(num_seqs, generator=gen) for _ in range(epochs)])
