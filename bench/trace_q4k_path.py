"""How much of the pack a newcomer reads on the Q4_K path: the pack's files and distinct source lines that run while
`pipeline.load_model` loads a two-branch Q4_K GGUF on the CPU and every Q4_K Linear of the conditional branch is
called once (so each dequantizes). Used for the redesign's "fewer files and lines" measure (docs/PERF.md).

    python bench/trace_q4k_path.py [DIT.gguf] [--show FILE]   # default: the demo's tiny DiT (built when missing)
    python bench/trace_q4k_path.py --from-node [NODE_CLASS]   # start at a loader node instead (IG4Loader)

--from-node starts one step earlier, at `Ideogram4 Q4_K Loader`'s `execute` with its defaults (memory mode and
dequant kernel "auto"), the way ComfyUI runs it. It needs ComfyUI's `comfy_api` importable, or the tests' stand-in
for it (tests/nodes/fake_comfy_api.py, loaded from its file when ComfyUI is not there).

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


def trace(dit_path: str, from_node: str | None = None) -> dict[str, set[int]]:
    """Executed lines per pack file; from_node: the class name of a loader node in nodes/loader.py to start at."""
    root = os.path.dirname(os.path.realpath(pipeline.__file__))
    if from_node:
        node = getattr(sys.modules["ideogram4_gguf.nodes.loader"], from_node)

        def load(path):
            return node.execute(dit_name=path).args[0]
    else:
        load = _pipeline_load
    seen: dict[str, set[int]] = {}

    def tracer(frame, event, arg):
        name = frame.f_code.co_filename
        if name.startswith("<"):
            return None
        path = os.path.realpath(name)
        if not path.startswith(root + os.sep) or any(f"{os.sep}{d}{os.sep}" in path[len(root):]
                                                     for d in (".venv", "tests", "bench")):
            return None
        if event == "line":
            seen.setdefault(os.path.relpath(path, root), set()).add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        model = load(dit_path)
        for module in model.cond_branch.modules():
            if type(module).__name__ == "QuantLinear":
                module(torch.randn(2, module.in_features))
    finally:
        sys.settrace(None)
    return seen


def _pipeline_load(dit_path):
    return pipeline.load_model(dit_path, device="cpu", compute_dtype="fp32", kernel="torch", memory_mode="gpu")


def _comfy_api_or_stand_in():
    """The tests' stand-in for `comfy_api.latest`, loaded from its file; its `install` leaves a real ComfyUI be."""
    import importlib.util

    stand_in = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nodes", "fake_comfy_api.py")
    spec = importlib.util.spec_from_file_location("fake_comfy_api", stand_in)
    module = sys.modules["fake_comfy_api"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.install()
    import ideogram4_gguf.nodes.loader  # noqa: F401  (imported before the trace: import-time lines do not count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dit", nargs="?", help="a two-branch Q4_K GGUF (default: the demo's)")
    parser.add_argument("--show", help="list the executed lines of this file (relative to the pack)")
    parser.add_argument("--from-node", nargs="?", const="IG4Loader", metavar="NODE_CLASS",
                        help="start at a loader node's execute (default: IG4Loader, the basic loader; before the "
                             "redesign the loader was IG4ModelLoader)")
    args = parser.parse_args(argv)
    dit = args.dit
    if dit is None:
        from ideogram4_gguf.demo import build_demo_models

        dit = str(build_demo_models(log=lambda line: print(line, file=sys.stderr)).dit)
    if args.from_node:
        _comfy_api_or_stand_in()
    seen = trace(dit, args.from_node)
    print(json.dumps({"files": len(seen), "lines": sum(map(len, seen.values())),
                      "per_file": {name: len(lines) for name, lines in sorted(seen.items())}}, indent=1))
    if args.show:
        root = os.path.dirname(os.path.realpath(pipeline.__file__))
        source = open(os.path.join(root, args.show), encoding="utf-8").read().splitlines()
        for line in sorted(seen.get(args.show, ())):
            print(f"{line:5} {source[line - 1]}")


if __name__ == "__main__":
    main()
