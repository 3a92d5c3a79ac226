"""The benchmark's Triton kernels: the shipped ones at any launch shape, and the variants timed against them.

ops/triton_dequant.py launches one kernel per type at one fixed shape (BLOCKS_PER_PROGRAM GGUF blocks per program,
NUM_WARPS warps). What that choice is measured against lives here: `dequantize` runs any kernel of KERNELS at any
launch shape, for the bandwidth stage's sweep (instrument.py TRITON_LAUNCHES, docs/PERF.md) and the tests that
check every shape decodes the same bits; `load_kernels` also serves triton_sass.py, which compiles them without a
GPU.

`load_kernels` executes private copies of ops/_triton_kernels.py and triton_variant_kernels.py instead of importing
them. Triton reads TRITON_INTERPRET when a kernel is decorated and resolves helper kernels through the kernel's
module globals, so kernels of the kind asked for (interpreted or compiled), whatever the environment says and
whatever kind the pack's own module holds at the moment, need helpers of that kind in their own module too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import pathlib
import sys
import types

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from ideogram4_gguf.ops import triton_dequant

# (type, variant) -> kernel name. Variant None is the kernel the pack ships for the type (ops/_triton_kernels.py);
# the others are in triton_variant_kernels.py. "gather" is the first Q4_K kernel, kept until a GPU run picks
# between the two (docs/PERF.md).
KERNELS = {(qtype, None): name for qtype, name in triton_dequant.KERNEL_NAMES.items()}
KERNELS[Q.Q4_K, "gather"] = "q4_k_gather"
WEIGHTS_PER_BLOCK = {name: GGML_QUANT_SIZES[qtype][0] for (qtype, _), name in KERNELS.items()}

RUNTIME_MODULE = "ideogram4_gguf.ops._triton_kernels"
RUNTIME_FILE = pathlib.Path(triton_dequant.__file__).with_name("_triton_kernels.py")
VARIANT_FILE = pathlib.Path(__file__).with_name("triton_variant_kernels.py")


def dequantize(packed: torch.Tensor, qtype, shape, dtype=torch.float32, *, variant: str | None = None,
               blocks_per_program: int = triton_dequant.BLOCKS_PER_PROGRAM,
               num_warps: int = triton_dequant.NUM_WARPS) -> torch.Tensor:
    """ops.triton_dequant.dequantize with the kernel and the launch shape chosen: `variant` (None: the shipped
    kernel of the type) run with `blocks_per_program` GGUF blocks (a power of two) and `num_warps` per program."""
    qtype = Q(qtype)
    if (qtype, variant) not in KERNELS:
        raise ValueError(f"no {variant!r} Triton kernel for {qtype.name}")
    if blocks_per_program < 1 or blocks_per_program & (blocks_per_program - 1):
        raise ValueError(f"blocks_per_program must be a power of two, got {blocks_per_program}")
    n_blocks = math.prod(shape) // GGML_QUANT_SIZES[qtype][0]
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    interpret = triton_dequant._interpreting()
    kernel = getattr(load_kernels(interpret), KERNELS[qtype, variant])
    # the launch of ops/triton_dequant.py `dequantize`, with the shape as arguments
    out_bf16 = dtype == torch.bfloat16
    target = out.view(torch.int16) if out_bf16 else out
    grid = (-(-n_blocks // blocks_per_program),)
    kernel[grid](packed.reshape(-1), target.reshape(-1), n_blocks, BLOCKS=blocks_per_program, OUT_BF16=out_bf16,
                 BY_HAND=interpret, num_warps=num_warps, enable_fp_fusion=True)
    return out


@functools.cache
def load_kernels(interpret: bool = False) -> types.SimpleNamespace:
    """Every kernel of KERNELS by name (`.q4_k`, `.q4_k_gather`, ...), from private copies of the kernel files,
    decorated for Triton's interpreter (interpret=True) or for compilation, whatever TRITON_INTERPRET says."""
    mode = "interpreted" if interpret else "compiled"
    with _triton_interpret(interpret):
        runtime = _execute(RUNTIME_FILE, f"ideogram4_bench_runtime_kernels_{mode}")
        # The variants import the helpers by the pack's module name: while they load, that name is this copy.
        saved = sys.modules.get(RUNTIME_MODULE)
        sys.modules[RUNTIME_MODULE] = runtime
        try:
            variants = _execute(VARIANT_FILE, f"ideogram4_bench_variant_kernels_{mode}")
        finally:
            if saved is None:
                del sys.modules[RUNTIME_MODULE]
            else:
                sys.modules[RUNTIME_MODULE] = saved
    return types.SimpleNamespace(**{name: getattr(runtime if variant is None else variants, name)
                                    for (_, variant), name in KERNELS.items()})


@contextlib.contextmanager
def _triton_interpret(on: bool):
    saved = os.environ.pop("TRITON_INTERPRET", None)
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _execute(path: pathlib.Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
