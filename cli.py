"""Command line of the pack: `python -m ideogram4_gguf {demo,generate,download}`.

Same code path as the ComfyUI nodes. (The subcommands are filled in by the nodes/CLI work; until then
`demo` prints what it will do.)
"""

import argparse


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m ideogram4_gguf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole pipeline on tiny random models (CPU, seconds)")
    demo.add_argument("--out", default="demo.png")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(
            "demo: will build a tiny random-weight Ideogram 4 model set (two-branch Q4_K GGUF, Qwen3-VL text "
            f"encoder, FLUX.2 VAE) and run text -> image on the CPU, writing {args.out}. Not built yet."
        )
    return 0
