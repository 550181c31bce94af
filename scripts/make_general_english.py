"""Build the bundled general-English text splits (`src/dotmoe/assets/data/wiki_*.txt`, `news_test.txt`).

Source: two public text files that the PyPI package `gensim` (4.4.0) ships as test data:
- `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`: 206 English Wikipedia pages (2016 dump,
  CC BY-SA), wiki markup stripped with `mwparserfromhell`;
- `lee_background.cor`: 300 ABC (Australian) news articles of 2001-2002 (the Lee corpus), one per line.

Wikipedia articles go wholly to one split by sha256(title) mod 100: 0-9 validation, 10-19 test, else train;
the news articles are held out entirely (a second domain for evaluation only). Reproduce:

    python -m pip download --no-deps gensim==4.4.0 -d /tmp/gensim
    python scripts/make_general_english.py --wheel /tmp/gensim/gensim-4.4.0-*.whl

(needs `pip install mwparserfromhell`; the output is deterministic).
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS = "gensim/test/test_data/lee_background.cor"
OUT = Path(__file__).resolve().parents[1] / "src" / "dotmoe" / "assets" / "data"
DROP_SECTIONS = ("see also", "references", "notes", "external links", "further reading", "bibliography",
                 "sources", "citations", "footnotes")


def clean_article(wikitext: str) -> str:
    """Plain prose of one article: markup stripped, reference-like sections and short fragments dropped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    paragraphs, skipping = [], False
    for section in code.get_sections(levels=None, include_lead=True, flat=True):
        headings = section.filter_headings()
        if headings:
            skipping = headings[0].title.strip_code().strip().lower() in DROP_SECTIONS
        if skipping:
            continue
        for heading in headings:
            section.remove(heading)
        text = section.strip_code(normalize=True, collapse=True)
        for para in re.split(r"\n\s*\n", text):
            para = re.sub(r"\s+", " ", para).strip()
            # list items, table debris, image captions: keep only real sentences
            if len(para) >= 120 and para.endswith((".", '"', "'", ")")) and not para.lower().startswith(("thumb|", "file:")):
                paragraphs.append(para)
    return "\n".join(paragraphs)


def wiki_articles(raw: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect page."""
    root = ET.fromstring(bz2.decompress(raw))
    ns = root.tag[: root.tag.index("}") + 1]
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = clean_article(page.findtext(f"{ns}revision/{ns}text") or "")
        if len(text) > 500:
            out.append((page.findtext(f"{ns}title"), text))
    return out


def split_of(title: str) -> str:
    bucket = int(hashlib.sha256(title.encode()).hexdigest(), 16) % 100
    return "validation" if bucket < 10 else "test" if bucket < 20 else "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", required=True, help="the gensim 4.4.0 wheel (pip download --no-deps gensim==4.4.0)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    with zipfile.ZipFile(args.wheel) as wheel:
        articles = wiki_articles(wheel.read(WIKI))
        news = [line.strip() for line in wheel.read(NEWS).decode().splitlines() if line.strip()]
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for title, text in articles:
        splits[split_of(title)].append(text)
    for name, docs in splits.items():
        # one document per blank-line-separated block; load_texts reads a .txt as one document, which is fine
        # for a token stream (each article keeps its own paragraphs)
        (out / f"wiki_{name}.txt").write_text("\n\n".join(docs) + "\n")
        print(f"wiki_{name}.txt: {len(docs)} articles, {sum(map(len, docs)):,} characters")
    (out / "news_test.txt").write_text("\n".join(news) + "\n")
    print(f"news_test.txt: {len(news)} articles, {sum(map(len, news)):,} characters")


if __name__ == "__main__":
    main()
