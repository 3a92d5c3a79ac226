#!/usr/bin/env bash
# Run ON THE GPU MACHINE, in the repository root: the GPU performance measurements (docs/PERF.md) in the order
# they matter. Each stage's log and JSON go to $RESULTS, and after every stage $OUT gets a fresh results.tar.gz of
# all of them plus stages.txt (two files: a device call brings back at most 8), so a call cut short still returns
# what finished.
# Unpack here with `tar -xzf results.tar.gz`.
#
#   bash bench/gpu/session.sh [STAGE ...]   stages: see ALL below (default: all of them, in that order)
#
# Typical call (run bench/gpu/wheels.sh here first and take .whl/ along with the checkout), limited to 600 s:
#   timeout 570 bash bench/gpu/session.sh
# then, if stages are missing, a second call with just those (the synthetic model files stay cached under
# $IDEOGRAM4_BENCH_CACHE only while the machine is warm: 30 s after a call).
#
# Stage times expected on an H100 (computed, not measured): env+tests ~2 min, bandwidth ~1 min (30 kernel x
# launch shapes to compile), q4k ~3 min (builds the 10.4 GB GGUF once), dense ~4 min (writes the 37 GB bf16 folder once,
# quantizes NF4), memory ~2 min, card12 / card8 ~1 min each.
set -u
OUT=${OUT:-$PWD/gpu_out}
RESULTS=${RESULTS:-/tmp/ideogram4_gpu_session}
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
ALL=(env tests bandwidth q4k card12 card8 dense memory)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${ALL[@]}")

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The benchmarks import the pack by its installed name (bench/README.md); nothing installs it on the GPU machine,
# so a link named ideogram4_gguf to this checkout goes first on the path.
PACK_LINK=${TMPDIR:-/tmp}/ideogram4_pack
mkdir -p "$PACK_LINK" && ln -sfn "$PWD" "$PACK_LINK/ideogram4_gguf" \
    && export PYTHONPATH=$PACK_LINK${PYTHONPATH:+:$PYTHONPATH}

stage() {  # stage NAME COMMAND...: run it, tee its log into $RESULTS, record its wall time and exit status
    local name=$1; shift
    local started=$SECONDS
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc in $((SECONDS - started)) s" | tee -a "$RESULTS/stages.txt"
    tar -czf "$OUT/results.tar.gz.part" -C "$RESULTS" . && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    cp "$RESULTS/stages.txt" "$OUT/stages.txt"
}

bench() { $PY bench/bench_pipeline.py "$@"; }

for s in "${stages[@]}"; do
    case $s in
        env) stage env bash -c "nvidia-smi; $PY -c 'import torch, triton, gguf, ideogram4_gguf; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), triton.__version__)'; \
$PY -c 'import bitsandbytes as b; print(\"bitsandbytes\", b.__version__)'; df -h . /tmp ~; free -g; nproc" ;;
        tests) stage tests $PY -m pytest -q -p no:cacheprovider -rs tests/ops/test_cuda_kernels.py \
            tests/ops/test_dequant.py tests/ops/test_linear.py tests/ops/test_triton_dequant.py \
            tests/models/test_residency.py tests/bench tests/test_pipeline.py ;;
        bandwidth) stage bandwidth bench --sections bandwidth --formats q4_k --json "$RESULTS/bandwidth.json" ;;
        q4k) stage q4k bench --sections load steps --formats q4_k --dequant-ahead --json "$RESULTS/q4k.json" ;;
        # the baseline in the same run: Q4_K resident next to bf16 dense and NF4
        dense) stage dense bench --sections steps --formats q4_k bf16 nf4 --modes gpu --json "$RESULTS/dense.json" ;;
        memory) stage memory bench --sections memory --formats q4_k --json "$RESULTS/memory.json" ;;
        # the VRAM targets on the cards they are about: allocations past 12 / 8 GB fail, the decode plans for them
        card12) stage card12 bench --sections memory --formats q4_k --modes gpu --memory-sizes 1024 --card-gb 12 --json "$RESULTS/card12.json" ;;
        card8) stage card8 bench --sections memory --formats q4_k --modes stream_uncond --memory-sizes 1024 --card-gb 8 --json "$RESULTS/card8.json" ;;
        *) echo "unknown stage $s (${ALL[*]})"; exit 2 ;;
    esac
done
cat "$RESULTS/stages.txt"
