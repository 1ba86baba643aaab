#!/usr/bin/env python3
"""Summarize runs of scripts/smollm2_compare.sh: one markdown row per case and side.

    scripts/smollm2_table.py OUT_DIR CASE...

For each CASE it reads OUT_DIR/CASE-ours-sSEED/metrics.jsonl (ours) and OUT_DIR/CASE-peft-sSEED.json
(scripts/peft_train.py), over every seed found, and prints the held-out exact match of each seed
after the last step, their mean and sample standard deviation, the held-out loss before the first
step and after the last (means over seeds), and seconds per epoch (the optimizer steps' wall time,
evaluation left out; a mean over seeds). Runs still going (no evaluation after the first) are
left out. Standard library only.
"""

import glob
import json
import os
import re
import statistics
import sys


def ours(path):
    evals, seconds, epochs = [], 0.0, 0.0
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["kind"] == "eval":
                evals.append(row)
            elif row["kind"] == "train":
                seconds += row["seconds"]
                epochs = max(epochs, row["epoch"])
    # A resumed or re-run directory may repeat the evaluation at step 0: keep one per step.
    by_step = {e["step"]: e for e in evals}
    if len(by_step) < 2:
        return None  # still running, or stopped before its last evaluation
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    return first["loss"], last["loss"], last["exact_match"], seconds / max(epochs, 1e-9)


def peft(path):
    with open(path) as f:
        record = json.load(f)
    evals = sorted(record["evals"], key=lambda e: e["step"])
    per_epoch = statistics.mean(record["epoch_seconds"]) if record["epoch_seconds"] else float("nan")
    return evals[0]["loss"], evals[-1]["loss"], evals[-1]["exact_match"], per_epoch


def row(case, side, runs):
    if not runs:
        return None
    seeds = sorted(runs)
    matches = [100 * runs[s][2] for s in seeds]
    sd = statistics.stdev(matches) if len(matches) > 1 else 0.0
    start = statistics.mean(runs[s][0] for s in seeds)
    end = statistics.mean(runs[s][1] for s in seeds)
    seconds = statistics.mean(runs[s][3] for s in seeds)
    return (
        f"| {case} | {side} | {', '.join(map(str, seeds))} | "
        + " / ".join(f"{m:.1f}" for m in matches)
        + f" | **{statistics.mean(matches):.1f} ± {sd:.1f}** | {start:.2f} -> {end:.3f} | {seconds:.1f} |"
    )


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out = sys.argv[1]
    print("| case | side | seeds | exact match % per seed | mean ± sd | held-out loss before -> after | s/epoch |")
    print("|---|---|---|---|---|---|---:|")
    for case in sys.argv[2:]:
        found = {"ours": {}, "PEFT": {}}
        for path in glob.glob(os.path.join(out, f"{case}-ours-s*")):
            seed = re.fullmatch(r".*-s(\d+)", path)
            if seed and os.path.isfile(os.path.join(path, "metrics.jsonl")):
                result = ours(path)
                if result:
                    found["ours"][int(seed.group(1))] = result
        for path in glob.glob(os.path.join(out, f"{case}-peft-s*.json")):
            seed = re.fullmatch(r".*-s(\d+)\.json", path)
            if seed:
                found["PEFT"][int(seed.group(1))] = peft(path)
        for side, runs in found.items():
            line = row(case, side, runs)
            if line:
                print(line)


if __name__ == "__main__":
    main()
