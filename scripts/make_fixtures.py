#!/usr/bin/env python3
"""Builds the tiny Hugging Face checkpoints and the expected outputs the parity tests compare against.

Everything is made from configs with fixed seeds, offline: a byte-level BPE tokenizer trained on the
text below, random Qwen2 / Llama / BLOOM models written with `save_pretrained`, and what
transformers computes on them (f32 logits, greedy continuations, single and batched with left padding).

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_fixtures.py          # rewrites fixtures/

The versions are pinned in scripts/requirements.txt; the script refuses to run with others, so the
committed numbers always come from the same reference. CI never runs this: the outputs are committed.
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

PINNED = {"transformers": "5.23.0", "torch": "2.15.0"}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures"
VOCAB = 512
EOS = "<|endoftext|>"

# Our own text: the tokenizer only needs something to learn merges from.
CORPUS = """
The small model reads a prompt and writes a continuation one token at a time.
Parameter efficient fine tuning trains a few numbers and keeps the base model frozen.
Prompt tuning prepends soft tokens; prefix tuning gives every layer its own keys and values.
BitFit trains only the bias terms. P-tuning passes its prompt through a small encoder.
Rust programs are compiled ahead of time; burn runs tensors on the CPU and on GPUs.
Hello world! Once upon a time there was a tiny transformer that wanted to learn.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, dates, and names like Alice, Bob and Carol.
""" * 4


def check_versions():
    found = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    if found != PINNED:
        sys.exit(f"make_fixtures.py needs {PINNED}, found {found}: pip install -r scripts/requirements.txt")


def build_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, pad_token=EOS)


def qwen2_gqa_tied():
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.2,
    )


def qwen2_gqa_untied():
    # head_dim given explicitly and different from hidden/heads; GQA ratio 3; rope_theta 1e6.
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_theta=1_000_000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.2,
    )


def llama():
    # Multi-query attention (1 kv head), no biases, written as shards.
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.2,
    )


def llama_biases():
    # As llama() but with every projection biased (attention and MLP) and 2 kv heads, not sharded:
    # the BitFit fixture for Llama.
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.2,
        attention_bias=True, mlp_bias=True,
    )


def bloom():
    # 6 heads: not a power of two, so the extra ALiBi slopes are exercised.
    return BloomForCausalLM, BloomConfig(
        vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.2,
    )


def bloom_legacy():
    # 5 heads; config written with the legacy keys and weights without the `transformer.` prefix,
    # as old hub checkpoints are.
    return BloomForCausalLM, BloomConfig(
        vocab_size=VOCAB, hidden_size=40, n_layer=2, n_head=5, initializer_range=0.2,
        apply_residual_connection_post_layernorm=True,
    )


def qwen3_tied():
    # Explicit head_dim (32) unlike hidden / heads (16): the case PEFT's prompt learning gets wrong.
    return Qwen3ForCausalLM, Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True, initializer_range=0.2,
    )


def qwen3_window():
    # Untied, biased projections, and a 6-position window on the layers from max_window_layers on.
    return Qwen3ForCausalLM, Qwen3Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=True,
        use_sliding_window=True, sliding_window=6, max_window_layers=1,
        tie_word_embeddings=False, initializer_range=0.2,
    )


def llama3():
    # Llama 3.x RoPE with a short original context, so that low, medium and high frequencies all
    # occur at head_dim 16; tied head as Llama-3.2-1B.
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
        tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.2,
    )


def llama_linear():
    return LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        tie_word_embeddings=False, initializer_range=0.2,
    )


def qwen2_yarn():
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32},
        tie_word_embeddings=True, initializer_range=0.2,
    )


def qwen2_window():
    # A 4-position window on the second layer only (max_window_layers 1).
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        tie_word_embeddings=True, initializer_range=0.2,
    )


def mistral():
    # Every layer slides over 5 positions: the 11-token rows, the 3-position prefix and 16 new
    # tokens all reach past it.
    return MistralForCausalLM, MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False, initializer_range=0.2,
    )


def qwen2_dynamic():
    # Dynamic NTK past an 8-position maximum: the 11-token rows rescale (tested on logits only:
    # transformers' dynamic RoPE keeps state between calls, so later outputs depend on history).
    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        tie_word_embeddings=True, initializer_range=0.2,
    )


FIXTURES = {
    "qwen2-gqa-tied": (qwen2_gqa_tied, {}),
    "qwen2-gqa-untied": (qwen2_gqa_untied, {}),
    "llama-mqa-sharded": (llama, {"max_shard_size": "60KB"}),
    "bloom-6-heads": (bloom, {}),
    "bloom-legacy-5-heads": (bloom_legacy, {"legacy": True}),
    "qwen2-bf16": (qwen2_gqa_tied, {"dtype": torch.bfloat16}),
    "llama-f16": (llama, {"dtype": torch.float16}),
    # Appended last: each fixture's seed comes from its name, but keep the order of the others anyway.
    "llama-biases": (llama_biases, {}),
    # Issue 20: the families and RoPE / window variants people fine-tune now.
    "qwen3-tied": (qwen3_tied, {}),
    "qwen3-window": (qwen3_window, {}),
    "llama3-rope": (llama3, {}),
    "llama-linear": (llama_linear, {}),
    "qwen2-yarn": (qwen2_yarn, {}),
    "qwen2-window": (qwen2_window, {}),
    "mistral-window": (mistral, {}),
    "qwen2-dynamic": (qwen2_dynamic, {}),
}

PROMPTS = ["The small model reads", "Hello world!", "Prefix tuning gives every layer"]
MAX_NEW = 16
PREFIX_LEN = 3


def make_model(name, factory, options, tokenizer, tok_path):
    cls, config = factory()
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(sum(map(ord, name)))
    model = cls(config).eval()
    directory = OUT / "models" / name
    if directory.exists():
        shutil.rmtree(directory)
    dtype = options.get("dtype", torch.float32)
    model.to(dtype).save_pretrained(directory, max_shard_size=options.get("max_shard_size", "1GB"))
    shutil.copy(tok_path, directory / "tokenizer.json")
    if options.get("legacy"):
        cfg = json.loads((directory / "config.json").read_text())
        cfg["n_embed"] = cfg.pop("hidden_size")
        cfg["num_attention_heads"] = cfg.pop("n_head")
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        from safetensors.torch import load_file
        weights = load_file(directory / "model.safetensors")
        weights = {k.removeprefix("transformer."): v for k, v in weights.items() if k != "lm_head.weight"}
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    # The reference runs in f32 on whatever the files hold (bf16 weights are upcast exactly).
    reference = cls.from_pretrained(directory, dtype=torch.float32).eval()
    return directory, reference


@torch.no_grad()
def expected_outputs(name, model, tokenizer):
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    logits = model(input_ids=input_ids).logits.float()

    # Per-layer prefix keys/values in the cache, as PEFT's prefix tuning passes them: never rotated,
    # attended by every token, real tokens positioned after them.
    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (layers, 2, kv_heads, PREFIX_LEN, head_dim)
    prefix_key = torch.randn(shape, generator=gen)
    prefix_value = torch.randn(shape, generator=gen)
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(prefix_key[layer], prefix_value[layer], layer)
    mask = torch.ones(2, PREFIX_LEN + input_ids.shape[1], dtype=torch.long)
    prefix_logits = model(input_ids=input_ids, past_key_values=cache, attention_mask=mask).logits.float()

    # Row 1 left-padded by 2 after its prefix, positions counted over real keys as `generate`
    # counts them. A sliding window counts cache slots, padding included, so with a window this
    # row differs from the unpadded one, in transformers as in ours.
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(prefix_key[layer][1:2], prefix_value[layer][1:2], layer)
    pad = tokenizer.pad_token_id
    padded = torch.cat([torch.full((1, 2), pad), input_ids[1:2]], dim=1)
    full_mask = torch.cat([torch.ones(1, PREFIX_LEN), torch.zeros(1, 2), torch.ones(1, input_ids.shape[1])], dim=1).long()
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)[:, PREFIX_LEN:]
    prefix_padded_logits = model(
        input_ids=padded, past_key_values=cache, attention_mask=full_mask, position_ids=positions
    ).logits.float()[:, 2:]

    def greedy(prompts):
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **batch, max_new_tokens=MAX_NEW, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
        # Smallest gap between the best and second-best score along the way: a tiny gap would make
        # greedy parity fragile, so report it.
        gaps = [s.topk(2, dim=-1).values for s in out.scores]
        gap = min(float((g[:, 0] - g[:, 1]).min()) for g in gaps)
        rows = []
        for row in new:
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            rows.append(row)
        return batch["input_ids"].tolist(), batch["attention_mask"].tolist(), rows, gap

    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    singles, gaps = [], []
    for p in PROMPTS:
        _, _, rows, gap = greedy([p])
        singles.append(rows[0])
        gaps.append(gap)
    padded_ids, padded_mask, batched, gap = greedy(PROMPTS)
    gaps.append(gap)
    return (
        {
            "input_ids": input_ids.to(torch.int64).contiguous(),
            "logits": logits.contiguous(),
            "prefix_key": prefix_key.contiguous(),
            "prefix_value": prefix_value.contiguous(),
            "prefix_logits": prefix_logits.contiguous(),
            "prefix_padded_logits": prefix_padded_logits.contiguous(),
        },
        {
            "prompts": PROMPTS,
            "prompt_ids": prompt_ids,
            "padded_input_ids": padded_ids,
            "padded_attention_mask": padded_mask,
            "greedy_single": singles,
            "greedy_batched": batched,
            "max_new_tokens": MAX_NEW,
            "min_top2_gap": min(gaps),
        },
    )


def main():
    check_versions()
    torch.set_num_threads(2)
    (OUT / "models").mkdir(parents=True, exist_ok=True)
    (OUT / "expected").mkdir(parents=True, exist_ok=True)
    tok_path = OUT / "tokenizer.json"
    tokenizer = build_tokenizer(tok_path)
    for name, (factory, options) in FIXTURES.items():
        directory, reference = make_model(name, factory, options, tokenizer, tok_path)
        tensors, meta = expected_outputs(name, reference, tokenizer)
        meta["transformers"] = transformers.__version__
        meta["torch"] = torch.__version__
        save_file(tensors, OUT / "expected" / f"{name}.safetensors")
        (OUT / "expected" / f"{name}.json").write_text(json.dumps(meta) + "\n")
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{name:24} {size / 1024:7.0f} KiB  min top-2 gap {meta['min_top2_gap']:.4f}  "
              f"greedy row 0: {meta['greedy_single'][0]}")
    tok_path.unlink()


if __name__ == "__main__":
    main()
