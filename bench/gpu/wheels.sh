#!/usr/bin/env bash
# Run HERE (a machine with PyPI), in the repository root, before a GPU run: downloads into .whl/ the wheels
# the GPU machine lacks (its image has torch 2.11.0, triton 3.6.0, numpy, safetensors, tokenizers, pytest) and
# keeps .whl/ out of git. Take .whl/ along with the checkout to the GPU machine.
#   gguf          - the pack's GGUF types and gguf-py's reference decoder (the CUDA tests compare against it)
#   bitsandbytes  - the benchmark's NF4 baseline (43 MB; leave it out with NO_NF4=1 to save transfer)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
wheels=("gguf==0.19.0")
[ "${NO_NF4:-0}" = 1 ] || wheels+=("bitsandbytes==0.50.2")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${wheels[@]}"
ls -l .whl
