#!/usr/bin/env python3
"""Make the topic-classification task for the SmolLM2 comparisons (docs/smollm2.md).

Rows of real, ragged text: the English conversations of the PyPI package `chatterbot-corpus`
(BSD license; fetched at run time, not committed), each a question and its answer filed under a
category. The task is to name the category of a conversation:

    {"prompt": "Text: What is a neural network? A network of ...\\nTopic:", "completion": " ai"}

Ten categories, at most `--per-class` distinct conversations of each (so the big categories do
not dominate; sports has only 22), shuffled with `--seed`, a quarter of each category held out.
Texts longer than `--max-words` words are cut there. With the defaults this gives 229 training rows
(17-24 per category) and 74 held-out rows (5-8 per category) of 11-84 tokens (prompt + completion +
EOS; median 24 and 26): the shape `peft train` is measured on.

    pip install --no-deps chatterbot-corpus==1.3.3   # in scripts/requirements-smollm2.txt
    python scripts/make_smollm2_topics.py --output models/smollm2-topics

The base model has not seen the format, so strict exact match (the category's word, then EOS)
starts near 0; the categories overlap (ai/psychology, trivia/science), so no method reaches 100%.
"""

import argparse
import importlib.metadata
import json
import random
import re
import sys
import zipfile
from pathlib import Path

CATEGORIES = [
    "ai",
    "coding",
    "emotion",
    "humor",
    "literature",
    "money",
    "psychology",
    "science",
    "sports",
    "trivia",
]


def corpus_files(wheel):
    """The English YAML files, from an installed chatterbot-corpus or a downloaded wheel."""
    if wheel:
        archive = zipfile.ZipFile(wheel)
        return {
            Path(name).stem: archive.read(name).decode("utf-8")
            for name in archive.namelist()
            if "/data/english/" in name and name.endswith(".yml")
        }
    try:
        dist = importlib.metadata.distribution("chatterbot-corpus")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3, or pass --wheel")
    return {
        Path(str(f)).stem: Path(dist.locate_file(f)).read_text(encoding="utf-8")
        for f in dist.files or []
        if "/data/english/" in str(f) and str(f).endswith(".yml")
    }


def conversations(text):
    import yaml

    data = yaml.safe_load(text)
    for conv in data.get("conversations", []):
        parts = [str(p).strip() for p in conv if p is not None]
        if parts:
            yield " ".join(parts)


def clean(text, max_words):
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split(" ")
    return " ".join(words[:max_words])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--wheel", help="a downloaded chatterbot_corpus wheel (instead of the installed package)")
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--max-words", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = corpus_files(args.wheel)
    rng = random.Random(args.seed)
    train, held_out = [], []
    for category in CATEGORIES:
        texts = sorted({clean(t, args.max_words) for t in conversations(files[category])})
        texts = [t for t in texts if len(t.split()) >= 3]
        rng.shuffle(texts)
        texts = texts[: args.per_class]
        cut = len(texts) - len(texts) // 4
        for i, text in enumerate(texts):
            row = {"prompt": f"Text: {text}\nTopic:", "completion": f" {category}"}
            (train if i < cut else held_out).append(row)
    rng.shuffle(train)
    rng.shuffle(held_out)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(f"{out}: {len(train)} training rows, {len(held_out)} held-out rows", file=sys.stderr)


if __name__ == "__main__":
    main()
