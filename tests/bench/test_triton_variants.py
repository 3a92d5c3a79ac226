"""bench/triton_variants.py: the benchmark's Triton kernels (the shipped ones at any launch shape, and the variants
timed against them) decode bit for bit what gguf-py decodes, under Triton's interpreter on the CPU and compiled on
a GPU. What the pack itself launches is tested in tests/ops/test_triton_dequant.py and test_cuda_kernels.py."""

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from ideogram4_gguf.ops import triton_dequant

from ..ops.conftest import random_blocks

pytest.importorskip("triton", reason="the Triton kernels are tested only where Triton is installed")

import triton_variants  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


def _id(case):
    qtype, variant = case
    return qtype.name + (f"-{variant}" if variant else "")


def _reference(packed: torch.Tensor, qtype) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(packed.cpu().numpy(), qtype))


@pytest.mark.parametrize("case", list(triton_variants.KERNELS), ids=_id)
def test_every_kernel_matches_gguf_py(case, interpreter, rng):
    qtype, variant = case
    rows, cols = 5, 768  # 15 super-blocks: fewer than one program of the default 16, and not a multiple of 2, 4 or 8
    packed = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    ref = _reference(packed, qtype)
    fp32 = triton_variants.dequantize(packed, qtype, (rows, cols), torch.float32, variant=variant)
    assert torch.equal(fp32.view(torch.int32), ref.view(torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_variants.dequantize(packed, qtype, (rows, cols), dtype, variant=variant)
        assert torch.equal(out, ref.to(dtype)), dtype


def test_launch_shapes_decode_the_same(interpreter, rng):
    # the benchmark sweeps blocks-per-program and warps; every shape must decode the same bits
    rows, cols = 3, 2560  # 30 super-blocks: a partial last program for every shape below
    packed = torch.from_numpy(random_blocks(Q.Q4_K, rows, cols, rng))
    ref = _reference(packed, Q.Q4_K).to(torch.bfloat16)
    for blocks, warps, variant in ((1, 1, None), (2, 2, "gather"), (4, 8, None), (16, 4, "gather"), (32, 2, None)):
        out = triton_variants.dequantize(packed, Q.Q4_K, (rows, cols), torch.bfloat16, variant=variant,
                                         blocks_per_program=blocks, num_warps=warps)
        assert torch.equal(out, ref), (blocks, warps, variant)
    with pytest.raises(ValueError, match="power of two"):
        triton_variants.dequantize(packed, Q.Q4_K, (rows, cols), torch.bfloat16, blocks_per_program=12)


def test_the_shipped_launch_is_the_packs(interpreter, rng):
    # the benchmark repeats the pack's launch with the shape as arguments: at the shipped shape, the same output
    packed = torch.from_numpy(random_blocks(Q.Q6_K, 3, 2560, rng))
    for dtype in (torch.float32, torch.bfloat16):
        ours = triton_variants.dequantize(packed, Q.Q6_K, (3, 2560), dtype)
        assert torch.equal(ours, triton_dequant.dequantize(packed, Q.Q6_K, (3, 2560), dtype)), dtype


def test_unknown_variant_is_refused(rng):
    packed = torch.from_numpy(random_blocks(Q.Q6_K, 1, 256, rng))
    with pytest.raises(ValueError, match="no 'gather' Triton kernel for Q6_K"):
        triton_variants.dequantize(packed, Q.Q6_K, (1, 256), variant="gather")


def test_kernels_are_of_the_kind_asked_whatever_the_environment(monkeypatch):
    import sys

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compiled, interpreted = triton_variants.load_kernels(False), triton_variants.load_kernels(True)
    for name in triton_variants.KERNELS.values():
        assert type(getattr(compiled, name)).__name__ == "JITFunction", name
        assert type(getattr(interpreted, name)).__name__ == "InterpretedFunction", name
    # a variant calls the helpers of its own copy, never the pack's module (whose kind follows TRITON_INTERPRET)
    assert compiled.q4_k_gather.fn.__globals__["f16_at"] is compiled.q4_k.fn.__globals__["f16_at"]
    pack_module = sys.modules.get(triton_variants.RUNTIME_MODULE)
    assert pack_module is None or pack_module.__file__ == str(triton_variants.RUNTIME_FILE)


@CUDA
@pytest.mark.parametrize("case", list(triton_variants.KERNELS), ids=_id)
def test_compiled_kernel_matches_gguf_py(case, rng):
    qtype, variant = case
    rows, cols = 1536, 4608
    packed = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    ref = _reference(packed, qtype)
    on_gpu = packed.cuda()
    fp32 = triton_variants.dequantize(on_gpu, qtype, (rows, cols), torch.float32, variant=variant).cpu()
    assert torch.equal(fp32.view(torch.int32), ref.view(torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_variants.dequantize(on_gpu, qtype, (rows, cols), dtype, variant=variant).cpu()
        assert torch.equal(out, ref.to(dtype)), dtype


@CUDA
def test_compiled_launch_shapes_agree(rng):
    shape = (96, 2560)
    packed = torch.from_numpy(random_blocks(Q.Q4_K, *shape, rng)).cuda()
    ref = triton_dequant.dequantize(packed, Q.Q4_K, shape, torch.bfloat16)
    for variant in (None, "gather"):
        for blocks in (1, 2, 4, 16, 32):
            for warps in (1, 2, 8):
                out = triton_variants.dequantize(packed, Q.Q4_K, shape, torch.bfloat16, variant=variant,
                                                 blocks_per_program=blocks, num_warps=warps)
                assert torch.equal(out, ref), (variant, blocks, warps)
