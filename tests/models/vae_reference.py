"""Reference models and files for the VAE tests: tiny diffusers `AutoencoderKLFlux2` (diffusers 0.42.1) with every
parameter re-randomised, and a writer for the BFL/ComfyUI naming built from the table in docs/spec.md §5.5."""

import re

import torch

# docs/spec.md §8.2: the tiny FLUX.2 VAE config that diffusers builds on the CPU in milliseconds.
TINY_CONFIG = {
    "block_out_channels": (32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-randomise every parameter (default init leaves norms at 1 and biases at 0) and the bn buffers.

    Weights ~ N(0, 1/fan_in) keep activations O(1) through many layers, so fp32 differences stay meaningful;
    norm scales 1 + N(0, 0.2), biases N(0, 0.2); bn running_var in [2, 3.5] (docs/spec.md §8.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
        if hasattr(model, "bn"):
            channels = model.bn.running_mean.numel()
            model.bn.running_mean.copy_(0.3 * torch.randn(channels, generator=generator))
            model.bn.running_var.copy_(2.0 + 1.5 * torch.rand(channels, generator=generator))
    return model.eval()


def tiny_diffusers_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return randomize_(AutoencoderKLFlux2(**{**TINY_CONFIG, **overrides}), seed)


# diffusers -> BFL / ComfyUI names, written from the table in docs/spec.md §5.5, whose upsampler row comes from
# ComfyUI's comfy/diffusers_convert.py (`up_blocks.{i}.upsamplers.0.` <-> `up.{n-1-i}.upsample.`).
_TO_BFL = (
    (r"^post_quant_conv\.", "decoder.post_quant_conv."),
    (r"^quant_conv\.", "encoder.quant_conv."),
    (r"mid_block\.resnets\.0\.", "mid.block_1."),
    (r"mid_block\.resnets\.1\.", "mid.block_2."),
    (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    (r"mid_block\.attentions\.0\.to_q\.", "mid.attn_1.q."),
    (r"mid_block\.attentions\.0\.to_k\.", "mid.attn_1.k."),
    (r"mid_block\.attentions\.0\.to_v\.", "mid.attn_1.v."),
    (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
    (r"conv_shortcut\.", "nin_shortcut."),
    (r"conv_norm_out\.", "norm_out."),
)


def to_bfl_state_dict(state_dict: dict, levels: int, prefix: str = "") -> dict:
    """Rename a diffusers AutoencoderKLFlux2 state dict to BFL/ComfyUI names; attention projections become 1x1
    convs. Encoder tensors keep their (already mid_block-style) names: the decoder loader must skip them."""
    out = {}
    for name, tensor in state_dict.items():
        new = name
        if name.startswith(("decoder.", "post_quant_conv.", "quant_conv.")):
            for pattern, replacement in _TO_BFL:
                new = re.sub(pattern, replacement, new)
            new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new)
            new = re.sub(
                r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", new
            )
            if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", new):
                tensor = tensor[:, :, None, None]
        out[prefix + new] = tensor.contiguous()
    return out
