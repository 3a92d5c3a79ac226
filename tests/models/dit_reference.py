"""Tiny random Ideogram 4 DiTs and the diffusers 0.42.1 reference forward, shared by the DiT and sampler tests.

The reference is diffusers `Ideogram4Transformer2DModel` (bit-identical to the official DiT in fp32, docs/spec.md §8
experiment 1) fed the packed sequence exactly as `Ideogram4Pipeline` builds it (its own `_prepare_ids`).
"""

from __future__ import annotations

import torch
from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel

from ideogram4_gguf.models.dit import Ideogram4Config
from ideogram4_gguf.models.dit_loader import fuse_split_attention

TE_HIDDEN = 32  # docs/spec.md §8.2 tiny Qwen3-VL width; llm_features_dim = 13 x 32
# docs/spec.md §8.2: the tiny diffusers config that works; mrope (4, 2, 2) on head_dim 16 uses the same index rule.
TINY = dict(
    in_channels=32,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    intermediate_size=48,
    adaln_dim=8,
    llm_features_dim=13 * TE_HIDDEN,
    mrope_section=(4, 2, 2),
)


def our_config(**diffusers_kwargs) -> Ideogram4Config:
    kw = {**TINY, **diffusers_kwargs}
    return Ideogram4Config(
        hidden_size=kw["attention_head_dim"] * kw["num_attention_heads"],
        num_layers=kw["num_layers"],
        num_heads=kw["num_attention_heads"],
        head_dim=kw["attention_head_dim"],
        intermediate_size=kw["intermediate_size"],
        adaln_dim=kw["adaln_dim"],
        in_channels=kw["in_channels"],
        llm_features_dim=kw["llm_features_dim"],
        rope_theta=float(kw.get("rope_theta", 5_000_000)),
        mrope_section=tuple(kw["mrope_section"]),
    )


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Re-randomise every parameter (default init leaves gates at 0 and norms at 1, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * std
            # norm weights around 1 keep activations in a useful range; everything else around 0
            param.copy_(1.0 + noise if param.dim() == 1 and "norm" in name else noise)
    return model


def tiny_diffusers_dit(seed: int, **overrides) -> Ideogram4Transformer2DModel:
    model = Ideogram4Transformer2DModel(**{**TINY, **overrides})
    return randomize_(model, seed).eval()


def official_state_dict(model: Ideogram4Transformer2DModel) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under the official fused names (docs/spec.md §2.2.1)."""
    return fuse_split_attention({k: v.detach().clone() for k, v in model.state_dict().items()})


def reference_velocity(
    model: Ideogram4Transformer2DModel,
    latent_tokens: torch.Tensor,
    t: torch.Tensor,
    text_features: torch.Tensor | None,
    grid: tuple[int, int],
    max_text_tokens: int | None = None,
) -> torch.Tensor:
    """diffusers forward on the pipeline's packed [left-pad | text | image] sequence; image rows, float32.

    text_features (n, F) for the conditional branch (left-padded to `max_text_tokens`), None for the unconditional
    branch (image rows with zero text features, as the pipeline feeds it).
    """
    batch, num_image, channels = latent_tokens.shape
    dtype = model.dtype
    features_dim = model.config.llm_features_dim
    n = 0 if text_features is None else text_features.shape[0]
    pad = max(n, max_text_tokens or n)
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids([n] * batch, *grid, pad, "cpu")
    if text_features is None:
        position_ids, segment_ids, indicator = position_ids[:, pad:], segment_ids[:, pad:], indicator[:, pad:]
        pad = 0
    features = torch.zeros(batch, pad + num_image, features_dim)
    if n:
        features[:, pad - n : pad] = text_features
    hidden = torch.cat([torch.zeros(batch, pad, channels), latent_tokens], dim=1)
    with torch.no_grad():
        out = model(
            hidden_states=hidden.to(dtype),
            timestep=t.to(dtype),
            encoder_hidden_states=features.to(dtype),
            position_ids=position_ids,
            segment_ids=segment_ids,
            indicator=indicator,
            return_dict=False,
        )[0]
    return out[:, pad:].float()
