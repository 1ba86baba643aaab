#!/usr/bin/env python3
"""The torch + transformers side of `cargo xtask bench --compare`.

Builds the same model shape with random weights (from a config.json, nothing downloaded) and times
the same workloads the Rust side times, the same way: `generate` with 1 new token (prefill) and with
N new tokens; decode rate = batch * (N - 1) / (t(N) - t(1)). Prints one JSON object on stdout.
"""

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="a Hugging Face config.json")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), device=args.device)
    mask = torch.ones_like(ids)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.no_grad()
    def timed_generate(n):
        sync()
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    timed_generate(2)  # warm-up
    prefill = min(timed_generate(1) for _ in range(args.reps))
    full = min(timed_generate(args.new_tokens) for _ in range(args.reps))
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "engine": f"torch {torch.__version__} + transformers {transformers.__version__}",
        "prefill_tokens_per_s": args.batch * args.prompt_len / prefill,
        "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / max(full - prefill, 1e-9),
        "prefill_s": prefill,
        "generate_s": full,
        "peak_rss_mib": rss_kib / 1024,
        "peak_gpu_mib": (torch.cuda.max_memory_allocated() / 2**20) if args.device.startswith("cuda") else None,
    }))


if __name__ == "__main__":
    sys.exit(main())
