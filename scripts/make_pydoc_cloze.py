"""Build the bundled lm-eval cloze tasks from held-out text.

    python scripts/make_pydoc_cloze.py [--items 300]                      # pydoc_cloze: Python-docs test split
    python scripts/make_pydoc_cloze.py --task wiki_cloze --source wiki_test.txt   # general English (Wikipedia)

Each item: the first ~60% of a prose sentence from the test split as context; the choices are its true ending and
three endings of other sentences of similar length. The reference model never trained on the test split.
Seeded and deterministic; writes src/dotmoe/assets/tasks/<task>.jsonl (the YAML beside it names the file).
"""

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sentences(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    prose = [p for p in paras if len(p) > 80 and p[0].isalpha() and not p.startswith(("http", "Note"))
             and "*note" not in p and "(Contributed" not in p and not re.search(r"[{}<>=\[\]]", p)]
    out = []
    for p in prose:
        for s in re.split(r"(?<=[.!?])\s+", p):
            words = s.split()
            if 10 <= len(words) <= 30 and s.endswith("."):
                out.append(s)
    return sorted(set(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--task", default="pydoc_cloze")
    parser.add_argument("--source", default="test.txt", help="a held-out split in src/dotmoe/assets/data/")
    args = parser.parse_args()
    rng = random.Random(0)
    sents = sentences((ROOT / "src/dotmoe/assets/data" / args.source).read_text())
    rng.shuffle(sents)
    splits = []
    for s in sents:
        words = s.split()
        cut = max(5, int(len(words) * 0.6))
        splits.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    items = []
    for i, (context, ending) in enumerate(splits[: args.items]):
        n = len(ending.split())
        pool = [e for j, (_, e) in enumerate(splits) if j != i and abs(len(e.split()) - n) <= 2 and e != ending]
        distractors = rng.sample(pool, 3)
        choices = distractors + [ending]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(ending)})
    out = ROOT / f"src/dotmoe/assets/tasks/{args.task}.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"{len(items)} items from {len(sents)} held-out sentences -> {out}")


if __name__ == "__main__":
    main()
