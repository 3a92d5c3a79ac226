"""The fused Triton kernels, run on the CPU by Triton's interpreter, against gguf-py bit for bit.

The benchmark's variant kernels and other launch shapes are tested beside it (tests/bench/test_triton_variants.py).
"""

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ideogram4_gguf.ops import triton_dequant

from .conftest import random_blocks

pytest.importorskip("triton", reason="the Triton kernels are tested only where Triton is installed")



@pytest.mark.parametrize("qtype", list(triton_dequant.KERNEL_NAMES), ids=lambda q: q.name)
def test_kernel_matches_gguf_py(qtype, interpreter, rng):
    rows, cols = 5, 768  # 15 super-blocks: fewer than one program of the default 16, and not a multiple of 2, 4 or 8
    packed = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    assert triton_dequant.can_run(packed, qtype)
    ref = torch.from_numpy(quants.dequantize(packed.numpy(), qtype))
    fp32 = triton_dequant.dequantize(packed, qtype, (rows, cols), torch.float32)
    assert torch.equal(fp32.view(torch.int32), ref.view(torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_dequant.dequantize(packed, qtype, (rows, cols), dtype)
        assert torch.equal(out, ref.to(dtype)), dtype


def test_kernel_selection(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu_packed = torch.zeros(1, 144, dtype=torch.uint8)
    assert not triton_dequant.can_run(cpu_packed, Q.Q4_K)  # no CUDA here: torch decoder
    assert not triton_dequant.can_run(cpu_packed, Q.Q5_K)  # no kernel for the type
    with pytest.warns(UserWarning, match="'triton' requested"):
        triton_dequant.can_run(torch.zeros(1, 176, dtype=torch.uint8), Q.Q5_K, kernel="triton")


def test_tensors_past_32_bit_offsets_use_the_torch_decoder(interpreter):
    # the kernels index with int32: a tensor whose decode would pass 2**31 weights is left to torch
    huge = torch.zeros(1, dtype=torch.uint8).expand(2**30)  # 1 GiB of "packed bytes", no memory behind it
    assert not triton_dequant.can_run(huge, Q.Q4_K)
    assert triton_dequant.can_run(huge[: 2**29], Q.Q4_K)
