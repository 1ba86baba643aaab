#!/usr/bin/env python3
"""Loads an adapter directory written by peft-burn in PEFT, and compares PEFT's logits with
`peft forward --adapter` on the same random batch (real tokens; PEFT's virtual positions dropped).

    cargo run --example prompt_tuning_init -- --model fixtures/models/qwen2-gqa-tied --text "Hi" --output /tmp/p
    cargo build --bin peft
    .venv/bin/python scripts/check_adapter_in_peft.py --model fixtures/models/qwen2-gqa-tied --adapter /tmp/p
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--peft", default=str(ROOT / "target/debug/peft"), help="the peft binary")
    args = p.parse_args()

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    n = logits.shape[1] - ids.shape[1]
    theirs = logits[:, n:]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in.json").write_text(json.dumps({"input_ids": ids.tolist()}))
        run = subprocess.run([args.peft, "forward", "--model", args.model, "--adapter", args.adapter,
                              "--input", str(tmp / "in.json"), "--output", str(tmp / "out.safetensors")],
                             capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"peft forward failed:\n{run.stderr}")
        ours = load_file(tmp / "out.safetensors")["logits"]
    diff = (ours - theirs).abs().max().item()
    print(f"PEFT loaded {args.adapter} ({type(model.base_model).__name__}, {n} virtual tokens); "
          f"max |peft-burn - PEFT| = {diff:.2e}")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
