#!/usr/bin/env bash
# Ours against torch + PEFT on the SmolLM2 topic task, several seeds: the comparison of
# docs/smollm2.md. Each run trains 4 epochs (batch 8, 16 virtual tokens, AdamW lr 3e-2 without
# weight decay or clipping, linear decay; prefix tuning and BitFit at 1e-3, their defaults, since
# 3e-2 diverges for both) and evaluates before the first step and after the last.
#
#   scripts/smollm2_compare.sh OUT_DIR CASE SEED...
#
# CASE: ptv2 (P-tuning v2, random prefix), ptv2text (prefix from text), ptv2zero (zero prefix;
# the PEFT side zeroes PEFT's prefix by hand), pt (prompt tuning, TEXT init), ptmlp (P-tuning, MLP
# encoder of 256), prefix (prefix tuning, projection, random init), prefixtext (prefix tuning with
# its projection fitted to the text's key/values, ours only: PEFT refuses a projection), prefixzero
# (prefix tuning, zeroed last Linear; on the PEFT side by hand), bitfit (on MODEL_BIASES; the
# other side is a plain torch loop over the same biases: PEFT has no BitFit).
# Environment: PEFT (default target/debug/peft), PYTHON (default .venv/bin/python), MODEL
# (default models/smollm2-135m), MODEL_BIASES (default models/smollm2-135m-biases, from
# scripts/add_zero_biases.py), DATA (default models/smollm2-topics), LR (overrides the case's),
# SIDES (ours, peft or both, the default: which side to run).
# Writes OUT_DIR/CASE-ours-sSEED/ (metrics.jsonl, adapter) and OUT_DIR/CASE-peft-sSEED.json.
set -euo pipefail
out=$1 case=$2
shift 2
PEFT=${PEFT:-target/debug/peft}
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-models/smollm2-135m}
DATA=${DATA:-models/smollm2-topics}
MODEL_BIASES=${MODEL_BIASES:-models/smollm2-135m-biases}
PREFIX_TEXT="Name the topic of the text in one word: ai, coding, emotion, humor, literature, money, psychology, science, sports or trivia."
PROMPT_TEXT="Classify the topic of the text in one word:"
lr=3e-2
case $case in prefix|prefixtext|prefixzero|bitfit) lr=1e-3 ;; esac
lr=${LR:-$lr}
SIDES=${SIDES:-both}
common=(--num-virtual-tokens 16 --lr "$lr" --weight-decay 0 --max-grad-norm 0 --epochs 4 --batch-size 8
    --train "$DATA/train.jsonl" --eval "$DATA/eval.jsonl")
case $case in
    ptv2) ours=(--method p-tuning-v2); theirs=("${ours[@]}") ;;
    ptv2text) ours=(--method p-tuning-v2 --prefix-init-text "$PREFIX_TEXT")
        theirs=(--method p-tuning-v2 --prefix-init text --prefix-init-text "$PREFIX_TEXT") ;;
    ptv2zero) ours=(--method p-tuning-v2 --prefix-zero-init); theirs=(--method p-tuning-v2 --prefix-init zero) ;;
    pt) ours=(--method prompt-tuning --prompt-tuning-init text --prompt-tuning-init-text "$PROMPT_TEXT")
        theirs=("${ours[@]}") ;;
    ptmlp) ours=(--method p-tuning --encoder-hidden-size 256); theirs=("${ours[@]}") ;;
    prefix) ours=(--method prefix-tuning); theirs=("${ours[@]}") ;;
    prefixtext) ours=(--method prefix-tuning --prefix-init-text "$PREFIX_TEXT"); theirs=() ;;
    prefixzero) ours=(--method prefix-tuning --prefix-zero-init); theirs=(--method prefix-tuning --prefix-init zero) ;;
    bitfit) MODEL=$MODEL_BIASES; ours=(--method bitfit); theirs=("${ours[@]}") ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
esac
mkdir -p "$out"
for seed in "$@"; do
    if [ "$SIDES" != peft ]; then
        rm -rf "$out/$case-ours-s$seed"
        # --eval-steps past the last step: evaluate before the first step and after the last only.
        "$PEFT" train --model "$MODEL" "${ours[@]}" "${common[@]}" --seed "$seed" \
            --output "$out/$case-ours-s$seed" --eval-steps 1000000 > "$out/$case-ours-s$seed.log" 2>&1
    fi
    if [ "$SIDES" != ours ] && [ ${#theirs[@]} -gt 0 ]; then
        OMP_NUM_THREADS=2 "$PYTHON" scripts/peft_train.py --model "$MODEL" "${theirs[@]}" "${common[@]}" \
            --seed "$seed" --final-eval-only --output "$out/$case-peft-s$seed.json" > "$out/$case-peft-s$seed.log" 2>&1
    fi
done
