#!/usr/bin/env python3
"""Parameter counts PEFT reports for the real model configs in fixtures/configs/, with 10 virtual tokens.

    .venv/bin/python scripts/check_info_oracle.py        # rewrites fixtures/configs/oracle.json

For each config the model is built on the meta device (no weights are allocated, nothing is
downloaded) and each method applied with PEFT; the line printed is PEFT's own
`print_trainable_parameters()`, captured. BitFit has no PEFT type: it is counted the same way by
hand (everything frozen, then every parameter whose name contains "bias" unfrozen; tied weights
counted once, as `named_parameters` does). `base` is the base model's total, tied counted once.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

PINNED = {"peft": "0.21.2", "torch": "2.15.0", "transformers": "5.23.0"}
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "fixtures" / "configs"
NAMES = ["qwen2.5-0.5b", "qwen2.5-1.5b", "bloomz-560m", "bloom-1b4-zh",
         # Issue 20: the configs as their model cards publish them.
         "qwen3-0.6b", "qwen3-4b", "llama-3.2-1b", "llama-3.1-8b", "mistral-7b-v0.3"]
VIRTUAL = 10

# From the design notes (trainable parameters, 10 virtual tokens), to compare against.
TABLE = {
    "qwen2.5-0.5b": {"base": 494_032_768, "prompt-tuning": 8_960, "p-tuning-mlp": 2_895_488,
                     "p-tuning-lstm": 46_968_448, "p-tuning-v2": 61_440, "prefix-tuning": 810_368,
                     "bitfit": 27_648},
    "qwen2.5-1.5b": {"base": 1_543_714_304, "prompt-tuning": 15_360, "p-tuning-mlp": 4_213_248,
                     "p-tuning-lstm": 53_529_088, "p-tuning-v2": 143_360, "prefix-tuning": 3_752_704,
                     "bitfit": 57_344},
    "bloomz-560m": {"base": 559_214_592, "prompt-tuning": 10_240, "p-tuning-mlp": 3_159_040,
                    "p-tuning-lstm": 48_280_576, "p-tuning-v2": 491_520, "prefix-tuning": 51_440_640,
                    "bitfit": 272_384},
    "bloom-1b4-zh": {"base": 1_303_111_680, "prompt-tuning": 20_480, "p-tuning-mlp": 5_267_456,
                     "p-tuning-lstm": 58_777_600, "p-tuning-v2": 983_040, "prefix-tuning": 205_641_728,
                     "bitfit": 544_768},
}

# The published sizes of the issue-20 models (their model cards' parameter counts): the configs
# written into fixtures/configs must build models of exactly this size.
PUBLISHED = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-4b": 4_022_468_096,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.3": 7_248_023_552,
}


def methods():
    c = TaskType.CAUSAL_LM
    return {
        "prompt-tuning": PromptTuningConfig(task_type=c, num_virtual_tokens=VIRTUAL),
        "p-tuning-mlp": PromptEncoderConfig(
            task_type=c, num_virtual_tokens=VIRTUAL, encoder_reparameterization_type="MLP",
            encoder_hidden_size=1024,
        ),
        "p-tuning-lstm": PromptEncoderConfig(
            task_type=c, num_virtual_tokens=VIRTUAL, encoder_reparameterization_type="LSTM",
            encoder_hidden_size=1024,
        ),
        "p-tuning-v2": PrefixTuningConfig(task_type=c, num_virtual_tokens=VIRTUAL, prefix_projection=False),
        # encoder_hidden_size left to PEFT's default (token_dim, after its GQA adjustment).
        "prefix-tuning": PrefixTuningConfig(task_type=c, num_virtual_tokens=VIRTUAL, prefix_projection=True),
    }


def line(trainable, total):
    # PEFT's print_trainable_parameters format.
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def base_model(name):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def main():
    found = {"peft": peft.__version__, "torch": torch.__version__.split("+")[0],
             "transformers": transformers.__version__}
    if found != PINNED:
        sys.exit(f"needs {PINNED}, found {found}: pip install -r scripts/requirements.txt")
    torch.set_num_threads(2)
    results, mismatches = {}, []
    for name in NAMES:
        base = base_model(name)
        entry = {"base": sum(p.numel() for p in base.parameters()), "lines": {}}
        print(f"{name}: base {entry['base']:,d}")
        for method, config in methods().items():
            with torch.device("meta"):
                model = get_peft_model(base_model(name), config)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                model.print_trainable_parameters()
            printed = out.getvalue().strip()
            counts = list(model.get_nb_trainable_parameters())
            assert printed == line(*counts), (printed, line(*counts))
            entry[method], entry["lines"][method] = counts, printed
        model = base_model(name)
        for n, p in model.named_parameters():
            p.requires_grad_("bias" in n)
        params = list(model.named_parameters())
        counts = [sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)]
        entry["bitfit"], entry["lines"]["bitfit"] = counts, line(*counts)
        if name in PUBLISHED:
            if entry["base"] != PUBLISHED[name]:
                mismatches.append(f"{name} base: {entry['base']:,d}, published {PUBLISHED[name]:,d}")
            for method in entry["lines"]:
                print(f"  {method:14} {entry['lines'][method]}")
            results[name] = entry
            continue
        for method in ["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm", "p-tuning-v2", "prefix-tuning", "bitfit"]:
            trainable, total = entry[method]
            want = TABLE[name][method]
            ok = trainable == want and total == entry["base"] + (0 if method == "bitfit" else trainable)
            if not ok:
                mismatches.append(f"{name} {method}: PEFT {trainable:,d} / {total:,d}, table {want:,d}")
            print(f"  {method:14} {entry['lines'][method]}{'' if ok else '   <-- table: ' + format(want, ',d')}")
        if entry["base"] != TABLE[name]["base"]:
            mismatches.append(f"{name} base: {entry['base']:,d}, table {TABLE[name]['base']:,d}")
        results[name] = entry
    (CONFIGS / "oracle.json").write_text(json.dumps(results, indent=2) + "\n")
    print("mismatches:" if mismatches else "all counts match the table", *mismatches, sep="\n  ")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
