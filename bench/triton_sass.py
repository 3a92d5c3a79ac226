"""Static cost of the Triton dequant kernels on NVIDIA GPUs, measured on any machine: compile, count SASS.

Usage: python bench/triton_sass.py [--arch 90 86] [--launch 8x4 16x4]

Triton compiles for a GPU architecture with its bundled ptxas and no GPU present; `cuobjdump -sass` (also bundled)
lists the machine code. The kernels have no loops, so the SASS count per thread times the warps per program,
divided by the weights per program, is the warp instructions the GPU issues per decoded weight: a figure to set
against its issue rate (an H100 issues about 9e11 warp instructions per second) next to the bandwidth target
(~0.8e12 weights/s is 70 % of 3 TB/s at 2.56 bytes per weight). It says nothing about memory behaviour: the
bandwidth stage on a GPU does (docs/PERF.md).

Every kernel of triton_variants.py KERNELS: the shipped ones (ops/_triton_kernels.py) and the benchmark's variants
(triton_variant_kernels.py). Pointer arguments are specialised as 16-byte aligned and fp fusion is on, as
`ops/triton_dequant.py` launches them; "by hand" is the interpreter's integer bf16 rounding, compiled for
comparison.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile

from gguf import GGMLQuantizationType as Q

from triton_variants import KERNELS, WEIGHTS_PER_BLOCK, load_kernels

OUTPUTS = {"bf16": (True, "*i16"), "fp32": (False, "*fp32"), "fp16": (False, "*fp16")}


class CannotCompile(RuntimeError):
    """This Triton install cannot compile for NVIDIA GPUs here (no ptxas / cuobjdump)."""


def compile_kernel(fn, arch: int, output: str = "bf16", blocks: int = 8, warps: int = 4, by_hand: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out_bf16, dst = OUTPUTS[output]
    signature = {"src": "*u8", "dst": dst, "n_blocks": "i32", "BLOCKS": "constexpr", "OUT_BF16": "constexpr",
                 "BY_HAND": "constexpr"}
    aligned = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={"BLOCKS": blocks, "OUT_BF16": out_bf16, "BY_HAND": by_hand})
    try:
        return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "enable_fp_fusion": True})
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            raise CannotCompile(str(exc)) from exc
        raise


def sass_ops(compiled) -> list[str]:
    """The opcodes of a compiled kernel's machine code, in order (NOPs left out)."""
    import triton

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        raise CannotCompile(f"no cuobjdump at {cuobjdump}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True, check=True)
    found = (re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
             for line in sass.stdout.splitlines())
    return [m.group(1) for m in found if m and m.group(1) != "NOP"]


def kernel_cost(kernels, name: str, arch: int, blocks: int, warps: int, by_hand: bool = False) -> dict:
    ops = sass_ops(compile_kernel(getattr(kernels, name), arch, "bf16", blocks, warps, by_hand))
    counts = collections.Counter(ops)
    return {"kernel": name, "arch": arch, "blocks": blocks, "warps": warps, "by_hand": by_hand,
            "instructions_per_thread": len(ops),
            "warp_instructions_per_weight": len(ops) * warps / (blocks * WEIGHTS_PER_BLOCK[name]),
            "loads": {op: n for op, n in counts.items() if op.startswith("LDG")},
            "stores": {op: n for op, n in counts.items() if op.startswith("STG")}}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[90, 86], help="sm_XX numbers (90 = H100)")
    parser.add_argument("--launch", nargs="+", default=["8x4", "16x4"], help="BLOCKSxWARPS")
    args = parser.parse_args(argv)
    kernels = load_kernels(interpret=False)  # whatever TRITON_INTERPRET says
    q4_k = [name for (qtype, _), name in KERNELS.items() if qtype == Q.Q4_K]
    rows = []
    print(f"{'arch':<6} {'kernel':<12} {'launch':<6} {'bf16':<8} {'SASS/thread':>11} {'warp-instr/weight':>17}  "
          "loads / stores (per thread)")
    for arch in args.arch:
        for by_hand in (False, True):
            for name in q4_k:
                for launch in args.launch:
                    blocks, warps = (int(v) for v in launch.split("x"))
                    row = kernel_cost(kernels, name, arch, blocks, warps, by_hand)
                    rows.append(row)
                    print(f"sm_{arch:<3} {name:<12} {launch:<6} {'by hand' if by_hand else 'native':<8} "
                          f"{row['instructions_per_thread']:>11} {row['warp_instructions_per_weight']:>17.3f}  "
                          f"{row['loads']} / {row['stores']}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
