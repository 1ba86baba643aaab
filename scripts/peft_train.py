#!/usr/bin/env python3
"""A plain torch + PEFT training loop over the same JSONL rows `peft train` reads: the reference
side of `cargo xtask bench --workloads epoch` and of the learning comparisons in docs/smollm2.md.

It does what `peft train` does, step for step, so that the two can be compared on one file:

- rows: {"prompt", "completion"} JSONL; the prompt is encoded with the tokenizer's special
  tokens, the completion without, then EOS (the first `eos_token_id` of generation_config.json or
  config.json); the loss scores the completion and EOS only. Encoding goes through the same
  `tokenizers` library and tokenizer.json as ours, so the ids are identical.
- batches: `--batch-size` rows padded on the right to the longest row of the batch with
  `pad_token_id` (or EOS); mean cross-entropy over the batch's scored tokens (transformers' loss).
- AdamW (torch.optim.AdamW) with `--weight-decay`, eps 1e-8, betas (0.9, 0.999), the linear
  schedule of `get_linear_schedule_with_warmup`, optional global-norm clipping.
- evaluation after each epoch (and before the first step): mean loss over the held-out rows and
  strict exact match (greedy completion starts with the target ids and EOS), one row at a time so
  PEFT's generation sees no padding.

`--order-from METRICS` replays the batch order of one of our runs (the `lines` of each training
step in its metrics.jsonl), and `--init-from DIR` starts from an adapter directory in PEFT's
format (prompt tuning and P-tuning v2: its `prompt_embeddings` are the trainable tensor) or, for
P-tuning, from our trainable encoder (`adapter_encoder.safetensors`), so the two sides can run from
the same values in the same order.

Prints progress to stderr and writes one JSON object (steps, evaluations, seconds per epoch) to
--output (or stdout).
"""

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

IGNORE_INDEX = -100


def special_ids(model_dir):
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)

    def ids(key):
        v = cfg.get(key)
        if v is None:
            return []
        return v if isinstance(v, list) else [v]

    eos = ids("eos_token_id")
    pad = ids("pad_token_id")
    return eos, (pad[0] if pad else (eos[0] if eos else 0))


def read_rows(path, tokenizer, eos_id, max_length):
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = tokenizer.encode(row["prompt"], add_special_tokens=True).ids
            target = tokenizer.encode(row["completion"], add_special_tokens=False).ids
            if eos_id is not None:
                target = target + [eos_id]
            budget = max_length - len(target)
            if budget < 0:
                sys.exit(f"{path}:{number}: the target is longer than --max-length")
            if len(prompt) > budget:
                prompt = prompt[len(prompt) - budget :]
            rows.append(
                {
                    "line": number,
                    "ids": prompt + target,
                    "labels": [IGNORE_INDEX] * len(prompt) + target,
                    "prompt_len": len(prompt),
                }
            )
    return rows


def collate(rows, pad_id):
    import torch

    seq = max(len(r["ids"]) for r in rows)
    ids, mask, labels = [], [], []
    for r in rows:
        pad = seq - len(r["ids"])
        ids.append(r["ids"] + [pad_id] * pad)
        mask.append([1] * len(r["ids"]) + [0] * pad)
        labels.append(r["labels"] + [IGNORE_INDEX] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def peft_config(args, model_dir):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    n = args.num_virtual_tokens
    if args.method == "prompt-tuning":
        if args.prompt_tuning_init == "text":
            return PromptTuningConfig(
                task_type=TaskType.CAUSAL_LM,
                num_virtual_tokens=n,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=args.prompt_tuning_init_text,
                tokenizer_name_or_path=model_dir,
            )
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n)
    if args.method == "p-tuning":
        return PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=n,
            encoder_hidden_size=args.encoder_hidden_size,
            encoder_reparameterization_type="MLP",
        )
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=n,
        prefix_projection=args.method == "prefix-tuning",
        encoder_hidden_size=args.encoder_hidden_size,
    )


def replayed_order(path):
    """The rows (1-based lines) of each optimizer step of one of our runs, in order."""
    steps = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if m.get("kind") == "train" and m.get("lines"):
                steps[m["step"]] = m["lines"]
    return [steps[s] for s in sorted(steps)]


def evaluate(model, rows, pad_id, eos_ids, batch_size, exact_match):
    import torch

    model.eval()
    loss_sum, scored = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids, mask, labels = collate(chunk, pad_id)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss_sum += float(out.loss) * n
            scored += n
        hits = None
        if exact_match:
            hits = 0
            for r in rows:
                prompt = torch.tensor([r["ids"][: r["prompt_len"]]])
                target = r["ids"][r["prompt_len"] :]
                gen = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=len(target),
                    do_sample=False,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                )
                new = gen[0, prompt.shape[1] :].tolist()
                hits += int(new[: len(target)] == target)
    model.train()
    loss = loss_sum / max(scored, 1)
    return {"loss": loss, "exact_match": None if hits is None else hits / len(rows)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", required=True, choices=["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2", "bitfit"],
        help="bitfit: PEFT has none; the plain torch equivalent, the base model with only its biases trainable")
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval")
    parser.add_argument("--output")
    parser.add_argument("--num-virtual-tokens", type=int, default=10)
    parser.add_argument("--prompt-tuning-init", choices=["random", "text"], default="random")
    parser.add_argument("--prompt-tuning-init-text")
    parser.add_argument("--encoder-hidden-size", type=int)
    parser.add_argument("--prefix-init", choices=["random", "zero", "text"], default="random")
    parser.add_argument("--prefix-init-text")
    parser.add_argument("--init-from", help="adapter directory (PEFT's files) to start from")
    parser.add_argument("--order-from", help="metrics.jsonl of a `peft train` run whose batch order to replay")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--no-exact-match", action="store_true")
    parser.add_argument("--no-eval-at-start", action="store_true")
    parser.add_argument("--final-eval-only", action="store_true", help="evaluate after the last epoch only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    eos_ids, pad_id = special_ids(args.model)
    eos_id = eos_ids[0] if eos_ids else None
    train_rows = read_rows(args.train, tokenizer, eos_id, args.max_length)
    eval_rows = read_rows(args.eval, tokenizer, eos_id, args.max_length) if args.eval else None

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    base.config.use_cache = False
    if args.method == "bitfit":
        # PEFT has no BitFit: train every parameter named `*.bias`, as `peft train --method bitfit` does.
        model = base
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
        encoder = None
    else:
        model = get_peft_model(base, peft_config(args, args.model))
        encoder = model.prompt_encoder["default"]
    if args.method in ("prefix-tuning", "p-tuning-v2") and args.prefix_init == "zero":
        with torch.no_grad():
            if args.method == "p-tuning-v2":
                encoder.embedding.weight.zero_()
            else:
                encoder.transform[2].weight.zero_()
                encoder.transform[2].bias.zero_()
    if args.method == "p-tuning-v2" and args.prefix_init == "text":
        from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

        hf_tokenizer = AutoTokenizer.from_pretrained(args.model)
        initialize_kv_prefix_from_text(model, hf_tokenizer, text=args.prefix_init_text)
    if args.init_from:
        encoder_file = os.path.join(args.init_from, "adapter_encoder.safetensors")
        if args.method == "p-tuning":
            # Our trainable P-tuning encoder (adapter_encoder.safetensors holds it under PyTorch's
            # names and layout: embedding.weight, mlp_head.{0,2,4}.{weight,bias}).
            values = load_file(encoder_file)
            with torch.no_grad():
                for name, param in encoder.named_parameters():
                    param.copy_(values[name])
        else:
            values = load_file(os.path.join(args.init_from, "adapter_model.safetensors"))["prompt_embeddings"]
            with torch.no_grad():
                encoder.embedding.weight.copy_(values)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)

    by_line = {r["line"]: r for r in train_rows}
    if args.order_from:
        order = [[by_line[line] for line in step] for step in replayed_order(args.order_from)]
        steps_per_epoch = -(-len(train_rows) // args.batch_size)
        epochs = [order[i : i + steps_per_epoch] for i in range(0, len(order), steps_per_epoch)]
    else:
        g = torch.Generator().manual_seed(args.seed)
        epochs = []
        for _ in range(args.epochs):
            perm = torch.randperm(len(train_rows), generator=g).tolist()
            epochs.append(
                [[train_rows[i] for i in perm[j : j + args.batch_size]] for j in range(0, len(perm), args.batch_size)]
            )
    total_steps = sum(len(e) for e in epochs)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, eps=1e-8)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)

    record = {
        "method": args.method,
        "trainable": trainable,
        "threads": args.threads,
        "torch": torch.__version__,
        "steps": [],
        "evals": [],
        "epoch_seconds": [],
        "eval_seconds": [],
    }

    def run_eval(step):
        if eval_rows is None:
            return
        started = time.perf_counter()
        result = evaluate(model, eval_rows, pad_id, eos_ids, args.eval_batch_size, not args.no_exact_match)
        record["eval_seconds"].append(time.perf_counter() - started)
        result["step"] = step
        record["evals"].append(result)
        em = result["exact_match"]
        print(
            f"eval @ step {step}: loss {result['loss']:.4f}"
            + ("" if em is None else f"  exact match {100 * em:.1f}%"),
            file=sys.stderr,
        )

    if not args.no_eval_at_start:
        run_eval(0)
    step = 0
    for epoch, batches in enumerate(epochs):
        epoch_started = time.perf_counter()
        for rows in batches:
            started = time.perf_counter()
            ids, mask, labels = collate(rows, pad_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            norms = [p.grad.detach().norm(2) for p in params if p.grad is not None]
            grad_norm = float(torch.norm(torch.stack(norms), 2))
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record["steps"].append(
                {
                    "step": step,
                    "loss": float(loss),
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "seconds": time.perf_counter() - started,
                    "lines": [r["line"] for r in rows],
                }
            )
            print(f"step {step}/{total_steps}  loss {float(loss):.4f}  |g| {grad_norm:.4f}", file=sys.stderr)
        record["epoch_seconds"].append(time.perf_counter() - epoch_started)
        if not args.final_eval_only or epoch == len(epochs) - 1:
            run_eval(step)

    text = json.dumps(record)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
