#!/usr/bin/env python3
"""Make the two-digit addition task for the SmolLM2 demo, and score the base model.

Rows are JSONL ``{"prompt": "23 + 48 = ", "completion": "71"}`` with both
operands in 10..99. Sampling is seeded (``--seed``, default 0). Train and eval
share no operand pair, not even with the operands swapped (a + b and b + a
count as the same pair).

    python scripts/make_smollm2_task.py --output models/smollm2-task \
        --model models/smollm2-135m

After writing train.jsonl / eval.jsonl the script measures the base model's
greedy accuracy on the eval rows with the project's exact-match protocol:
the prompt is tokenized with add_special_tokens=True, generation is greedy for
at most len(tokenize(completion, add_special_tokens=False)) + 1 new tokens,
and a row is a hit when the generated ids start with completion ids +
[eos_token_id]. A looser score (decoded text, stripped, starts with the
completion) is reported too. Results go to base_eval.json in the output dir.
Use --no-eval to only write the data.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_rows(n_train: int, n_eval: int, seed: int):
    # Unordered pairs {a, b}, 10 <= a <= b <= 99: 4095 of them.
    pairs = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    if n_train + n_eval > len(pairs):
        sys.exit(f"at most {len(pairs)} rows in total")
    rng = random.Random(seed)
    chosen = rng.sample(pairs, n_train + n_eval)
    rows = []
    for a, b in chosen:
        if rng.random() < 0.5:
            a, b = b, a
        rows.append({"prompt": f"{a} + {b} = ", "completion": str(a + b)})
    return rows[:n_train], rows[n_train:]


def write_jsonl(path: Path, rows):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def evaluate(model_dir: Path, rows, max_seconds: float):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    strict = loose = n = 0
    samples = []
    t0 = time.time()
    with torch.no_grad():
        for r in rows:
            if time.time() - t0 > max_seconds:
                print(f"time budget reached after {n} rows; scoring that subset")
                break
            p_ids = tok(r["prompt"], add_special_tokens=True).input_ids
            c_ids = tok(r["completion"], add_special_tokens=False).input_ids
            inp = torch.tensor([p_ids])
            out = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=len(c_ids) + 1,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            gen = out[0, len(p_ids):].tolist()
            target = c_ids + [eos]
            hit = gen[: len(target)] == target
            text = tok.decode(gen, skip_special_tokens=True)
            lhit = text.strip().startswith(r["completion"])
            strict += hit
            loose += lhit
            n += 1
            if len(samples) < 10:
                samples.append(
                    {
                        "prompt": r["prompt"],
                        "completion": r["completion"],
                        "generated_ids": gen,
                        "generated_text": tok.decode(gen, skip_special_tokens=False),
                    }
                )
    return {
        "model": str(model_dir),
        "rows": n,
        "eos_token_id": eos,
        "exact_match": strict,
        "exact_match_rate": strict / n if n else 0.0,
        "loose_match": loose,
        "loose_match_rate": loose / n if n else 0.0,
        "seconds": round(time.time() - t0, 1),
        "samples": samples,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(REPO_ROOT / "models" / "smollm2-task"))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(REPO_ROOT / "models" / "smollm2-135m"),
                    help="converted model dir (scripts/convert_smollm2.py)")
    ap.add_argument("--no-eval", action="store_true", help="only write the data")
    ap.add_argument("--max-seconds", type=float, default=480.0,
                    help="stop scoring after this long and report the subset")
    args = ap.parse_args()

    train, ev = make_rows(args.train, args.eval, args.seed)
    key = lambda r: tuple(sorted(int(x) for x in r["prompt"].split(" ")[0:3:2]))
    assert not ({key(r) for r in train} & {key(r) for r in ev})

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", ev)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} rows), {out / 'eval.jsonl'} ({len(ev)} rows)")
    print(f"first train row: {json.dumps(train[0])}")

    if args.no_eval:
        return
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir} has no config.json: run scripts/convert_smollm2.py first (or pass --no-eval)")
    res = evaluate(model_dir, ev, args.max_seconds)
    (out / "base_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    for s in res["samples"][:5]:
        print(f"  {s['prompt']!r} -> {s['generated_text']!r} (want {s['completion']!r}) ids={s['generated_ids']}")
    print(
        f"base model on {res['rows']} eval rows: exact-match (ids start with completion+[eos={res['eos_token_id']}]) "
        f"{res['exact_match']}/{res['rows']} = {res['exact_match_rate']:.3f}; "
        f"loose (text starts with completion) {res['loose_match']}/{res['rows']} = {res['loose_match_rate']:.3f} "
        f"[{res['seconds']}s]"
    )


if __name__ == "__main__":
    main()
