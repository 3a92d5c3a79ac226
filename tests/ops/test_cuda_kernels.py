"""The decoders on a real GPU: the compiled Triton kernels and the torch decoder against gguf-py, bit for bit.

The CPU suite checks the Triton kernels under Triton's interpreter only; these run where CUDA is present (the
benchmark machine, docs/PERF.md) and are skipped elsewhere. The benchmark's variant kernels and other launch shapes
have their CUDA tests beside it (tests/bench/test_triton_variants.py).
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ideogram4_gguf.ops import QuantLinear, dequantize, triton_dequant

from .conftest import QUANT_TYPES, random_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


def _reference(packed: torch.Tensor, qtype) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(packed.numpy(), qtype))


@pytest.mark.parametrize("qtype", list(triton_dequant.KERNEL_NAMES), ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(5, 768), (1536, 4608)], ids=["15-blocks", "mlp-slice"])
def test_compiled_triton_kernel_matches_gguf_py(qtype, shape, rng):
    if not triton_dequant.available():
        pytest.skip("Triton is not installed")
    rows, cols = shape
    packed = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    ref = _reference(packed, qtype)
    on_gpu = packed.cuda()
    assert triton_dequant.can_run(on_gpu, qtype)
    fp32 = triton_dequant.dequantize(on_gpu, qtype, shape, torch.float32).cpu()
    assert torch.equal(fp32.view(torch.int32), ref.view(torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_dequant.dequantize(on_gpu, qtype, shape, dtype).cpu()
        assert torch.equal(out, ref.to(dtype)), dtype


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_torch_decoder_on_cuda_matches_gguf_py(qtype, rng):
    rows, cols = 7, 1024
    packed = torch.from_numpy(random_blocks(qtype, rows, cols, rng))
    ref = _reference(packed, qtype)
    out = dequantize(packed.cuda(), qtype, (rows, cols), torch.float32)
    assert out.is_cuda
    assert torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))
    assert torch.equal(dequantize(packed.cuda(), qtype, (rows, cols), torch.bfloat16).cpu(), ref.to(torch.bfloat16))


def test_quant_linear_on_cuda_uses_the_same_weights_with_either_kernel(rng):
    rows, cols = 512, 1024
    packed = torch.from_numpy(random_blocks(Q.Q4_K, rows, cols, rng))
    x = torch.from_numpy(rng.standard_normal((9, cols), dtype=np.float32)).to(torch.bfloat16)
    layers = {kernel: QuantLinear(packed, Q.Q4_K, cols, rows, compute_dtype=torch.bfloat16, kernel=kernel).cuda()
              for kernel in ("auto", "torch")}
    weights = {k: layer.dense_weight(torch.bfloat16) for k, layer in layers.items()}
    assert torch.equal(weights["auto"], weights["torch"])
    assert torch.equal(weights["auto"].cpu(), _reference(packed, Q.Q4_K).to(torch.bfloat16))
    outputs = {k: layer(x.cuda()) for k, layer in layers.items()}
    assert torch.equal(outputs["auto"], outputs["torch"])


def test_torch_decoder_on_cuda_bounds_its_scratch_memory(rng):
    # Where Triton is missing the torch decoder runs on the GPU; decoded whole, its float32 scratch and nibble
    # temporaries would take ~7 bytes per weight on top of the output. In chunks they stay under ~64 MiB.
    from ideogram4_gguf.ops import dequant

    rows, cols = 4096, 8192  # 33.5 M weights: four chunks
    packed = torch.from_numpy(random_blocks(Q.Q4_K, rows, cols, rng)).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = dequantize(packed, Q.Q4_K, (rows, cols), torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    assert rows * cols > 2 * dequant.DEVICE_CHUNK_WEIGHTS
    assert extra < (64 << 20) + rows * cols // 256 * 64, extra  # + the per-block scales, unpacked once
    assert torch.equal(out.cpu(), _reference(packed.cpu(), Q.Q4_K).to(torch.bfloat16))
