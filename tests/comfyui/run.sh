#!/usr/bin/env bash
# make test-comfyui: the real-ComfyUI tests (tests/comfyui) against ComfyUI's own source.
#
#   COMFYUI_DIR        an existing ComfyUI checkout to test against (then nothing is unpacked), or
#   COMFYUI_TARBALL    a ComfyUI source tarball (ComfyUI >= 0.25; tested with 0.29.0), unpacked into a temporary
#                      folder for each run. One of the two is required (CI passes the tarball it has).
#   COMFYUI_PYTHON     the Python that runs ComfyUI; default: a venv with ComfyUI's requirements, built once and
#                      cached under $IDEOGRAM4_CACHE (default ~/.cache/ideogram4_gguf) keyed by the requirements.
#   PY                 the suite's Python (pytest runs there; default python3).
#
# The cached venv reuses the suite's torch when ComfyUI's torch imports (torch, torchvision, torchaudio) all
# work with it; otherwise it gets torch 2.14.1 + torchvision 0.29.1, the pair ComfyUI 0.29.0 was run with here.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-python3}"
CACHE="${IDEOGRAM4_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ideogram4_gguf}/comfyui"
say() { echo "test-comfyui: $*"; }

if [[ -z "${COMFYUI_DIR:-}" ]]; then
    TARBALL="${COMFYUI_TARBALL:-}"
    if [[ -z "$TARBALL" || ! -f "$TARBALL" ]]; then
        say "no ComfyUI source: set COMFYUI_DIR to a checkout or COMFYUI_TARBALL to a source tarball" >&2
        exit 2
    fi
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/ideogram4-comfyui.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
    tar -xzf "$TARBALL" -C "$WORK"
    COMFYUI_DIR="$(dirname "$(ls -1 "$WORK"/*/main.py | head -n 1)")"
    say "unpacked $(basename "$TARBALL") into $COMFYUI_DIR"
fi
[[ -f "$COMFYUI_DIR/main.py" && -f "$COMFYUI_DIR/requirements.txt" ]] || { say "$COMFYUI_DIR is not a ComfyUI checkout" >&2; exit 2; }

if [[ -z "${COMFYUI_PYTHON:-}" ]]; then
    SUITE_TORCH="$("$PY" - <<'PYEOF' 2>/dev/null || true
import torch, torchvision, torchaudio  # noqa: F401  (ComfyUI imports all three at start-up)
import torchvision.ops
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # fails on a torchvision built for another torch
print(torch.__version__)
PYEOF
)"
    KEY="$( (cat "$COMFYUI_DIR/requirements.txt" "$ROOT/requirements.txt"; "$PY" -c 'import sys; print(sys.version)'; echo "suite-torch=$SUITE_TORCH") | sha256sum | cut -c1-16)"
    VENV="$CACHE/venv-$KEY"
    if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/.complete" ]]; then
        rm -rf "$VENV"
        mkdir -p "$CACHE"
        say "building ComfyUI's venv in $VENV (once; about two minutes)"
        "$PY" -m venv "$VENV"
        if [[ -n "$SUITE_TORCH" ]]; then
            say "reusing the suite's torch $SUITE_TORCH"
            "$PY" -c 'import site; print(site.getsitepackages()[0])' > "$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/suite_torch.pth"
            PINS=("torch==$SUITE_TORCH")
        else
            say "the suite's torch does not run ComfyUI's torchvision/torchaudio imports: installing torch 2.14.1 + torchvision 0.29.1"
            "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
            PINS=("torch==2.14.1" "torchvision==0.29.1")
        fi
        printf '%s\n' "${PINS[@]}" > "$VENV/pins.txt"
        "$VENV/bin/python" -m pip install -q -r "$COMFYUI_DIR/requirements.txt" -c "$VENV/pins.txt"
        # what ComfyUI-Manager installs for the pack (its requirements.txt; never torch)
        "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" -c "$VENV/pins.txt"
        touch "$VENV/.complete"
    fi
    COMFYUI_PYTHON="$VENV/bin/python"
fi

# comfy-cli, for `comfy node validate` (the Registry's own check of the packaging); its own small venv.
if [[ -z "${COMFY_CLI:-}" ]]; then
    CLI_VENV="$CACHE/comfy-cli-1.23.0"
    if [[ ! -x "$CLI_VENV/bin/comfy" || ! -f "$CLI_VENV/.complete" ]]; then
        rm -rf "$CLI_VENV"
        mkdir -p "$CACHE"
        "$PY" -m venv "$CLI_VENV"
        "$CLI_VENV/bin/python" -m pip install -q "comfy-cli==1.23.0" ruff
        touch "$CLI_VENV/.complete"
    fi
    COMFY_CLI="$CLI_VENV/bin/comfy"
fi

say "ComfyUI $COMFYUI_DIR, Python $COMFYUI_PYTHON, comfy-cli $COMFY_CLI"
cd "$ROOT"
COMFYUI_DIR="$COMFYUI_DIR" COMFYUI_PYTHON="$COMFYUI_PYTHON" COMFY_CLI="$COMFY_CLI" IDEOGRAM4_REQUIRE_COMFYUI=1 \
    "$PY" -m pytest tests/comfyui "$@"
