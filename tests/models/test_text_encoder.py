"""Our Qwen3 text decoder and its 13 taps vs transformers 5.24 `Qwen3VLModel.language_model` (tiny, 36 layers).

Reference semantics (docs/spec.md §4.3): tap k = `hidden_states[k+1]` for k <= 34; tap 35 = output of layer 35 *before*
the final norm; interleaved so that feature index = hidden_unit * 13 + tap_index.
"""

import pytest
import torch
from ideogram4_gguf.models.text_encoder import (
    TAP_LAYERS,
    KVCache,
    Qwen3TextConfig,
    Qwen3TextEncoder,
    unload_text_encoder,
)

from .te_reference import (  # noqa: F401
    TINY_VOCAB,
    one_cpu_thread,
    text_state_dict,
    tiny_qwen3vl_model,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference():
    return tiny_qwen3vl_model(seed=0)


def _ours(reference, dtype):
    config = Qwen3TextConfig.from_hf_config(reference.config.to_dict())
    encoder = Qwen3TextEncoder(config, dtype=dtype)
    weights = {k: v for k, v in text_state_dict(reference).items() if k != "norm.weight"}
    encoder.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    return encoder


def _reference_taps(reference, ids):
    """13 taps from transformers: hidden_states for layers 0..33, a hook for the pre-norm output of layer 35."""
    captured = {}
    hook = reference.language_model.layers[35].register_forward_hook(lambda m, i, o: captured.update(last=o))
    try:
        with torch.no_grad():
            out = reference.language_model(input_ids=ids[None], output_hidden_states=True)
    finally:
        hook.remove()
    taps = [out.hidden_states[k + 1][0] for k in TAP_LAYERS[:-1]] + [captured["last"][0]]
    return taps, out.hidden_states


def test_config_from_transformers_config(reference):
    config = Qwen3TextConfig.from_hf_config(reference.config.to_dict())
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        32, 36, 4, 2, 8)
    assert config.rope_theta == 5e6 and config.vocab_size == TINY_VOCAB and config.feature_dim == 32 * 13
    assert Qwen3TextConfig().feature_dim == 53248  # the real model: 4096 x 13


def test_fp32_taps_match_transformers(reference):
    ids = torch.randint(0, TINY_VOCAB, (23,), generator=torch.Generator().manual_seed(1))
    taps, hidden_states = _reference_taps(reference, ids)
    features = _ours(reference, torch.float32)(ids)
    assert features.shape == (23, 32 * 13) and features.dtype == torch.float32

    expected = torch.stack(taps, 0).permute(1, 2, 0).reshape(23, -1)
    assert (features - expected).abs().max().item() <= 1e-5
    # interleaving by hand: feature u*13 + t is hidden unit u of tap t
    for t in (0, 6, 12):
        torch.testing.assert_close(features[:, t::13], taps[t], rtol=0, atol=1e-5)
    # the last tap is pre-norm: transformers' hidden_states[36] (normed) is a different tensor
    assert (features[:, 12::13] - hidden_states[36][0]).abs().max().item() > 0.1
    # a plain concatenation would not match
    assert (features - torch.cat(taps, -1)).abs().max().item() > 0.1


def test_bf16_taps_match_transformers_bf16(reference):
    ids = torch.randint(0, TINY_VOCAB, (17,), generator=torch.Generator().manual_seed(2))
    taps, _ = _reference_taps(tiny_qwen3vl_model(seed=0, dtype=torch.bfloat16), ids)
    expected = torch.stack(taps, 0).permute(1, 2, 0).reshape(17, -1).float()
    features = _ours(reference, torch.bfloat16)(ids)
    # Same op order as transformers (fp32 RMSNorm statistics, fp32 RoPE angles, bf16 everything else); what
    # is left is the SDPA kernel's accumulation order, amplified over 36 random layers.
    # Observed: bit-identical. Allowed: one bf16 step at the largest magnitude.
    assert (features - expected).abs().max().item() <= 2**-7 * expected.abs().max().item()


def test_fp16_keeps_a_float32_residual_and_stays_finite(reference):
    ids = torch.randint(0, TINY_VOCAB, (11,), generator=torch.Generator().manual_seed(9))
    exact = _ours(reference, torch.float32)(ids)
    half = _ours(reference, torch.float16)
    assert half.compute_dtype == torch.float16 and half.residual_dtype == torch.float32
    features = half(ids)
    assert ((features - exact).norm() / exact.norm()).item() < 0.02  # fp16 weights and branch maths
    # An outlier branch (as Qwen's "massive activations") beyond fp16's range saturates instead of
    # turning the residual stream into inf / NaN.
    with torch.no_grad():
        half.layers[2].mlp.down_proj.weight.mul_(1e5)
    blown = half(ids)
    assert torch.isfinite(blown).all() and blown.abs().max().item() >= 60000


def test_builds_only_the_layers_the_taps_need():
    config = Qwen3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=40, num_heads=2,
                             num_kv_heads=1, head_dim=8)
    encoder = Qwen3TextEncoder(config, dtype=torch.float32)
    assert len(encoder.layers) == 36 and encoder.norm is None
    names = list(encoder.state_dict())
    assert not any(n.startswith(("norm.", "lm_head", "visual")) for n in names)
    with pytest.raises(ValueError):
        Qwen3TextEncoder(config, num_layers=30)


def test_embedding_rows_are_cast_to_the_compute_dtype(reference):
    encoder = _ours(reference, torch.float32)
    ids = [5, 9, 100, 7]
    before = encoder(ids)
    encoder.embed_tokens.to(torch.float64)  # table in another dtype: rows are cast to the compute dtype
    assert torch.equal(before, encoder(torch.tensor(ids)))


def test_kv_cached_decode_equals_one_pass(reference):
    config = Qwen3TextConfig.from_hf_config(reference.config.to_dict())
    encoder = Qwen3TextEncoder(config, final_norm=True, dtype=torch.float32)
    encoder.load_state_dict(text_state_dict(reference))
    ids = torch.randint(0, TINY_VOCAB, (12,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference.language_model(input_ids=ids[None]).last_hidden_state[0]
    full = encoder.decode(ids, KVCache())
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-5)
    cache = KVCache()
    parts = [encoder.decode(ids[:7], cache), encoder.decode(ids[7:10], cache)]
    parts += [encoder.decode(ids[i:i + 1], cache) for i in (10, 11)]
    torch.testing.assert_close(torch.cat(parts), expected, rtol=0, atol=1e-5)
    assert cache.length == 12


def test_unload_frees_parameters(reference):
    encoder = _ours(reference, torch.float32)
    unload_text_encoder(encoder)
    assert all(p.device.type == "meta" for p in encoder.parameters())
