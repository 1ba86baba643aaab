#!/usr/bin/env python3
"""Copy a Hugging Face Llama model directory, giving it zero bias terms.

BitFit trains only biases, and Llama-family models (SmolLM2 among them) have
none. This writes the same model with ``attention_bias`` (q/k/v/o) and
``mlp_bias`` (gate/up/down) switched on and every new bias set to zero, so the
function it computes is unchanged and BitFit has something to train:

    python scripts/add_zero_biases.py models/smollm2-135m models/smollm2-135m-biases

Only ``config.json`` and ``model.safetensors`` change; the other files are
copied. The output is written to ``OUTPUT.tmp`` and renamed when complete.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    args = ap.parse_args()

    config = json.loads((args.input / "config.json").read_text())
    if config.get("model_type") != "llama":
        sys.exit(f"{args.input / 'config.json'}: model_type must be \"llama\", found {config.get('model_type')!r}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        sys.exit(f"{args.input / 'config.json'}: the model already has biases")
    weights = load_file(str(args.input / "model.safetensors"))

    added = 0
    for layer in range(config["num_hidden_layers"]):
        for block, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            for name in names:
                key = f"model.layers.{layer}.{block}.{name}"
                weight = weights[f"{key}.weight"]
                # nn.Linear stores [out_features, in_features]; the bias has out_features.
                weights[f"{key}.bias"] = np.zeros(weight.shape[0], dtype=weight.dtype)
                added += weight.shape[0]
    config["attention_bias"] = True
    config["mlp_bias"] = True

    tmp = args.output.with_name(args.output.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(args.input, tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if args.output.exists():
        shutil.rmtree(args.output)
    tmp.rename(args.output)
    print(f"wrote {args.output}: {added} zero bias values in {config['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
