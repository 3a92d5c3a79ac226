"""bench/dequant_ahead.py: decoding the next Linear early gives exactly the same sampling result.

On the CPU the early decode runs in order, so this checks the bookkeeping (successors learned from the call order,
each layer handed its own weight); the overlap itself is measured on a GPU by the benchmark (`--dequant-ahead`).
"""

import pytest
import torch
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.ops import QuantLinear
from ideogram4_gguf.sampler.flow import sample
from ideogram4_gguf.sampler.presets import sampler_settings

import synthetic
from dequant_ahead import DequantAhead

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_ahead_changes_nothing(tmp_path, device):
    path = synthetic.q4_k_gguf(synthetic.PRESETS["tiny"], tmp_path, seed=5, preset="tiny", log=lambda _: None)["path"]
    cond, uncond, _ = load_dit_branches(path, compute_dtype=torch.float32, device=device)
    features = torch.randn(11, cond.config.llm_features_dim, generator=torch.Generator().manual_seed(1)).to(device)
    settings = sampler_settings("default", steps=3, polish_steps=1)

    def run():
        projected = cond.project_text(features)
        return sample(cond, uncond, projected, 256, 256, seed=4, settings=settings).cpu()

    expected = run()
    ahead = DequantAhead((cond, uncond), device)
    got = run()
    layers = [m for b in (cond, uncond) for m in b.modules() if isinstance(m, QuantLinear)]
    # after the first forward of each branch every later QuantLinear call finds its weight decoded ahead
    assert ahead.ahead_hits > len(layers)
    ahead.close()
    assert all("dense_weight" not in layer.__dict__ for layer in layers)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
