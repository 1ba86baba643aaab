#!/usr/bin/env python3
"""Loads adapter directories written by peft-burn in PEFT / transformers, and compares their logits
with `peft forward --adapter` on the same seeded batch (2 unpadded rows of 7 random tokens; real
tokens only, PEFT's virtual positions dropped). Fails if max |peft-burn - PEFT| > 1e-4.

Prompt-learning adapters (prompt tuning, P-tuning MLP / LSTM, prefix tuning with and without
projection) are loaded with `PeftModel.from_pretrained`; their adapter_config.json must load
without warnings (an unknown key makes PEFT warn "Unexpected keyword arguments ..."), and every
key in it must be a field of PEFT's config class. BitFit has no PEFT type (`"peft_type": "BITFIT"`,
our own format): the base is loaded with transformers and the biases in adapter_model.safetensors
overwrite its state dict (`load_state_dict(strict=False)`; every key must exist in the model).

One adapter directory (e.g. from the prompt-tuning example):

    cargo run --example prompt_tuning_init -- --model fixtures/models/qwen2-gqa-tied --text "Hi" --output /tmp/p
    cargo build --bin peft
    .venv/bin/python scripts/check_adapter_in_peft.py --model fixtures/models/qwen2-gqa-tied --adapter /tmp/p

Every adapter fixture: `peft export` writes it afresh into a temp dir (our writer, from our encoder
checkpoint `adapter_encoder.safetensors` where there is one), which is then checked as above; the
exported tensors are also compared with the ones PEFT saved in the fixture (`vs fixture`):

    .venv/bin/python scripts/check_adapter_in_peft.py --all
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
PROMPT_METHODS = ["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm", "prefix-tuning", "p-tuning-v2"]
PROMPT_MODELS = ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"]
BITFIT_MODELS = ["qwen2-gqa-tied", "llama-biases", "bloom-6-heads"]
BATCH, SEQ, SEED = 2, 7, 0
TOL = 1e-4


class Captured(logging.Handler):
    """Collects WARNING+ log records (transformers and PEFT log through `logging`)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def capturing(fn):
    """Runs fn(), returning (its result, every warning / log warning it raised)."""
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fn()
    finally:
        root.removeHandler(handler)
    return result, [(w.category, f"{w.category.__name__}: {w.message}") for w in caught] + \
        [(None, m) for m in handler.messages]


def split(warned):
    """(problems, noise): deprecation notices are the libraries talking to each other (PEFT 0.21.2
    reads transformers' deprecated `is_gradient_checkpointing` for any adapter), not about our files."""
    noise = {m for c, m in warned if c is not None and issubclass(c, (DeprecationWarning, FutureWarning))}
    return list(dict.fromkeys(m for _, m in warned if m not in noise)), noise


def batch(vocab):
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))
    return ids, torch.ones_like(ids)


def ours(peft_bin, model, adapter, ids, mask):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in.json").write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}))
        run = subprocess.run([peft_bin, "forward", "--model", str(model), "--adapter", str(adapter),
                              "--input", str(tmp / "in.json"), "--output", str(tmp / "out.safetensors")],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"peft forward failed:\n{run.stderr}")
        return load_file(tmp / "out.safetensors")["logits"]


def theirs_peft(model, adapter, ids, mask):
    """PEFT's logits for the real tokens, a description, the warnings raised while loading the
    config and the adapter, and the deprecation notices among them."""
    config, warned = capturing(lambda: PeftConfig.from_pretrained(str(adapter)))
    keys = json.loads((Path(adapter) / "adapter_config.json").read_text()).keys()
    unknown = sorted(set(keys) - {f.name for f in fields(type(config))})
    if unknown:
        warned.append((None, f"keys unknown to {type(config).__name__}: {unknown}"))
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model, more = capturing(lambda: PeftModel.from_pretrained(base, str(adapter)).eval())
    warned, noise = split(warned + more)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
    n = logits.shape[1] - ids.shape[1]
    what = f"{config.peft_type.value}, {n} virtual tokens"
    return logits[:, n:], what, warned, noise


def theirs_bitfit(model, adapter, ids, mask):
    """transformers' logits with the adapter's biases loaded over the base's state dict."""
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    biases = load_file(Path(adapter) / "adapter_model.safetensors")
    before = base.state_dict()
    absent = sorted(set(biases) - set(before))
    if absent:
        raise RuntimeError(f"BitFit keys not in the model: {absent}")
    result = base.load_state_dict(biases, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"unexpected keys: {result.unexpected_keys}")
    all_biases = {k for k, _ in base.named_parameters() if "bias" in k}
    left = sorted(all_biases - set(biases))
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask).logits
    what = f"BITFIT, {len(biases)}/{len(all_biases)} biases" + (f" (not in adapter: {left})" if left else "")
    return logits, what, [], set()


def check(peft_bin, model, adapter):
    """Returns (max |diff|, description, warnings, deprecation notices)."""
    peft_type = json.loads((Path(adapter) / "adapter_config.json").read_text())["peft_type"]
    ids, mask = batch(AutoConfig.from_pretrained(model).vocab_size)
    theirs = theirs_bitfit if peft_type == "BITFIT" else theirs_peft
    logits, what, warned, noise = theirs(model, adapter, ids, mask)
    mine = ours(peft_bin, model, adapter, ids, mask)
    if mine.shape != logits.shape:
        raise RuntimeError(f"shapes differ: peft-burn {tuple(mine.shape)}, PEFT {tuple(logits.shape)}")
    return (mine - logits).abs().max().item(), what, warned, noise


def vs_fixture(exported, fixture):
    """Max |diff| between the exported tensors and the fixture's (PEFT's own) ones; keys must match."""
    a, b = load_file(exported / "adapter_model.safetensors"), load_file(fixture / "adapter_model.safetensors")
    if set(a) != set(b):
        raise RuntimeError(f"exported keys {sorted(set(a) ^ set(b))} differ from the fixture's")
    for k in a:
        if a[k].shape != b[k].shape:
            raise RuntimeError(f"{k}: exported {tuple(a[k].shape)}, fixture {tuple(b[k].shape)}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_all(peft_bin):
    cases = [(m, meth) for m in PROMPT_MODELS for meth in PROMPT_METHODS] + [(m, "bitfit") for m in BITFIT_MODELS]
    failures, warned_cases, all_noise = [], [], set()
    print(f"{'model':18} {'method':14} {'max |diff|':>10} {'vs fixture':>10}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, method in cases:
            model, fixture = FIXTURES / "models" / model_name, FIXTURES / "adapters" / model_name / method
            out = Path(tmp) / f"{model_name}-{method}"
            try:
                run = subprocess.run([peft_bin, "export", "--model", str(model), "--adapter", str(fixture),
                                      "--output", str(out)], capture_output=True, text=True)
                if run.returncode != 0:
                    raise RuntimeError(f"peft export failed:\n{run.stderr}")
                diff, what, warned, noise = check(peft_bin, model, out)
                all_noise |= noise
                fix = vs_fixture(out, fixture)
            except Exception as exc:  # one line per case, whatever broke
                failures.append(f"{model_name}/{method}")
                print(f"{model_name:18} {method:14} {'-':>10} {'-':>10}  ERROR {exc}")
                continue
            ok = diff <= TOL and fix <= TOL and not warned
            if not ok:
                failures.append(f"{model_name}/{method}")
            if warned:
                warned_cases.append(f"{model_name}/{method}")
            print(f"{model_name:18} {method:14} {diff:10.2e} {fix:10.2e}  {'ok' if ok else 'FAIL'}  ({what})")
            for w in warned:
                print(f"    warning: {w}")
    print(f"\n{len(cases) - len(failures)}/{len(cases)} passed (tolerance {TOL:g})"
          + (f"; failed: {', '.join(failures)}" if failures else "")
          + (f"; warnings in: {', '.join(warned_cases)}" if warned_cases else "; no PEFT warnings"))
    for m in sorted(all_noise):
        print(f"(ignored, not about the adapter files: {m})")
    return not failures


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--all", action="store_true", help="export every adapter fixture and check each")
    p.add_argument("--peft", default=str(ROOT / "target/debug/peft"), help="the peft binary")
    args = p.parse_args()
    if not Path(args.peft).is_file():
        sys.exit(f"{args.peft} not found: cargo build --bin peft")
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()

    if args.all:
        sys.exit(0 if run_all(args.peft) else 1)
    if not (args.model and args.adapter):
        p.error("--model and --adapter (or --all) are required")
    diff, what, warned, noise = check(args.peft, args.model, args.adapter)
    for w in warned:
        print(f"warning: {w}")
    for m in sorted(noise):
        print(f"(ignored, not about the adapter files: {m})")
    print(f"loaded {args.adapter} ({what}); max |peft-burn - PEFT| = {diff:.2e}")
    sys.exit(0 if diff <= TOL and not warned else 1)


if __name__ == "__main__":
    main()
