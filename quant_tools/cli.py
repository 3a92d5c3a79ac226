"""Command line: `python -m quant_tools {quantize,verify,inspect,recipes}` (console script `ideogram4-quant`).

    quantize --source PATH [--source-uncond PATH] --recipe NAME|FILE --out FILE.gguf
    verify FILE.gguf --source PATH [--source-uncond PATH]
    inspect FILE.gguf [--all]
    recipes
"""

import argparse
import signal
import sys

from . import __version__
from .errors import QuantToolError

EXIT_FAILED = 1  # verify found a problem
EXIT_ERROR = 2  # bad input: the message says what to fix
EXIT_INTERRUPTED = 130


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ideogram4-quant",
        description="Rebuild Ideogram 4 GGUF files (two-branch Q4_K and other mixes) from the official weights.",
    )
    parser.add_argument("--version", action="version", version=f"quant_tools {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="write a GGUF file from safetensors weights")
    q.add_argument("--source", required=True,
                   help="official repo folder (transformer/ + unconditional_transformer/), or the conditional "
                        "transformer: folder, .safetensors file or *.safetensors.index.json")
    q.add_argument("--source-uncond", help="the unconditional transformer (when --source is one branch)")
    q.add_argument("--recipe", default="q4_k", help="shipped recipe name (q4_k, q4_k_m, q8_0) or a JSON file "
                                                    "(default: q4_k)")
    q.add_argument("--out", required=True, help="output .gguf file")
    q.add_argument("--single-branch", choices=["cond", "uncond"],
                   help="write one branch with bare tensor names (the stable-diffusion.cpp / ComfyUI-GGUF layout)")
    q.add_argument("--threads", type=int, default=None, help="encoder threads (default: CPU count, at most 8)")
    q.add_argument("--force", action="store_true", help="replace an existing output file")
    q.add_argument("--dry-run", action="store_true", help="show what was found and the plan, write nothing")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="decode every tensor and compare with the source weights")
    v.add_argument("file")
    v.add_argument("--source", required=True)
    v.add_argument("--source-uncond")
    v.add_argument("--recipe", help="compare with this recipe instead of the one stored in the file")
    v.add_argument("--branch", choices=["cond", "uncond"], help="which branch a single-branch file holds")
    v.add_argument("--exact", action="store_true", help="also re-quantize the source and compare the bytes (slow)")
    v.add_argument("--no-hash", action="store_true", help="skip the sha256 check of the source files")
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("inspect", help="metadata, branches, tensor count, type histogram, size")
    i.add_argument("file")
    i.add_argument("--all", action="store_true", help="one line per tensor instead of collapsing layer indices")
    i.add_argument("--recipe", help="explain the types with this recipe instead of the stored one")

    sub.add_parser("recipes", help="list the shipped recipes with their full-size file size")
    return parser


def _say(line=""):
    print(line, flush=True)


def _quantize(args):
    from .build import build_gguf, plan, type_histogram
    from .recipe import Recipe
    from .sources import open_branches, swapped_hint

    recipe = Recipe.load(args.recipe)
    single = args.single_branch
    branches = open_branches(args.source, args.source_uncond, single_branch=single)
    try:
        _say("found:")
        for branch in branches:
            for line in branch.describe():
                _say("  " + line)
        hint = swapped_hint(branches)
        if hint:
            _say(hint)
        planned = plan(branches, recipe, bare_names=single is not None)
        counts, sizes, _ = type_histogram(planned)
        _say(f"recipe {recipe.name} ({recipe.origin}):")
        by_rule = {}
        for t in planned:
            by_rule.setdefault((t.qtype.name, t.rule), []).append(t)
        for (qtype, rule), ts in by_rule.items():
            _say(f"  {qtype:<5} {len(ts):>4} tensors  {sum(t.numel for t in ts) / 1e6:>10.2f} M weights  <- {rule}")
        total = sum(sizes.values())
        _say(f"output: {args.out}: {len(planned)} tensors, {total / 1e9:.3f} GB "
             f"({', '.join(f'{q} {counts[q]}' for q in counts)})"
             + (", bare names" if single else ", prefixes conditional_transformer. / unconditional_transformer."))
        if args.dry_run:
            return 0
        report = build_gguf(branches, recipe, args.out, bare_names=single is not None, threads=args.threads,
                            progress=not args.no_progress, overwrite=args.force)
    finally:
        for branch in branches:
            branch.close()
    rate = report["weights"] / max(report["seconds"], 1e-9) / 1e6
    _say(f"wrote {report['path']} ({report['bytes'] / 1e9:.3f} GB, {report['tensors']} tensors) in "
         f"{report['seconds']:.1f} s ({rate:.1f} M weights/s)")
    return 0


def _verify(args):
    from .verify import verify

    ok = verify(args.file, args.source, args.source_uncond, recipe=args.recipe,
                branch={"cond": "conditional", "uncond": "unconditional"}.get(args.branch),
                check_hash=not args.no_hash, exact=args.exact, threads=args.threads, progress=not args.no_progress,
                out=_say)
    return 0 if ok else EXIT_FAILED


def _inspect(args):
    from .inspection import inspect_file

    inspect_file(args.file, show_all=args.all, recipe=args.recipe, out=_say)
    return 0


def _recipes(args):
    from .build import plan, type_histogram
    from .layout import FULL_SIZE
    from .recipe import Recipe, shipped_names

    class _Shape:  # the full-size tensor table, without weights, to size each recipe
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class _Branch:
        def __init__(self, role):
            self.role = role
            self.tensors = {n: _Shape(n, s) for n, s in FULL_SIZE.tensor_shapes().items()}

    for name in shipped_names():
        recipe = Recipe.load(name)
        _, sizes, _ = type_histogram(plan([_Branch("conditional"), _Branch("unconditional")], recipe))
        _say(f"{name}: {sum(sizes.values()) / 1e9:.2f} GB for both full-size branches (computed; "
             + ", ".join(f"{q} {sizes[q] / 1e9:.2f} GB" for q, _ in sizes.most_common()) + ")")
        _say(f"    {recipe.description}")
    return 0


COMMANDS = {"quantize": _quantize, "verify": _verify, "inspect": _inspect, "recipes": _recipes}


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not in the main thread
        previous = None
    try:
        return COMMANDS[args.command](args)
    except QuantToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: no output was left behind (the partial file was removed)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
