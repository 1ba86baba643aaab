#!/usr/bin/env python3
"""Teacher forcing against torch + PEFT: does PEFT, put in the state of one of our training runs
after step k, take the step k+1 that we took?

Run ours with a checkpoint per step, all kept:

    peft train ... --save-steps 1 --save-total-limit 0 --output RUN

then

    .venv/bin/python scripts/peft_teacher_forcing.py --model MODEL --train TRAIN.jsonl --run RUN

For every pair of checkpoints k and k+1 in RUN, PEFT loads checkpoint k (the adapter, and AdamW's
exp_avg / exp_avg_sq with step count k into torch.optim.AdamW), computes the loss and gradient on
the rows of our step k+1 (the `lines` in RUN/metrics.jsonl), takes one AdamW step at the learning
rate we logged for it, and compares: our logged loss and gradient norm against PEFT's, and our
parameters after step k+1 (checkpoint k+1) against PEFT's. A bug in the loss, the gradient or the
optimizer shows as a difference at some step; float rounding shows as differences of about 1e-5.

Methods: prompt tuning and P-tuning v2 (the trainable tensor is the prompt encoder's embedding),
and P-tuning with the MLP encoder (embedding and MLP, read from our adapter_encoder.safetensors).
One line per step on stdout, a summary at the end; --output writes every step as JSON.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*Position ids are not supported.*")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_train  # noqa: E402  (rows, padding and special ids exactly as the reference loop)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="the JSONL the run trained on")
    p.add_argument("--run", required=True, help="our output directory, with checkpoint-N for consecutive N")
    p.add_argument("--weight-decay", type=float, default=0.0, help="the run's --weight-decay")
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--every", type=int, default=1, help="check every N-th step only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output")
    args = p.parse_args()

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    eos_ids, pad_id = peft_train.special_ids(args.model)
    rows = {r["line"]: r for r in peft_train.read_rows(args.train, tokenizer, eos_ids[0] if eos_ids else None, args.max_length)}
    with open(os.path.join(args.run, "metrics.jsonl")) as f:
        logged = {m["step"]: m for m in map(json.loads, f) if m.get("kind") == "train"}
    steps = sorted(
        int(m.group(1))
        for d in glob.glob(os.path.join(args.run, "checkpoint-*"))
        if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d)))
    )
    pairs = [k for k in steps if k + 1 in steps and k + 1 in logged and k % args.every == 0]
    if not pairs:
        sys.exit(f"{args.run}: no consecutive checkpoints (train with --save-steps 1 --save-total-limit 0)")

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    first = os.path.join(args.run, f"checkpoint-{pairs[0]}")
    encoder_file = os.path.join(first, "adapter_encoder.safetensors")
    if os.path.exists(encoder_file):
        # P-tuning (MLP): PEFT's inference files hold only the encoder's output, so build the
        # trainable PeftModel from the config and copy our encoder (PyTorch names and layout) in.
        from peft import PromptEncoderConfig, get_peft_model

        with open(os.path.join(first, "adapter_config.json")) as f:
            cfg = json.load(f)
        if cfg.get("encoder_reparameterization_type", "MLP") != "MLP":
            sys.exit(f"{first}: only P-tuning's MLP encoder is handled")
        model = get_peft_model(
            base,
            PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=cfg["num_virtual_tokens"],
                encoder_hidden_size=cfg["encoder_hidden_size"],
                encoder_reparameterization_type="MLP",
            ),
        )
        encoder = model.prompt_encoder["default"]
        params = dict(encoder.named_parameters())  # embedding.weight, mlp_head.{0,2,4}.{weight,bias}

        def ours_name(torch_name):
            """Our optimizer state's name: burn's Vec index (0, 1, 2) for PyTorch's Sequential
            index (0, 2, 4)."""
            m = re.fullmatch(r"mlp_head\.(\d+)\.(weight|bias)", torch_name)
            return f"adapter.mlp_head.{int(m.group(1)) // 2}.{m.group(2)}" if m else f"adapter.{torch_name}"

        def adapter(k):
            path = os.path.join(args.run, f"checkpoint-{k}", "adapter_encoder.safetensors")
            values = load_file(path)
            return {name: values[name] for name in params}

        def moment(moments, name, kind):
            value = moments[f"{ours_name(name)}.{kind}"]
            # Our Linear weights are stored [in, out] (burn's layout); PyTorch's are [out, in].
            return value.t().contiguous() if name.startswith("mlp_head") and name.endswith("weight") else value
    else:
        # Prompt tuning and P-tuning v2: one trainable tensor, PEFT's `prompt_embeddings`. PEFT
        # refuses is_trainable=True for prompt learning adapters; it is made trainable by hand.
        model = PeftModel.from_pretrained(base, first)
        params = {"embedding.weight": model.prompt_encoder["default"].embedding.weight}

        def adapter(k):
            path = os.path.join(args.run, f"checkpoint-{k}", "adapter_model.safetensors")
            return {"embedding.weight": tensor(path, load_file(path))}

        def moment(moments, name, kind):
            return tensor("optimizer.safetensors", moments, "." + kind)

    for weight in params.values():
        weight.requires_grad_(True)

    def tensor(path, values, suffix=""):
        names = [n for n in values if n.endswith(suffix)]
        if len(names) != 1:
            sys.exit(f"{path}: expected one tensor{' *' + suffix if suffix else ''}, found {sorted(values)}")
        return values[names[0]]

    def flat(values):
        return torch.cat([values[name].reshape(-1) for name in params])

    results = []
    for k in pairs:
        ours_next = adapter(k + 1)
        start = adapter(k)
        moments = load_file(os.path.join(args.run, f"checkpoint-{k}", "optimizer.safetensors"))
        with torch.no_grad():
            for name, weight in params.items():
                weight.copy_(start[name])
        step = logged[k + 1]
        weights = list(params.values())
        optimizer = torch.optim.AdamW(weights, lr=step["lr"], weight_decay=args.weight_decay, eps=args.adam_epsilon)
        for name, weight in params.items():
            optimizer.state[weight] = {
                "step": torch.tensor(float(k)),
                "exp_avg": moment(moments, name, "exp_avg").clone(),
                "exp_avg_sq": moment(moments, name, "exp_avg_sq").clone(),
            }
        ids, mask, labels = peft_train.collate([rows[line] for line in step["lines"]], pad_id)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grad_norm = float(torch.norm(torch.stack([w.grad.norm() for w in weights])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = flat({name: w.detach() for name, w in params.items()})
        diff = after - flat(ours_next)
        update = flat(ours_next) - flat(start)
        record = {
            "step": k + 1,
            "loss_ours": step["loss"],
            "loss_peft": float(loss.detach()),
            "grad_norm_ours": step["grad_norm"],
            "grad_norm_peft": grad_norm,
            "param_max_abs_diff": float(diff.abs().max()),
            "update_rel_diff": float(diff.norm() / update.norm().clamp_min(1e-30)),
        }
        results.append(record)
        print(
            f"step {k + 1}: loss ours {record['loss_ours']:.6f} PEFT {record['loss_peft']:.6f} | grad norm ours "
            f"{record['grad_norm_ours']:.5f} PEFT {grad_norm:.5f} | parameters after: max diff "
            f"{record['param_max_abs_diff']:.2e}, update differs by {record['update_rel_diff']:.2e} of its norm",
            flush=True,
        )

    loss_rel = [(r["loss_ours"] - r["loss_peft"]) / r["loss_peft"] for r in results]
    grad_rel = [(r["grad_norm_ours"] - r["grad_norm_peft"]) / r["grad_norm_peft"] for r in results]
    updates = [r["update_rel_diff"] for r in results]
    summary = {
        "steps": len(results),
        "loss_rel_diff_mean": statistics.mean(loss_rel),
        "loss_rel_diff_max_abs": max(map(abs, loss_rel)),
        "loss_ours_lower_fraction": sum(v < 0 for v in loss_rel) / len(loss_rel),
        "grad_norm_rel_diff_mean": statistics.mean(grad_rel),
        "grad_norm_rel_diff_max_abs": max(map(abs, grad_rel)),
        "update_rel_diff_median": statistics.median(updates),
        "update_rel_diff_max": max(updates),
    }
    print(json.dumps(summary, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"summary": summary, "steps": results}, f)
            f.write("\n")


if __name__ == "__main__":
    main()
