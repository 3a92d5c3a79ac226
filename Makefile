# The two set-up commands of the README. Both work on a fresh machine with Python >= 3.10:
#   make demo   - install the pack and run the embedded tiny-model demo on the CPU
#   make test   - install the pack with its test references and run the test suite
# torch is installed only when it is missing (the CPU wheel torch==2.13.0); an existing torch is kept.
PY ?= python3

.PHONY: demo test torch

torch:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0

demo: torch
	$(PY) -m pip install -e . && $(PY) -m ideogram4_gguf demo --out demo.png

test: torch
	$(PY) -m pip install -e ".[test]" && $(PY) -m pytest
