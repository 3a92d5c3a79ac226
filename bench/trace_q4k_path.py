"""How much of the pack a newcomer reads on the Q4_K path: the pack's files and distinct source lines that run while
`pipeline.load_model` loads a two-branch Q4_K GGUF on the CPU and every Q4_K Linear of the conditional branch is
called once (so each dequantizes). Used for the redesign's "fewer files and lines" measure (docs/PERF.md).

    python bench/trace_q4k_path.py [DIT.gguf] [--show FILE]   # default: the demo's tiny DiT (built when missing)

Prints JSON: files, lines, and the executed-line count per file (paths relative to the pack); --show FILE lists
that file's executed lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from ideogram4_gguf import pipeline


def trace(dit_path: str) -> dict[str, set[int]]:
    root = os.path.dirname(os.path.realpath(pipeline.__file__))
    seen: dict[str, set[int]] = {}

    def tracer(frame, event, arg):
        name = frame.f_code.co_filename
        if name.startswith("<"):
            return None
        path = os.path.realpath(name)
        if not path.startswith(root + os.sep) or f"{os.sep}.venv{os.sep}" in path:
            return None
        if event == "line":
            seen.setdefault(os.path.relpath(path, root), set()).add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        model = pipeline.load_model(dit_path, device="cpu", compute_dtype="fp32", kernel="torch", memory_mode="gpu")
        for module in model.cond_branch.modules():
            if type(module).__name__ == "QuantLinear":
                module(torch.randn(2, module.in_features))
    finally:
        sys.settrace(None)
    return seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dit", nargs="?", help="a two-branch Q4_K GGUF (default: the demo's)")
    parser.add_argument("--show", help="list the executed lines of this file (relative to the pack)")
    args = parser.parse_args(argv)
    dit = args.dit
    if dit is None:
        from ideogram4_gguf.demo import build_demo_models

        dit = str(build_demo_models(log=lambda line: print(line, file=sys.stderr)).dit)
    seen = trace(dit)
    print(json.dumps({"files": len(seen), "lines": sum(map(len, seen.values())),
                      "per_file": {name: len(lines) for name, lines in sorted(seen.items())}}, indent=1))
    if args.show:
        root = os.path.dirname(os.path.realpath(pipeline.__file__))
        source = open(os.path.join(root, args.show), encoding="utf-8").read().splitlines()
        for line in sorted(seen.get(args.show, ())):
            print(f"{line:5} {source[line - 1]}")


if __name__ == "__main__":
    main()
