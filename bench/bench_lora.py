"""Run the LoRA benchmark (bench/lora.py) from a source checkout: `python bench/bench_lora.py --help`."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench._pack import import_pack

import_pack()
from ideogram4_gguf.bench.lora import main

if __name__ == "__main__":
    main()
