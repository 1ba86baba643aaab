#!/usr/bin/env bash
# The device call of a GPU session (docs/gpu.md): unpacks the carried CUDA build of xtask, writes
# what the machine is, and runs `gpu-check` within a time budget, its log beside its results.
#
#   run(command = "bash scripts/gpu_session.sh",
#       carry = ["target/gpu/xtask-cuda.xz", "target/gpu/COMMIT"], timeout_s = 480)
#   run(command = "bash scripts/gpu_session.sh --sections bench", timeout_s = 300)  # what was skipped
#
# Arguments go to gpu-check. BUDGET_S (default 360) is the second after which no further check
# starts: with the device tool's 15 minutes per session, a first call of 480 s leaves time for a
# second one on the still-warm machine. Everything lands in $OUT (else gpu-check/): gpu-check.json,
# gpu-check.md, gpu-check.log and machine.txt, rewritten as the checks go, so that a call cut off
# at its limit still brings back what ran.
set -uo pipefail

out="${OUT:-gpu-check}"
mkdir -p "$out"
bin=target/gpu/xtask-cuda
if [ ! -x "$bin" ]; then
    xz -d -k -f "$bin.xz" || { echo "error: no $bin.xz (carry it: docs/gpu.md)" >&2; exit 1; }
fi

# cudarc loads NCCL by the names libnccl.so / libnccl.so.<cuda major>; the pip wheel beside torch
# ships libnccl.so.2. Only --gradient-sync all-reduce on several GPUs needs it.
nccl="$(python3 - <<'EOF' 2>/dev/null
import glob, os, site
for root in site.getsitepackages():
    for path in glob.glob(os.path.join(root, "nvidia", "**", "libnccl.so*"), recursive=True):
        print(path)
        raise SystemExit
EOF
)"
if [ -n "$nccl" ]; then
    mkdir -p /tmp/nccl && ln -sf "$nccl" /tmp/nccl/libnccl.so
    export LD_LIBRARY_PATH="/tmp/nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The commit the binary was built from (the working tree travels without .git).
if [ -f target/gpu/COMMIT ]; then
    export PEFT_COMMIT="$(cat target/gpu/COMMIT)"
fi
# The bench's torch side builds its models from local configs: nothing to fetch.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    lscpu | grep -E '^(Model name|CPU\(s\)|Flags)' | cut -c1-400
    python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
    echo "nccl: ${nccl:-not found}"
    echo "built from commit ${PEFT_COMMIT:-unknown}"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

"$bin" gpu-check --budget-s "${BUDGET_S:-360}" "$@" 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
