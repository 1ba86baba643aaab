#!/usr/bin/env python3
"""Builds PEFT adapters on the tiny fixture models and records what PEFT computes with them.

Run after make_fixtures.py, with the same pinned stack (scripts/requirements.txt):

    .venv/bin/python scripts/make_adapter_fixtures.py

For each (model, method) it writes `fixtures/adapters/<model>/<method>/` (PEFT's own
`save_pretrained` output: adapter_config.json + adapter_model.safetensors) and
`fixtures/expected/adapters/<model>-<method>.safetensors` holding the batch used (input_ids,
attention_mask, labels), PEFT's logits for the real tokens, its loss, and the inference tensor
`prompt_embeddings` after one plain SGD step (lr 0.1) on that loss.

Methods with a trainable encoder (P-tuning MLP / LSTM, prefix tuning with and without projection)
also get `adapter_encoder.safetensors` in their adapter directory: the encoder's PyTorch
state_dict before the step (PEFT itself only saves the encoder's output, `prompt_embeddings`), and
`after_sgd.<name>` for each encoder parameter after the step in the expected file.

Every prompt-learning entry gets greedy continuations from PEFT's `generate` (trainable encoder,
eval mode), batch of one, 8 new tokens: `greedy_prompts` [3, 5] and `greedy_tokens` [3, 8]. For
prompt tuning they go in `<model>-prompt-tuning-greedy.safetensors` so that the older file stays as
it was; for the others in the method's expected file. Each greedy run is cross-checked against a
manual loop (full forward of prompt + tokens so far, argmax of the last position), and the JSON side
file records the loss and the top-1 / top-2 gap of the raw logits at every step (and the smallest).

BitFit has no PEFT type: it is done in plain PyTorch on the base model (biases trainable, perturbed
with seeded noise so the adapter differs from the checkpoint), and saved in our own format,
`adapter_config.json` with `"peft_type": "BITFIT"` + the biases under their Hugging Face names.
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

PINNED = {"peft": "0.21.2", "torch": "2.15.0", "transformers": "5.23.0"}
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MODELS = ["qwen2-gqa-tied", "llama-mqa-sharded", "bloom-6-heads",
          # Issue 20: Qwen3 (explicit head_dim), Llama 3.x RoPE, Mistral's sliding window.
          "qwen3-tied", "llama3-rope", "mistral-window"]
# Qwen3's biased variant; Llama 3 and Mistral checkpoints have no biases for BitFit to train.
BITFIT_MODELS = ["qwen2-gqa-tied", "llama-biases", "bloom-6-heads", "qwen3-window"]
NUM_VIRTUAL = 4
LR = 0.1
GREEDY_NEW = 8
PROMPT_LEN = 5


def methods():
    return {
        "prompt-tuning": PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, prompt_tuning_init="RANDOM"
        ),
        "p-tuning-mlp": PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL,
            encoder_reparameterization_type="MLP", encoder_hidden_size=24,
        ),
        # Bidirectional 2-layer LSTM (encoder_num_layers 2 and encoder_dropout 0.0 are PEFT's defaults).
        "p-tuning-lstm": PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL,
            encoder_reparameterization_type="LSTM", encoder_hidden_size=12,
        ),
        "prefix-tuning": PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, prefix_projection=True,
            encoder_hidden_size=20,
        ),
        "p-tuning-v2": PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=NUM_VIRTUAL, prefix_projection=False
        ),
    }


def batch(model_name):
    expected = load_file(FIXTURES / "expected" / f"{model_name}.safetensors")
    input_ids = expected["input_ids"]
    # Row 1 right-padded by 3 (mask 0); labels ignore each row's first 3 tokens and the padding.
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    # The expected files hold two rows of 11 tokens: the greedy prompts are the first 5 tokens of
    # each row and the last 5 of row 0, none padded.
    prompts = torch.stack([input_ids[0, :PROMPT_LEN], input_ids[1, :PROMPT_LEN], input_ids[0, -PROMPT_LEN:]])
    return input_ids, attention_mask, labels, prompts.contiguous()


@torch.no_grad()
def greedy(model, prompts):
    """Greedy continuations with `model.generate` (PEFT's when `model` is a PeftModel), one prompt at a
    time, checked against a manual loop. Returns the new tokens [n, GREEDY_NEW] and the gap between the
    best and second-best raw logit at each step [n][GREEDY_NEW]."""
    rows, gaps = [], []
    for prompt in prompts:
        ids = prompt[None]
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW, do_sample=False, output_scores=True, output_logits=True,
            return_dict_in_generate=True,
        )
        new = out.sequences[0, ids.shape[1]:]
        assert new.shape[0] == GREEDY_NEW, out.sequences
        gaps.append([])
        # Raw logits: min_new_tokens masks EOS in the scores; make sure it never had to.
        for step, logits in enumerate(out.logits):
            assert int(logits[0].argmax()) == int(new[step]), "EOS suppressed by min_new_tokens"
            top = logits[0].topk(2).values
            gaps[-1].append(round(float(top[0] - top[1]), 6))
        # The same by hand: full forward of the prompt and the tokens so far, argmax at the last position.
        seq = ids
        for _ in range(GREEDY_NEW):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(seq[0, ids.shape[1]:], new), (seq, new)
        rows.append(new)
    return torch.stack(rows).to(torch.int64).contiguous(), gaps


def rewrite_config(out_dir, model_name):
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"fixtures/models/{model_name}"  # not this machine's path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_side(path, loss, gaps):
    # Per-step gaps too: a test may stop comparing a row after a step whose gap is tiny.
    meta = {
        "loss": loss, "min_top2_gap": min(min(row) for row in gaps), "top2_gaps": gaps,
        "greedy_new_tokens": GREEDY_NEW, "lr": LR,
        "peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def prompt_learning(model_name, method, config, out_expected):
    input_ids, attention_mask, labels, prompts = batch(model_name)
    torch.manual_seed(sum(map(ord, model_name + method)))
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "models" / model_name, dtype=torch.float32)
    model = get_peft_model(base, config)
    encoder = model.prompt_encoder["default"]
    if method != "prompt-tuning":
        # PEFT's init is random for all of these (nn.Embedding / nn.Linear / nn.LSTM defaults; prefix
        # tuning's init_weights is None, not "zero"). Should a parameter still be all zero, perturb it
        # with seeded noise so the test compares something.
        for name, p in encoder.named_parameters():
            if not p.detach().any():
                print(f"  {name} is all zero: adding 0.1 * randn")
                with torch.no_grad():
                    p += 0.1 * torch.randn_like(p)
    model.eval()  # no dropout; gradients still flow
    out_dir = FIXTURES / "adapters" / model_name / method
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink()  # PEFT's model-card template: nothing to test
    rewrite_config(out_dir, model_name)
    if method != "prompt-tuning":
        state = {k: v.detach().float().contiguous().clone() for k, v in encoder.state_dict().items()}
        save_file(state, out_dir / "adapter_encoder.safetensors", metadata={"format": "pt"})

    tokens, gap = greedy(model, prompts)

    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    n = output.logits.shape[1] - input_ids.shape[1]
    output.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= LR * p.grad
        after = model.get_prompt_embedding_to_save(adapter_name="default")
    tensors = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": output.logits[:, n:].detach().float().contiguous(),
        "loss": output.loss.detach().reshape(1).float(),
        "prompt_embeddings_after_sgd": after.detach().float().contiguous(),
    }
    greedy_tensors = {"greedy_prompts": prompts, "greedy_tokens": tokens}
    if method == "prompt-tuning":
        # The older file stays byte-identical; the greedy continuations get their own.
        save_file(tensors, out_expected / f"{model_name}-{method}.safetensors")
        save_file(greedy_tensors, out_expected / f"{model_name}-{method}-greedy.safetensors")
    else:
        for k, v in encoder.state_dict().items():
            tensors[f"after_sgd.{k}"] = v.detach().float().contiguous().clone()
        save_file({**tensors, **greedy_tensors}, out_expected / f"{model_name}-{method}.safetensors")
    write_side(out_expected / f"{model_name}-{method}.json", output.loss.item(), gap)
    print(f"{model_name:20} {method:16} loss {output.loss.item():.6f}  virtual tokens {n}  "
          f"prompt_embeddings {tuple(after.shape)}  min top-2 gap {min(min(r) for r in gap):.4f}  "
          f"greedy {tokens[0].tolist()}")


def bitfit(model_name, out_expected):
    method = "bitfit"
    input_ids, attention_mask, labels, prompts = batch(model_name)
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / "models" / model_name, dtype=torch.float32)
    model.eval()  # no dropout; gradients still flow
    biases = {}
    for name, p in model.named_parameters():
        p.requires_grad_("bias" in name)
        if "bias" in name:
            biases[name] = p
    # The fixture checkpoints' biases are all zero (transformers' init): perturb them so the adapter
    # differs from the base model.
    torch.manual_seed(sum(map(ord, model_name + method)))
    with torch.no_grad():
        for p in biases.values():
            p += 0.05 * torch.randn_like(p)
    out_dir = FIXTURES / "adapters" / model_name / method
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cfg = {
        "peft_type": "BITFIT", "task_type": "CAUSAL_LM", "base_model_name_or_path": f"fixtures/models/{model_name}",
        "bias_pattern": None, "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(
        {k: v.detach().float().contiguous().clone() for k, v in biases.items()},
        out_dir / "adapter_model.safetensors", metadata={"format": "pt"},
    )

    tokens, gap = greedy(model, prompts)

    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    output.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= LR * p.grad
    tensors = {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "labels": labels.contiguous(),
        "logits": output.logits.detach().float().contiguous(),
        "loss": output.loss.detach().reshape(1).float(),
        "greedy_prompts": prompts,
        "greedy_tokens": tokens,
    }
    for k, v in biases.items():
        tensors[f"after_sgd.{k}"] = v.detach().float().contiguous().clone()
    save_file(tensors, out_expected / f"{model_name}-{method}.safetensors")
    write_side(out_expected / f"{model_name}-{method}.json", output.loss.item(), gap)
    print(f"{model_name:20} {method:16} loss {output.loss.item():.6f}  biases {len(biases)}  "
          f"min top-2 gap {min(min(r) for r in gap):.4f}  greedy {tokens[0].tolist()}")


def main():
    found = {"peft": peft.__version__, "torch": torch.__version__.split("+")[0],
             "transformers": transformers.__version__}
    if found != PINNED:
        sys.exit(f"needs {PINNED}, found {found}: pip install -r scripts/requirements.txt")
    torch.set_num_threads(2)
    out_expected = FIXTURES / "expected" / "adapters"
    out_expected.mkdir(parents=True, exist_ok=True)
    # `--models a,b` remakes only those models' fixtures (the others keep their committed bytes).
    only = None
    if len(sys.argv) == 3 and sys.argv[1] == "--models":
        only = set(sys.argv[2].split(","))
    for model_name in MODELS:
        if only is None or model_name in only:
            for method, config in methods().items():
                prompt_learning(model_name, method, config, out_expected)
    for model_name in BITFIT_MODELS:
        if only is None or model_name in only:
            bitfit(model_name, out_expected)


if __name__ == "__main__":
    main()
