#!/usr/bin/env python3
"""The torch + transformers + peft side of `cargo xtask bench --compare`.

Builds the same model shape with random weights (from a config.json, nothing downloaded), wraps it
with each PEFT method as the Rust side builds its adapters, and times the same workloads the same
way (xtask/src/bench.rs): one warm-up, then the median of --reps runs.

- train: forward with labels = input_ids, backward, clip_grad_norm_(1.0), AdamW step. With
  --row-lengths, rows of those lengths right-padded to the longest, the loss on each row's last
  third only (a prompt/completion batch as `peft train` builds it); tokens/s counts real tokens.
- forward: logits without gradients.
- generate: greedy `generate` of 1 new token (prefill) and of N new tokens; decode rate =
  gen_batch * (N - 1) / (t(N) - t(1)).

Peak memory: the process's resident high-water mark (VmHWM), reset through /proc/self/clear_refs
before each workload (*_peak_rss_mib); on CUDA also what the caching allocator held at its peak,
torch.cuda.max_memory_reserved (*_peak_device_mib), and the live bytes at their peak,
torch.cuda.max_memory_allocated (*_peak_device_in_use_mib), as the Rust side reports its pools.
Progress goes to stderr; one JSON object goes to stdout.
"""

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps a model;
# the FutureWarning would otherwise break the progress line of every method.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def reset_peak(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def record_peaks(record, workload, device):
    """The workload's peaks since reset_peak, under the names the Rust side uses."""
    import torch

    record[f"{workload}_peak_rss_mib"] = peak_rss_mib()
    if device.startswith("cuda"):
        record[f"{workload}_peak_device_mib"] = torch.cuda.max_memory_reserved() / 2**20
        record[f"{workload}_peak_device_in_use_mib"] = torch.cuda.max_memory_allocated() / 2**20


def peft_config(method, n):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    lm = TaskType.CAUSAL_LM
    if method == "prompt-tuning":
        return PromptTuningConfig(task_type=lm, num_virtual_tokens=n)
    if method == "p-tuning-mlp":
        return PromptEncoderConfig(task_type=lm, num_virtual_tokens=n, encoder_reparameterization_type="MLP")
    if method == "p-tuning-lstm":
        return PromptEncoderConfig(task_type=lm, num_virtual_tokens=n, encoder_reparameterization_type="LSTM")
    if method == "prefix-tuning":
        return PrefixTuningConfig(task_type=lm, num_virtual_tokens=n, prefix_projection=True)
    if method == "p-tuning-v2":
        return PrefixTuningConfig(task_type=lm, num_virtual_tokens=n, prefix_projection=False)
    return None


def build(args, method, dtype):
    """The model of `method` (base, a PEFT model, or the base with only biases trainable)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device)
    cfg = peft_config(method, args.num_virtual_tokens)
    if cfg is not None:
        model = get_peft_model(model, cfg)
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--methods", required=True)
    p.add_argument("--workloads", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--gen-batch", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--num-virtual-tokens", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32", help="dtype of the base model (PEFT's adapter parameters stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing in training")
    p.add_argument("--device", default="cpu")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul whose rate is reported as the peak")
    p.add_argument(
        "--row-lengths",
        help="train on rows of these lengths (comma separated), right-padded to the longest, the loss on each row's last third only (as the Rust side's --row-lengths)",
    )
    args = p.parse_args()

    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = transformers.AutoConfig.from_pretrained(args.config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    train_ids, train_mask, train_labels = ids, mask, ids
    train_tokens = args.batch * args.seq_len
    if args.row_lengths:
        lengths = [int(n) for n in args.row_lengths.split(",")]
        longest = max(lengths)
        train_ids = torch.randint(0, config.vocab_size, (len(lengths), longest), generator=gen)
        train_mask = torch.zeros_like(train_ids)
        train_labels = torch.full_like(train_ids, -100)
        for i, n in enumerate(lengths):
            prompt = n - max(1, n // 3)
            train_mask[i, :n] = 1
            train_labels[i, prompt:n] = train_ids[i, prompt:n]
        train_ids, train_mask, train_labels = (t.to(args.device) for t in (train_ids, train_mask, train_labels))
        train_tokens = sum(lengths)
    prompts = torch.randint(0, config.vocab_size, (args.gen_batch, args.seq_len), generator=gen).to(args.device)
    prompt_mask = torch.ones_like(prompts)
    workloads = args.workloads.split(",")

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(run):
        run()
        times = []
        for _ in range(args.reps):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        # The same pick as the Rust side: the middle of the sorted times (the upper one of two).
        return sorted(times)[len(times) // 2]

    # The attainable matmul rate of this engine, as the Rust side measures its own.
    n = args.matmul_size
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    matmul_gflops = 2 * n**3 / timed(lambda: a @ b) / 1e9
    del a, b
    print(f"torch matmul {matmul_gflops:.0f} GFLOP/s", file=sys.stderr, flush=True)

    results = []
    for method in args.methods.split(","):
        record = {"method": method, "trainable_params": None}
        print(f"torch {method:<14}", end="", file=sys.stderr, flush=True)
        if "train" in workloads and method != "base":
            reset_peak(args.device)
            model = build(args, method, dtype)
            if args.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            record["trainable_params"] = sum(p.numel() for p in params)
            record["trainable_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in params})
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step():
                out = model(input_ids=train_ids, attention_mask=train_mask, labels=train_labels)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                seconds = timed(step)
            except RuntimeError as e:
                # transformers + PEFT refuse some combinations (prefix tuning with gradient
                # checkpointing: the recomputed layers see the prefix cache twice); say so in the
                # record instead of failing the whole comparison.
                record["train_error"] = str(e).splitlines()[0][:300]
                print(f" train failed: {record['train_error']}", end="", file=sys.stderr, flush=True)
            else:
                record["train_tokens_per_s"] = train_tokens / seconds
                record["train_step_s"] = seconds
                record_peaks(record, "train", args.device)
                print(f" train {record['train_tokens_per_s']:.1f} tok/s", end="", file=sys.stderr, flush=True)
            del model, opt, params
        if "forward" in workloads:
            reset_peak(args.device)
            model = build(args, method, dtype).eval()

            @torch.no_grad()
            def forward():
                model(input_ids=ids, attention_mask=mask).logits

            seconds = timed(forward)
            record["forward_tokens_per_s"] = args.batch * args.seq_len / seconds
            record_peaks(record, "forward", args.device)
            print(f" forward {record['forward_tokens_per_s']:.1f} tok/s", end="", file=sys.stderr, flush=True)
            del model
        if "generate" in workloads:
            reset_peak(args.device)
            model = build(args, method, dtype).eval()

            @torch.no_grad()
            def generate(n):
                model.generate(
                    input_ids=prompts,
                    attention_mask=prompt_mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )

            prefill = timed(lambda: generate(1))
            full = timed(lambda: generate(args.new_tokens))
            record["prefill_tokens_per_s"] = args.gen_batch * args.seq_len / prefill
            record["decode_tokens_per_s"] = args.gen_batch * (args.new_tokens - 1) / (full - prefill) if full > prefill else None
            record["generate_tokens_per_s"] = args.gen_batch * args.new_tokens / full
            record["generate_s"] = full
            record_peaks(record, "generate", args.device)
            print(f" generate {record['generate_tokens_per_s']:.2f} tok/s", end="", file=sys.stderr, flush=True)
            del model
        print(file=sys.stderr, flush=True)
        results.append(record)

    print(
        json.dumps(
            {
                "engine": f"torch {torch.__version__} + transformers {transformers.__version__} + peft {peft.__version__}",
                "device": args.device,
                "dtype": args.dtype,
                "gradient_checkpointing": args.gradient_checkpointing,
                "threads": args.threads,
                "matmul_gflops": matmul_gflops,
                "methods": results,
            }
        )
    )


if __name__ == "__main__":
    main()
