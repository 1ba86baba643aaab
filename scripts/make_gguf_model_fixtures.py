"""Writes fixtures/gguf/<name>.gguf: three of the tiny parity models (fixtures/models) as llama.cpp's
convert_hf_to_gguf.py lays them out (llama.cpp tensor names; Llama's q/k rows permuted; config,
tokenizer and chat template in the metadata), with weights quantized to Q8_0, Q4_0, Q4_1, F16 and
BF16, written with the `gguf` package (llama.cpp's gguf-py, pinned in requirements.txt).

Beside each file, what the loader must make of it, computed by transformers' own GGUF loader:
- <name>/: config.json and model.safetensors, the dequantized weights under Hugging Face names
  (so the same weights can be loaded from safetensors);
- <name>.expected.safetensors: transformers' logits for `input_ids` (stored too);
- <name>.tokens.json: token ids of test texts, from the tokenizer the model's own tokenizer.json
  would be for the GGUF's `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer types: `llama-bpe` as
  Llama 3's tokenizer.json, `qwen2` as transformers' Qwen2 converter, `smollm` as SmolLM2's).

Run: .venv/bin/python scripts/make_gguf_model_fixtures.py
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "fixtures" / "models"
OUT = ROOT / "fixtures" / "gguf"
Q = gguf.GGMLQuantizationType

LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

TEXTS = [
    "Hello world",
    "The year 2024 had 12345 days, didn't it? I'll say: it's 3.14!",
    "  leading spaces,\ttabs\nand\n\nnewlines   ",
    "Unicode: café, naïve, Ǆ, 東京, emoji 🙂",
    "<|endoftext|>special in the middle<|endoftext|>",
    "",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|endoftext|>' + message['role'] + '\\n' + "
    "message['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|endoftext|>assistant\\n' }}{% endif %}"
)

# name: (source fixture, arch, tokenizer.ggml.pre, add BOS)
CASES = {
    "llama-biases": ("llama-biases", "llama", "llama-bpe", True),
    "qwen2-gqa-tied": ("qwen2-gqa-tied", "qwen2", "qwen2", False),
    "qwen3-tied": ("qwen3-tied", "qwen3", "smollm", False),
}

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    layer, rest = parts[2], ".".join(parts[3:])
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def reference_tokenizer(source: Path, pre: str, bos: int | None) -> Tokenizer:
    """What the model's own tokenizer.json is for this pre-tokenizer type."""
    tok = Tokenizer.from_file(str(source))
    spec = json.loads(tok.to_str())
    if pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    elif pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    else:
        raise ValueError(pre)
    if bos is not None:
        token = tok.id_to_token(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B", special_tokens=[(token, bos)])
    return tok


def write_case(name: str, source_name: str, arch: str, pre: str, add_bos: bool, rng) -> None:
    source = MODELS / source_name
    cfg = json.loads((source / "config.json").read_text())
    weights = load_file(str(source / "model.safetensors"))
    tok_spec = json.loads((source / "tokenizer.json").read_text())
    vocab = tok_spec["model"]["vocab"]
    tokens = [None] * cfg["vocab_size"]
    for text, i in vocab.items():
        tokens[i] = text
    special = {t["id"] for t in tok_spec["added_tokens"] if t["special"]}
    assert all(t is not None for t in tokens), "the vocabulary must fill vocab_size"
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok_spec["model"]["merges"]]

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    path = OUT / f"{name}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"peft-burn fixture {name}")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    if add_bos:
        writer.add_bos_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    quant_cycle = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16]
    for i, hf in enumerate(sorted(weights)):
        w = weights[hf].astype(np.float32)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            w = permute(w, heads, heads if ".q_proj." in hf else kv_heads)
        name_out = gguf_name(hf)
        if w.ndim == 1:
            writer.add_tensor(name_out, w)
            continue
        qtype = Q.Q8_0 if hf == "model.embed_tokens.weight" else quant_cycle[i % len(quant_cycle)]
        if qtype == Q.F16:
            writer.add_tensor(name_out, w.astype(np.float16))
        else:
            writer.add_tensor(name_out, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # transformers' GGUF loader: dequantizes, undoes the permutation, reads the config. It
    # ignores `qwen3.attention.key_length` (a head_dim other than hidden / heads) and Llama's
    # biases (its config says no bias and the bias tensors are dropped), so for those two the
    # folder's config is passed in; the Rust test compares configs itself.
    extra = {"config": AutoConfig.from_pretrained(str(source))} if arch != "qwen2" else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(OUT), gguf_file=path.name, dtype=torch.float32, **extra).eval()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    # Every tensor came back, in its place: close to the original up to quantization (a q/k row
    # permutation left undone or a dropped bias would be far off).
    assert sorted(state) == sorted(weights), (sorted(set(state) ^ set(weights)))
    for k, w in weights.items():
        err = np.abs(state[k] - w).max() / max(np.abs(w).max(), 1e-6)
        assert err < 0.15, (name, k, err)
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    save_file(state, str(folder / "model.safetensors"))
    input_ids = torch.tensor(rng.integers(1, cfg["vocab_size"], size=(2, 7)))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    save_file({"input_ids": input_ids.numpy().astype(np.int64), "logits": logits.numpy()},
              str(OUT / f"{name}.expected.safetensors"))

    tok = reference_tokenizer(source / "tokenizer.json", pre, 0 if add_bos else None)
    ids = {text: tok.encode(text).ids for text in TEXTS}
    decoded = {text: tok.decode(tok.encode(text).ids, skip_special_tokens=False) for text in TEXTS}
    (OUT / f"{name}.tokens.json").write_text(json.dumps(
        {"pre": pre, "add_bos": add_bos, "ids": ids, "decoded": decoded}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), {folder}, expected logits and token ids")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    for name, (source, arch, pre, add_bos) in CASES.items():
        write_case(name, source, arch, pre, add_bos, rng)


if __name__ == "__main__":
    main()
