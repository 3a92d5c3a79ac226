"""Fused single-pass Triton dequant kernels (Q4_K, Q6_K, Q8_0) for CUDA.

One pass: read the packed blocks once, write the compute-dtype weights once (0.56 + 2 bytes per Q4_K
weight in bf16), instead of the ~10 full-size intermediates of an op-by-op decode. The arithmetic is the
float32 arithmetic of `dequant.py` (exact products, one final rounding), then one round to the output
dtype, so the kernels are bit-identical to gguf-py in float32 -- tested on the CPU under TRITON_INTERPRET=1.

Triton is imported lazily, on the first kernel call, so importing the pack stays cheap and works without it.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings

import torch
from gguf import GGMLQuantizationType as Q

# Launch shape: GGUF blocks decoded by one program (a power of two) and warps per program. Chosen without a GPU,
# from the compiled code (`bench/triton_sass.py`): 16 blocks per program issue 0.305 warp instructions per Q4_K
# weight on sm_90, 8 blocks 0.365 (the scale unpacking is shared by more weights). The benchmark's bandwidth
# stage times other shapes and kernels against this one on the GPU it runs on (`bench/triton_variants.py`,
# docs/PERF.md).
BLOCKS_PER_PROGRAM = 16
NUM_WARPS = 4
# The types with a kernel, and its name in _triton_kernels.py.
KERNEL_NAMES = {Q.Q4_K: "q4_k", Q.Q6_K: "q6_k", Q.Q8_0: "q8_0"}


def available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run(packed: torch.Tensor, qtype, kernel: str = "auto") -> bool:
    """Whether the Triton kernel will decode this tensor; with kernel="triton", say why not (once)."""
    reason = None
    if Q(qtype) not in KERNEL_NAMES:
        reason = f"no Triton kernel for {Q(qtype).name}"
    elif packed.numel() * 2 >= 2**31:
        reason = "tensor too large for the kernels' 32-bit offsets"
    elif not (packed.is_cuda or _interpreting()):
        reason = f"tensor is on {packed.device}, Triton kernels run on CUDA"
    elif not available():
        reason = "Triton is not installed"
    if reason and kernel == "triton":
        _warn_once(f"dequant kernel 'triton' requested but {reason}; using the torch decoder.")
    return reason is None


def dequantize(packed: torch.Tensor, qtype, shape, dtype=torch.float32) -> torch.Tensor:
    """Decode `packed` (GGUF blocks of `qtype`, contiguous) into a new tensor of `shape` and `dtype`."""
    qtype = Q(qtype)
    n_blocks = math.prod(shape) // (32 if qtype == Q.Q8_0 else 256)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    out_bf16 = dtype == torch.bfloat16
    target = out.view(torch.int16) if out_bf16 else out
    grid = (-(-n_blocks // BLOCKS_PER_PROGRAM),)
    _kernels()[qtype][grid](packed.reshape(-1), target.reshape(-1), n_blocks, BLOCKS=BLOCKS_PER_PROGRAM,
                            OUT_BF16=out_bf16, BY_HAND=_interpreting(), num_warps=NUM_WARPS, enable_fp_fusion=True)
    return out


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


@functools.cache
def _kernels():
    # Triton resolves helper kernels through module globals, so the kernels live in their own module,
    # imported (with Triton) only now. Triton reads TRITON_INTERPRET when a kernel is decorated: the module is
    # (re)executed here, so clearing this cache after switching it (the tests do) gets kernels of the new kind.
    from . import _triton_kernels as k

    k = importlib.reload(k)
    return {qtype: getattr(k, name) for qtype, name in KERNEL_NAMES.items()}
