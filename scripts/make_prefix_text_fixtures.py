#!/usr/bin/env python3
"""Records PEFT's prefix-from-text initialization on the tiny fixture models.

Run after make_fixtures.py, with the same pinned stack (scripts/requirements.txt):

    .venv/bin/python scripts/make_prefix_text_fixtures.py

For each model it builds a P-tuning v2 adapter (PREFIX_TUNING without projection, 4 virtual
tokens) and calls PEFT 0.21's `initialize_kv_prefix_from_text` twice: through a ChatML chat
template (the text as a system message: PEFT's default) and plainly (`use_chat_template=False`).
`fixtures/expected/prefix-init-text/<model>.safetensors` holds, for each, the token ids PEFT
prefilled (`chat_input_ids`, `plain_input_ids`, [1, seq]) and the prefix it loaded
(`chat_prompt_embeddings`, `plain_prompt_embeddings`, [4, layers * 2 * token_dim]). The template
is written beside them as `chat_template.jinja` (the fixture models have none of their own).
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model
from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

PINNED = {"peft": "0.21.2", "torch": "2.15.0", "transformers": "5.23.0"}
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "expected" / "prefix-init-text"
MODELS = ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"]
NUM_VIRTUAL = 4
TEXT = "  You sort the letters of a word.  "
# SmolLM2's template (ChatML with a default system prompt), with a Python string method in it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def main():
    for name, version in PINNED.items():
        found = {"peft": peft, "torch": torch, "transformers": transformers}[name].__version__
        if found.split("+")[0] != version:
            raise SystemExit(f"{name} {found} is installed; the fixtures pin {version}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for model_name in MODELS:
        directory = FIXTURES / "models" / model_name
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
        tokenizer.chat_template = CHAT_TEMPLATE
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        model = get_peft_model(
            base,
            PrefixTuningConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, prefix_projection=False
            ),
        )
        model.eval()
        tensors = {}
        for kind, use_chat in (("chat", True), ("plain", False)):
            if use_chat:
                ids = tokenizer.apply_chat_template(
                    [{"role": "system", "content": TEXT}],
                    tokenize=True,
                    add_generation_prompt=False,
                    return_dict=False,
                    return_tensors="pt",
                )
            else:
                ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
            prefix = initialize_kv_prefix_from_text(model, tokenizer, text=TEXT, use_chat_template=use_chat)
            loaded = model.prompt_encoder["default"].embedding.weight.detach()
            assert torch.equal(prefix, loaded)
            tensors[f"{kind}_input_ids"] = ids.to(torch.int64).contiguous()
            tensors[f"{kind}_prompt_embeddings"] = prefix.to(torch.float32).contiguous()
        save_file(tensors, str(OUT / f"{model_name}.safetensors"))
        print(model_name, {k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()
