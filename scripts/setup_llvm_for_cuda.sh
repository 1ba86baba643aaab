#!/usr/bin/env bash
# Makes `--features cuda` build without network access to GitHub.
#
# burn's CUDA backend (cubecl-cuda 0.11) links LLVM 23.1 through cubecl-llvm, whose build script
# (tracel-llvm-bundler 23.1.0-4) downloads a prebuilt LLVM from GitHub unless it finds one in
# ~/.local/share/tracel/tracel-llvm-23.1.0-4 (marked by a `.tracel-llvm-installed` file). This
# script builds that directory from two PyPI wheels instead: mlc-llvm-static (LLVM 23.1.1 static
# libraries, headers and an llvm-config) and mlc-llvm-static-extra-targets (the other backends,
# NVPTX among them). About 90 MB to download, 400 MB unpacked.
#
#   bash scripts/setup_llvm_for_cuda.sh [PREFIX]     # default PREFIX: ~/.cache/peft-burn/llvm23
#   cargo build --release -p xtask --no-default-features --features cuda
set -euo pipefail

prefix="${1:-${HOME}/.cache/peft-burn/llvm23}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m pip download --no-deps -d "$work/wheels" \
    mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/unpacked"
done

rm -rf "$prefix.partial"
mkdir -p "$prefix.partial"
# Both wheels unpack under mlc_llvm_static/static/; the second adds libraries to the first.
cp -a "$work/unpacked/mlc_llvm_static/static/." "$prefix.partial/"
chmod +x "$prefix.partial/bin/llvm-config"
"$prefix.partial/bin/llvm-config" --targets-built | grep -q NVPTX \
    || { echo "error: the LLVM libraries lack the NVPTX target" >&2; exit 1; }
rm -rf "$prefix"
mv "$prefix.partial" "$prefix"
touch "$prefix/.tracel-llvm-installed"

tracel="${XDG_DATA_HOME:-$HOME/.local/share}/tracel"
mkdir -p "$tracel"
ln -sfn "$prefix" "$tracel/tracel-llvm-23.1.0-4"
echo "LLVM $("$prefix/bin/llvm-config" --version) in $prefix, linked from $tracel/tracel-llvm-23.1.0-4"
