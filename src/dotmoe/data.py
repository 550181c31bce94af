"""Local text data through `datasets`: .txt (one document per file), .jsonl/.json and .parquet ('text' column)."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_texts(paths: list[str | Path], text_column: str = "text") -> list[str]:
    """The documents of local files, in memory (small texts; a run reads its data lazily through `TextFiles`)."""
    return list(TextFiles(paths, text_column).documents())


class TextFiles:
    """Local data files (never from a hub), checked when constructed and read lazily afterwards: a .txt file is one
    document, streamed from disk in pieces; .jsonl/.json/.parquet rows are streamed through `datasets`. Memory
    does not grow with the size of the files, only with what a reader keeps of them."""

    def __init__(self, paths: list[str | Path], text_column: str = "text"):
        if not paths:
            raise DotMoeError("no data files given")
        self.files, self.text_column = [Path(p) for p in paths], text_column
        for f in self.files:
            if not f.exists():
                raise DotMoeError(f"data file not found: {f}")
            if not f.is_file():
                raise DotMoeError(f"data file {f} is not a regular file")
            if f.suffix not in _BUILDERS:
                raise DotMoeError(f"unsupported data file {f} (use .txt, .jsonl, .json or .parquet)")
        builders = {_BUILDERS[f.suffix] for f in self.files}
        if len(builders) > 1:
            raise DotMoeError("mix of data file types; pass files of one type")
        self.builder = builders.pop()
        # every check reads the files once, holding a block at a time: bad data fails before a model loads
        if self.builder == "text":
            self._with_text = [f for f in self.files if check_utf8_text(f)]
        else:
            if self.builder == "json":
                for f in self.files:
                    check_utf8_text(f)
            # every row read (its type checked), not only up to the first with text
            self._with_text = [f for f in self.files if sum(bool(t.strip()) for t in self._rows(f))]
        if not self._with_text:
            raise DotMoeError(f"data files {', '.join(map(str, self.files))} contain no text")

    def _rows(self, f: Path):
        """The text column of one .jsonl/.json/.parquet file, row by row (streamed; strings checked)."""
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own report of a bad file: ours is one line
        # a private, temporary cache: datasets would otherwise keep files in ~/.cache/huggingface/datasets (and
        # fail on a read-only HOME); streaming reads the file itself, row group by row group
        with tempfile.TemporaryDirectory(prefix="dotmoe-datasets-") as cache:
            try:
                rows = iter(datasets.load_dataset(self.builder, data_files=[str(f)], split="train", streaming=True,
                                                  cache_dir=cache))
                for row, record in enumerate(rows):
                    if self.text_column not in record:
                        raise DotMoeError(f"data file {f} has no {self.text_column!r} column (columns: "
                                          f"{', '.join(record)})")
                    text = record[self.text_column]
                    if not isinstance(text, str):
                        raise DotMoeError(f"data file {f}: the {self.text_column!r} column must hold strings, row "
                                          f"{row} holds {type(text).__name__} {str(text)[:40]!r}")
                    yield text
            except DotMoeError:
                raise
            except Exception as exc:  # datasets raises many types for unreadable files
                cause = exc.__cause__ or exc.__context__ or exc
                raise DotMoeError(f"could not read data file {f}: {type(cause).__name__}: "
                                  f"{str(cause).splitlines()[0] if str(cause) else ''}") from exc

    def units(self):
        """(piece, ends a document) for every document, in file order; a long document in pieces (`_pieces`)."""
        for f in self._with_text:
            if self.builder == "text":
                yield from _file_pieces(f)
            else:
                yield from _units(t for t in self._rows(f) if t.strip())

    def documents(self):
        """Every non-blank document, whole."""
        doc: list[str] = []
        for piece, ends in self.units():
            doc.append(piece)
            if ends:
                yield "".join(doc)
                doc = []


def check_utf8_text(path: Path, block: int = 1 << 20) -> bool:
    """A text data file is UTF-8 without NUL bytes (read in blocks), or a one-line error with the byte offset;
    True when it holds more than whitespace."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_text = 0, False
    with path.open("rb") as fh:
        while data := fh.read(block):
            nul = data.find(b"\x00")
            if nul >= 0:
                raise DotMoeError(f"data file {path} holds a NUL byte at offset {offset + nul} (a binary file?); "
                                  "data files are UTF-8 text")
            pending = decoder.getstate()[0]  # the bytes of a character cut by the previous block
            try:
                text = decoder.decode(data)
                has_text = has_text or (bool(text) and not text.isspace())
            except UnicodeDecodeError as exc:  # exc.start counts from the start of pending + data
                raw = (pending + data)[exc.start]
                raise DotMoeError(f"data file {path} is not UTF-8 text: byte 0x{raw:02x} at offset "
                                  f"{offset - len(pending) + exc.start} ({exc.reason}); re-encode it as UTF-8") from None
            offset += len(data)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DotMoeError(f"data file {path} is not UTF-8 text: it ends inside a multi-byte character") from None
    return has_text


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


def _file_pieces(path: Path, size: int = PIECE_CHARS):
    """(piece, ends the document) of a text file, the pieces `_pieces` cuts from its whole text, read from disk
    a piece at a time (as datasets' text builder reads it: UTF-8, universal newlines)."""
    with path.open(encoding="utf-8") as fh:
        buf = fh.read(size + 1)
        while len(buf) > size:  # more than `size` characters left: cut as _pieces does
            cut = buf.rfind(" ", 1, size)
            cut = cut if cut > 0 else size
            yield buf[:cut], False
            buf = buf[cut:]
            buf += fh.read(size + 1 - len(buf))
        yield buf, True


def _units(texts):
    """(piece, ends a document) for every document, long ones in pieces."""
    for text in texts:
        pieces = list(_pieces(text)) if len(text) > PIECE_CHARS else [text]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def tokenize_stream(tokenizer, texts: list[str] | TextFiles, max_tokens: int | None = None) -> torch.Tensor:
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
    for unit in texts.units() if isinstance(texts, TextFiles) else _units(texts):
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


MIN_DATA_TOKENS = 1 << 25  # 33.5M tokens (268 MB of ids): every bundled text and any 1M-token run's corpus fit


def data_token_cap(cfg) -> int:
    """The most tokens of its training data a run reads: four times what it can use (training and calibration
    tokens), and at least MIN_DATA_TOKENS, so its memory and start-up time follow its budget, not the corpus."""
    layerwise = cfg.layer_steps * cfg.batch_size * cfg.seq_len if cfg.mode == "layerwise" else 0
    used = max(cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len, cfg.global_tokens, layerwise)
    return max(MIN_DATA_TOKENS, 4 * (used + cfg.calibration_tokens))


def training_sequences(tokenizer, texts: TextFiles, cfg) -> torch.Tensor:
    """The packed [num_seqs, seq_len] training sequences of `texts`: its first `data_token_cap` tokens (one
    line on stderr when the corpus holds more)."""
    cap = data_token_cap(cfg)
    ids = tokenize_stream(tokenizer, texts, cap + 1)
    if len(ids) > cap:
        print(f"dotmoe: data: reading the first {cap:,} tokens of {', '.join(map(str, texts.files))} (4x this "
              f"run's training and calibration tokens, at least {MIN_DATA_TOKENS:,}); the rest is not used",
              file=sys.stderr)
    return pack_sequences(ids[:cap], cfg.seq_len)


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
