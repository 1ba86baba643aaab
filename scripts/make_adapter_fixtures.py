#!/usr/bin/env python3
"""Builds PEFT adapters on the tiny fixture models and records what PEFT computes with them.

Run after make_fixtures.py, with the same pinned stack (scripts/requirements.txt):

    .venv/bin/python scripts/make_adapter_fixtures.py

For each (model, method) it writes `fixtures/adapters/<model>/<method>/` (PEFT's own
`save_pretrained` output: adapter_config.json + adapter_model.safetensors) and
`fixtures/expected/adapters/<model>-<method>.safetensors` holding the batch used (input_ids,
attention_mask, labels), PEFT's logits for the real tokens, its loss, and the inference tensor
`prompt_embeddings` after one plain SGD step (lr 0.1) on that loss.
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
from peft import PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

PINNED = {"peft": "0.21.2", "torch": "2.15.0"}
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MODELS = ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads"]
NUM_VIRTUAL = 4
LR = 0.1


def methods():
    return {
        "prompt-tuning": PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, prompt_tuning_init="RANDOM"
        ),
    }


def main():
    found = {"peft": peft.__version__, "torch": torch.__version__.split("+")[0]}
    if found != PINNED:
        sys.exit(f"needs {PINNED}, found {found}: pip install -r scripts/requirements.txt")
    torch.set_num_threads(2)
    (FIXTURES / "expected" / "adapters").mkdir(parents=True, exist_ok=True)
    for model_name in MODELS:
        expected = load_file(FIXTURES / "expected" / f"{model_name}.safetensors")
        input_ids = expected["input_ids"]
        # Row 1 right-padded by 3 (mask 0); labels ignore each row's first 3 tokens and the padding.
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, -3:] = 0
        labels = input_ids.clone()
        labels[:, :3] = -100
        labels[attention_mask == 0] = -100
        for method, config in methods().items():
            torch.manual_seed(sum(map(ord, model_name + method)))
            base = AutoModelForCausalLM.from_pretrained(FIXTURES / "models" / model_name, dtype=torch.float32)
            model = get_peft_model(base, config)
            model.eval()  # no dropout; gradients still flow
            out_dir = FIXTURES / "adapters" / model_name / method
            if out_dir.exists():
                shutil.rmtree(out_dir)
            model.save_pretrained(out_dir)
            (out_dir / "README.md").unlink()  # PEFT's model-card template: nothing to test
            cfg_path = out_dir / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = f"fixtures/models/{model_name}"  # not this machine's path
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            n = output.logits.shape[1] - input_ids.shape[1]
            output.loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p -= LR * p.grad
                after = model.get_prompt_embedding_to_save(adapter_name="default")
            save_file(
                {
                    "input_ids": input_ids.contiguous(),
                    "attention_mask": attention_mask.contiguous(),
                    "labels": labels.contiguous(),
                    "logits": output.logits[:, n:].detach().float().contiguous(),
                    "loss": output.loss.detach().reshape(1).float(),
                    "prompt_embeddings_after_sgd": after.detach().float().contiguous(),
                },
                FIXTURES / "expected" / "adapters" / f"{model_name}-{method}.safetensors",
            )
            print(f"{model_name:20} {method:16} loss {output.loss.item():.6f}  virtual tokens {n}")


if __name__ == "__main__":
    main()
