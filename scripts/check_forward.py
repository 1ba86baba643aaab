#!/usr/bin/env python3
"""Checks `peft forward` against transformers on a checkpoint built from any config you choose.

Writes a random model with `save_pretrained` (the shapes, GQA ratio, rope_theta, BLOOM head count
given on the command line), runs the `peft` binary on it, and compares its logits with transformers'
(f32, unpadded and with a left-padded row). Exits non-zero when the difference exceeds 1e-4.

    cargo build --bin peft
    .venv/bin/python scripts/check_forward.py --arch qwen2 --hidden 96 --heads 12 --kv-heads 4 --rope-theta 5e5
    .venv/bin/python scripts/check_forward.py --arch bloom --hidden 84 --heads 7 --layers 3
    .venv/bin/python scripts/check_forward.py --arch qwen3 --hidden 80 --heads 5 --kv-heads 1 --head-dim 24
    .venv/bin/python scripts/check_forward.py --arch mistral --sliding-window 7 --seq 20
    .venv/bin/python scripts/check_forward.py --arch qwen2 --sliding-window 3 --max-window-layers 1 --layers 3
    .venv/bin/python scripts/check_forward.py --arch llama --rope-type llama3 --rope-factor 16 \
        --original-max 10 --low-freq-factor 1 --high-freq-factor 2
    .venv/bin/python scripts/check_forward.py --arch qwen2 --rope-type yarn --rope-factor 3 --original-max 12
    .venv/bin/python scripts/check_forward.py --arch llama --rope-type dynamic --rope-factor 2 --max-pos 9
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
from safetensors.torch import load_file
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def build(args):
    common = dict(vocab_size=args.vocab, initializer_range=0.2)
    if args.arch == "bloom":
        return BloomForCausalLM(BloomConfig(hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads, **common))
    cls, cfg_cls = {
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config),
        "mistral": (MistralForCausalLM, MistralConfig),
    }[args.arch]
    if args.head_dim:
        common["head_dim"] = args.head_dim
    rope = {"rope_type": args.rope_type, "rope_theta": args.rope_theta}
    if args.rope_type != "default":
        rope["factor"] = args.rope_factor
    if args.rope_type in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = args.original_max
    if args.rope_type == "llama3":
        rope.update(low_freq_factor=args.low_freq_factor, high_freq_factor=args.high_freq_factor)
    if args.sliding_window:
        common["sliding_window"] = args.sliding_window
        if args.arch in ("qwen2", "qwen3"):
            common.update(use_sliding_window=True, max_window_layers=args.max_window_layers)
    if args.attention_bias:
        common["attention_bias"] = True
    cfg = cfg_cls(
        hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads, rope_parameters=rope,
        tie_word_embeddings=args.tied, max_position_embeddings=args.max_pos, **common,
    )
    return cls(cfg)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["qwen2", "llama", "qwen3", "mistral", "bloom"], required=True)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--attention-bias", action="store_true")
    p.add_argument("--max-pos", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--sliding-window", type=int, help="mistral: every layer; qwen2/qwen3: use_sliding_window")
    p.add_argument("--max-window-layers", type=int, default=0, help="qwen2/qwen3: first sliding layer")
    p.add_argument("--rope-type", choices=["default", "linear", "dynamic", "yarn", "llama3"], default="default")
    p.add_argument("--rope-factor", type=float, default=2.0)
    p.add_argument("--original-max", type=int, default=16, help="original_max_position_embeddings")
    p.add_argument("--low-freq-factor", type=float, default=1.0)
    p.add_argument("--high-freq-factor", type=float, default=4.0)
    p.add_argument("--vocab", type=int, default=300)
    p.add_argument("--seq", type=int, default=13)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the saved weights")
    p.add_argument("--peft", default=str(ROOT / "target/debug/peft"), help="the peft binary")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = build(args).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.to(getattr(torch, args.dtype)).save_pretrained(tmp / "model")
        model = type(model).from_pretrained(tmp / "model", dtype=torch.float32).eval()
        ids = torch.randint(0, args.vocab, (2, args.seq))
        mask = torch.ones_like(ids)
        ids[1, :3] = 0
        mask[1, :3] = 0  # row 1 left-padded by 3
        with torch.no_grad():
            want0 = model(input_ids=ids[:1]).logits[0]
            want1 = model(input_ids=ids[1:, 3:]).logits[0]  # row 1 alone, unpadded
        (tmp / "in.json").write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}))
        run = subprocess.run([args.peft, "forward", "--model", str(tmp / "model"), "--input", str(tmp / "in.json"),
                              "--output", str(tmp / "out.safetensors")], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"peft forward failed:\n{run.stderr}")
        ours = load_file(tmp / "out.safetensors")["logits"]
    diff0 = (ours[0] - want0).abs().max().item()
    diff1 = (ours[1, 3:] - want1).abs().max().item()
    print(f"{args.arch}: {json.dumps(model.config.to_diff_dict())[:200]}...")
    print(f"max |peft - transformers|: unpadded row {diff0:.2e}, left-padded row {diff1:.2e}")
    sys.exit(0 if max(diff0, diff1) <= 1e-4 else 1)


if __name__ == "__main__":
    main()
