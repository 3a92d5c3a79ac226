"""Our Ideogram 4 DiT against diffusers 0.42.1 `Ideogram4Transformer2DModel` (tiny random weights, CPU)."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from dit_reference import TINY, official_state_dict, our_config, reference_velocity, tiny_diffusers_dit  # noqa: E402

from ideogram4_gguf.errors import ModelFileError  # noqa: E402
from ideogram4_gguf.models.dit import Ideogram4Config, Ideogram4DiT, mrope_axes  # noqa: E402
from ideogram4_gguf.models.dit_loader import StateDictWeights  # noqa: E402

GRID = (4, 5)


def _inputs(seed, batch=2, n_text=7):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, GRID[0] * GRID[1], TINY["in_channels"], generator=gen)
    features = torch.randn(n_text, TINY["llm_features_dim"], generator=gen) * 3
    t = torch.rand(batch, generator=gen)
    return latents, features, t


def _ours(reference, with_text, dtype=torch.float32):
    weights = StateDictWeights(official_state_dict(reference))
    return Ideogram4DiT.from_weights(our_config(), weights, with_text=with_text, compute_dtype=dtype)


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_dit(seed=1)


@pytest.mark.parametrize("max_text_tokens", [None, 12])
def test_conditional_branch_matches_diffusers_fp32(reference, max_text_tokens):
    # max_text_tokens=12 left-pads 5 rows as the pipeline does: our unpadded, unmasked sequence gives the same rows.
    latents, features, t = _inputs(seed=2)
    expected = reference_velocity(reference, latents, t, features, GRID, max_text_tokens)
    ours = _ours(reference, with_text=True)
    got = ours(latents, t, ours.project_text(features), GRID)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert expected.abs().max() > 0.5  # a real signal, not a collapse to zeros
    assert (got - expected).abs().max().item() <= 1e-5


def test_unconditional_branch_image_only_matches_diffusers_fp32(reference):
    latents, _, t = _inputs(seed=3)
    expected = reference_velocity(reference, latents, t, None, GRID)
    ours = _ours(reference, with_text=False)
    assert not hasattr(ours, "llm_cond_proj") and not hasattr(ours, "llm_cond_norm")
    got = ours(latents, t, None, GRID)
    assert (got - expected).abs().max().item() <= 1e-5


def test_projected_text_batch_forms_agree(reference):
    latents, features, t = _inputs(seed=4)
    ours = _ours(reference, with_text=True)
    projected = ours.project_text(features)
    a = ours(latents, t, projected, GRID)
    b = ours(latents, t, projected.unsqueeze(0).expand(2, -1, -1), GRID)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_close_to_diffusers_bf16(reference):
    # bf16 rounding differs in small ways (official F.rms_norm vs diffusers' two-step RMSNorm, docs/spec.md §2.4):
    # ~0.5 %.
    latents, features, t = _inputs(seed=5)
    t = t.to(torch.bfloat16).float()
    ref_bf16 = tiny_diffusers_dit(seed=1).to(torch.bfloat16)
    # `.to(bf16)` also rounds diffusers' non-persistent RoPE `inv_freq` buffer, which shifts the angles at positions
    # near 65536 by several radians (~10 % output error); the official code keeps it fp32, so restore it.
    ref_bf16.rotary_emb.inv_freq = reference.rotary_emb.inv_freq.clone()
    expected = reference_velocity(ref_bf16, latents, t, features, GRID)
    exact = reference_velocity(reference, latents, t, features, GRID)
    ours = _ours(reference, with_text=True, dtype=torch.bfloat16)
    got = ours(latents, t, ours.project_text(features), GRID)
    assert got.dtype == torch.float32

    def rel_rms(a, b):
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()

    assert rel_rms(got, expected) <= 0.015 and rel_rms(got, exact) <= 0.015  # observed ~0.006-0.008
    assert (got - expected).abs().max().item() <= 0.02 * exact.abs().max().item()


def test_fp16_residual_guard_keeps_large_activations_finite(reference):
    # Large post-norm weights (still representable in fp16) push the residual stream past the fp16 maximum, as
    # massive activations do in big DiTs. A plain fp16 residual would turn into inf and then NaN.
    sd = official_state_dict(reference)
    for i in range(TINY["num_layers"]):
        for norm in ("attention_norm2", "ffn_norm2"):
            sd[f"layers.{i}.{norm}.weight"] = (sd[f"layers.{i}.{norm}.weight"] * 6e4).clamp(-6e4, 6e4)
    latents, features, t = _inputs(seed=6)
    fp32 = Ideogram4DiT.from_weights(our_config(), StateDictWeights(sd), compute_dtype=torch.float32)

    residual_peak = []
    hook = fp32.layers[-1].register_forward_hook(lambda m, i, o: residual_peak.append(o.abs().max().item()))
    expected = fp32(latents, t, fp32.project_text(features), GRID)
    hook.remove()
    assert residual_peak[0] > 65504  # an fp16 residual stream would overflow here

    fp16 = Ideogram4DiT.from_weights(our_config(), StateDictWeights(sd), compute_dtype=torch.float16)
    got = fp16(latents, t, fp16.project_text(features), GRID)
    assert torch.isfinite(got).all()
    assert ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item() <= 0.02


def test_fp16_text_projection_survives_outlier_features(reference):
    latents, features, t = _inputs(seed=8)
    features[:, 5] = 2e5  # beyond fp16 range, as massive LLM activations can be
    fp32 = _ours(reference, with_text=True)
    fp16 = _ours(reference, with_text=True, dtype=torch.float16)
    expected, got = fp32.project_text(features), fp16.project_text(features)
    assert torch.isfinite(got).all()
    assert ((got.float() - expected).norm() / expected.norm()).item() <= 2e-3


def test_fp16_matches_fp32_on_ordinary_weights(reference):
    latents, features, t = _inputs(seed=7)
    fp32 = _ours(reference, with_text=True)
    fp16 = _ours(reference, with_text=True, dtype=torch.float16)
    expected = fp32(latents, t.half().float(), fp32.project_text(features), GRID)
    got = fp16(latents, t.half().float(), fp16.project_text(features), GRID)
    assert ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item() <= 2e-3


def test_mrope_index_rule_matches_spec():
    axes = mrope_axes(Ideogram4Config())  # published config: head_dim 256, sections (24, 20, 20)
    assert axes.shape == (128,)
    assert axes.tolist().count(1) == 20 and axes.tolist().count(2) == 20 and axes.tolist().count(0) == 88
    assert all(axes[j] == 1 for j in range(1, 60, 3)) and all(axes[j] == 2 for j in range(2, 60, 3))
    assert all(axes[j] == 0 for j in range(60, 128))


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ModelFileError, match="mrope_section"):
        Ideogram4Config(hidden_size=32, num_heads=2, head_dim=16, mrope_section=(24, 20, 20))
    with pytest.raises(ModelFileError, match="hidden_size"):
        Ideogram4Config(hidden_size=30, num_heads=2, head_dim=16, mrope_section=(4, 2, 2))


def test_expected_tensor_names_are_the_official_set():
    names = set(Ideogram4DiT.expected_tensor_names(Ideogram4Config()))
    assert len(names) == 458  # docs/spec.md §2.2: 458 tensors per branch with fused names
    assert {"embed_image_indicator.weight", "layers.33.attention.qkv.weight", "llm_cond_proj.bias"} <= names
    uncond = set(Ideogram4DiT.expected_tensor_names(Ideogram4Config(), with_text=False))
    assert names - uncond == {"llm_cond_norm.weight", "llm_cond_proj.weight", "llm_cond_proj.bias"}


@pytest.mark.parametrize("config", [Ideogram4Config(), our_config()], ids=["full", "tiny"])
@pytest.mark.parametrize("with_text", [True, False])
def test_the_layout_table_is_the_models_parameters(config, with_text):
    # quant_tools' torch-free table (which the loader checks files against) and the module tree say the same
    with torch.device("meta"):
        model = Ideogram4DiT(config, with_text)
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == config.tensor_shapes(with_text)


def test_the_config_is_quant_tools_config_speaking_the_packs_error():
    from ideogram4_gguf.quant_tools import QuantToolError, layout

    assert issubclass(Ideogram4Config, layout.Ideogram4Config)
    assert Ideogram4Config.field_names() == layout.Ideogram4Config.field_names()
    assert Ideogram4Config().differences(layout.FULL_SIZE) == []
    with pytest.raises(QuantToolError, match="hidden_size"):
        layout.Ideogram4Config(hidden_size=30, num_heads=2, head_dim=16, mrope_section=(4, 2, 2))


def test_unconditional_branch_never_reads_text_tensors(reference):
    requested = []

    class Recording(StateDictWeights):
        def tensor(self, name, dtype=None, device="cpu"):
            requested.append(name)
            return super().tensor(name, dtype, device)

        def linear(self, prefix, compute_dtype=torch.float32, device="cpu", kernel="auto"):
            requested.append(prefix)
            return super().linear(prefix, compute_dtype, device)

    Ideogram4DiT.from_weights(our_config(), Recording(official_state_dict(reference)), with_text=False)
    assert requested and not [n for n in requested if n.startswith("llm_cond")]
    assert "layers.1.attention.qkv" in requested and "embed_image_indicator.weight" in requested
