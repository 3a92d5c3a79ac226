# The README's set-up commands. They work on a fresh machine with Python >= 3.10:
#   make demo          - install the pack and run the embedded tiny-model demo on the CPU
#   make test          - install the pack with its test references and run the test suite
#   make test-comfyui  - (optional) the end-to-end tests inside a real ComfyUI (tests/comfyui/run.sh)
#
# Where they install: inside an active virtual environment (venv, virtualenv, conda) into that environment;
# otherwise into ./.venv, created on first use -- so a distribution's own Python (PEP 668, "externally managed")
# is never touched. PY=/path/to/python picks the interpreter explicitly.
#
# torch is installed only when it is missing: $(TORCH) from pip's configured index (PyPI: on Linux x86-64 the
# CUDA build, ~2.7 GB with its NVIDIA libraries). For the ~190 MB CPU-only build:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
SYSTEM_PY ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv

IN_ENV := $(shell $(SYSTEM_PY) -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or bool(os.environ.get("CONDA_PREFIX"))))' 2>/dev/null)
ifeq ($(IN_ENV),1)
PY ?= $(SYSTEM_PY)
else
PY ?= $(VENV)/bin/python
endif

.PHONY: demo test test-comfyui env

env:
	@if [ "$(PY)" = "$(VENV)/bin/python" ] && [ ! -x "$(VENV)/bin/python" ]; then \
		echo "make: no virtual environment active: creating $(VENV) (the pack and its dependencies go there)"; \
		$(SYSTEM_PY) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(SYSTEM_PY) -m venv' failed. On Debian/Ubuntu: sudo apt install python3-venv, then run make again." >&2; exit 1; }; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || { echo "make: installing $(TORCH) (once)"; \
		$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"; }

demo: env
	$(PY) -m pip install -q -e .
	$(PY) -m ideogram4_gguf demo --out demo.png

test: env
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pytest

test-comfyui: env
	$(PY) -m pip install -q -e ".[test]"
	PY="$(PY)" bash tests/comfyui/run.sh
