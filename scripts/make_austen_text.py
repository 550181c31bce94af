"""Build the bundled second general-English training text (`src/dotmoe/assets/data/austen_train.txt`).

Source: Jane Austen's six completed novels (1811-1818; the texts are in the public domain) as the Debian package
`r-cran-janeaustenr` 1.0.0-1 ships them (Debian main, MIT licence for the packaging; upstream: the CRAN package
janeaustenr by Julia Silge, the Project Gutenberg texts one line per printed line). The package stores them in R's
lazy-load database (`data/Rdata.rdx` index + `data/Rdata.rdb` zlib chunks of serialized R character vectors),
read here with the PyPI package `rdata`. Each novel's lines are joined into paragraphs (blank lines separate them),
title pages and chapter headings are dropped and `_emphasis_` markers removed. Training text only: no Wikipedia
or Python-docs split shares a line with it, and nothing is held out from it (held-out text stays the Wikipedia
validation / test splits). Reproduce:

    apt-get download r-cran-janeaustenr=1.0.0-1
    pip install rdata==1.1.0
    python scripts/make_austen_text.py --deb r-cran-janeaustenr_1.0.0-1_all.deb

(the output is deterministic: 6 novels, 10,475 paragraphs, 4,160,425 characters).
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import struct
import subprocess
import tarfile
import warnings
import zlib
from pathlib import Path

DATA = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
OUT = Path(__file__).resolve().parents[1] / "src" / "dotmoe" / "assets" / "data" / "austen_train.txt"
HEADING = re.compile(r"^(chapter|volume|vol\.)\s+[\divxlc]+\.?$|^(the )?end$|^finis$", re.IGNORECASE)


def read_lazy_load_db(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """{variable: its character vector} of an R lazy-load database (the format of `R CMD INSTALL`'s data/)."""
    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():  # "Unknown file type: assumed RDS": right, a chunk is a bare serialization
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset): int(offset) + int(length)]
        size = struct.unpack(">I", chunk[:4])[0]  # each chunk: big-endian uncompressed size, then zlib data
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"{name}: chunk of {len(raw)} bytes, index says {size}")
        out[str(name)] = [str(x) for x in parse(raw)]
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """The novel's prose paragraphs: wrapped lines joined, headings and the title page (before the first chapter)
    dropped, `_emphasis_` markers removed."""
    blocks, current = [], []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(re.sub(r"\s+", " ", " ".join(current)))
            current = []
    first = next(i for i, b in enumerate(blocks) if HEADING.match(b))
    kept = [re.sub(r"_([^_]+)_", r"\1", b) for b in blocks[first:] if not HEADING.match(b)]
    return [b for b in kept if re.search(r"[A-Za-z]", b)]  # not the "* * * * *" section breaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", required=True, help="r-cran-janeaustenr_1.0.0-1_all.deb (apt-get download)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", args.deb], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        rdx, rdb = (archive.extractfile(DATA + ext).read() for ext in (".rdx", ".rdb"))
    novels = read_lazy_load_db(rdx, rdb)
    docs = [paragraphs(novels[name]) for name in NOVELS]
    text = "\n\n".join("\n".join(doc) for doc in docs) + "\n"
    Path(args.out).write_text(text)
    print(f"{args.out}: {len(docs)} novels, {sum(map(len, docs)):,} paragraphs, {len(text):,} characters")


if __name__ == "__main__":
    main()
