#!/usr/bin/env python3
"""Chat templates rendered and tokenized by transformers, for the chat-row tests.

    .venv/bin/python scripts/make_chat_fixtures.py      # rewrites fixtures/expected/chat/

Three templates in the styles models ship (ChatML as Qwen's, Llama 3's headers with `bos_token`
and `| trim`, and a Mistral-style one using `.strip()`, `loop` and `raise_exception`), applied by
transformers' `apply_chat_template` to a few conversations with the fixture tokenizer: the rendered
text and the ids, for training (whole conversation) and for inference (all but the last assistant
turn, with the generation prompt), or the exception a template raises.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "expected" / "chat"

TEMPLATES = {
    "chatml": (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- raise_exception('System role not supported') }}"
        "{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'].strip() + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'].strip() + eos_token }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
}

CONVERSATIONS = [
    [
        {"role": "system", "content": "You sort the letters of a word."},
        {"role": "user", "content": "Sort: tea"},
        {"role": "assistant", "content": "aet"},
        {"role": "user", "content": " Sort: bob "},
        {"role": "assistant", "content": "bbo"},
    ],
    [
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "Hello! Once upon a time there was a tiny transformer."},
    ],
]


def main():
    if transformers.__version__ != "5.23.0":
        sys.exit(f"needs transformers 5.23.0, found {transformers.__version__}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(ROOT / "fixtures/models/qwen2-gqa-tied/tokenizer.json"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    OUT.mkdir(parents=True, exist_ok=True)
    for name, source in TEMPLATES.items():
        cases = []
        for messages in CONVERSATIONS:
            case = {"messages": messages}
            try:
                case["text"] = tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)
                case["ids"] = tokenizer.apply_chat_template(messages, chat_template=source, tokenize=True, return_dict=False)
                prompt = messages[:-1]
                case["prompt_text"] = tokenizer.apply_chat_template(
                    prompt, chat_template=source, tokenize=False, add_generation_prompt=True)
                case["prompt_ids"] = tokenizer.apply_chat_template(
                    prompt, chat_template=source, tokenize=True, add_generation_prompt=True, return_dict=False)
            except Exception as e:  # the template's raise_exception
                case["error"] = str(e)
            cases.append(case)
        (OUT / f"{name}.jinja").write_text(source)
        (OUT / f"{name}.json").write_text(json.dumps({
            "transformers": transformers.__version__,
            "special_tokens": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
            "cases": cases,
        }, indent=1) + "\n")
        print(name, [("error: " + c["error"]) if "error" in c else len(c["ids"]) for c in cases])


if __name__ == "__main__":
    main()
