"""FLUX.2 VAE files -> `Flux2VAEDecoder`: reading safetensors files (diffusers `vae/` folders, BFL/ComfyUI
`flux2-vae.safetensors`, checkpoints with a `vae.` / `first_stage_model.` prefix), the name maps between them,
header checks and the file's latent batch-norm statistics (`latent_bn`). Encoder tensors are never read.

The network itself is `vae.py`; its module names are diffusers', so a diffusers state dict loads as is and BFL/ComfyUI
names are mapped by `_bfl_to_diffusers` (docs/spec.md §5.5).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re

import torch

from ..errors import ModelFileError, quote
from .latents import LatentBatchNorm, compare_batch_norm
from .vae import KNOWN_VAES, Flux2VAEConfig, Flux2VAEDecoder

logger = logging.getLogger(__name__)


def load_vae_decoder(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    norm_num_groups: int | None = None,
) -> Flux2VAEDecoder:
    """Load from a .safetensors file (or a diffusers `vae/` folder / repo folder holding one).

    `norm_num_groups` cannot be read from the weights: it comes from this argument, else a diffusers
    `config.json` beside the file, else 32 (FLUX.2)."""
    file, config_json = _resolve_vae_path(path)
    if norm_num_groups is None:
        norm_num_groups = int(config_json.get("norm_num_groups", 32))
    state_dict = _read_decoder_tensors(file)
    vae = vae_decoder_from_state_dict(state_dict, dtype=dtype, device=device, norm_num_groups=norm_num_groups,
                                      source=str(file))
    _report_batch_norm(vae)
    return vae


def vae_decoder_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    norm_num_groups: int = 32,
    source: str = "<state dict>",
) -> Flux2VAEDecoder:
    """Build from tensors in diffusers or BFL/ComfyUI naming (optionally prefixed); encoder tensors ignored.

    Tensors already in the target dtype and device are used as they are (no copy)."""
    decoder_sd, batch_norm = _canonical_decoder_state_dict(state_dict, source)
    config = _infer_config(decoder_sd, norm_num_groups, source)
    with torch.device("meta"):
        vae = Flux2VAEDecoder(config)
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(decoder_sd))
    unexpected = sorted(set(decoder_sd) - set(expected))
    if missing or unexpected:
        kind = KNOWN_VAES.get(config.latent_channels)
        hint = f" (its {config.latent_channels} latent channels suggest {kind})" if kind and config.latent_channels != 32 else ""
        raise ModelFileError(
            f"{source} is not a complete FLUX.2 VAE decoder{hint}: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
            "The file may be truncated or a different VAE; use flux2-vae.safetensors (ComfyUI) or the Ideogram 4 "
            "vae/ folder"
        )
    for name, tensor in decoder_sd.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFileError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                "for a FLUX.2 VAE decoder of this size; the file is damaged or a different model"
            )
    target_dtype = dtype or next(iter(decoder_sd.values())).dtype
    vae.load_state_dict({k: v.to(device or "cpu", target_dtype) for k, v in decoder_sd.items()}, assign=True)
    vae.source = source
    if batch_norm is not None:
        vae.latent_bn = LatentBatchNorm(batch_norm[0].float(), batch_norm[1].float(), source=source)
    return vae.eval()


def _report_batch_norm(vae: Flux2VAEDecoder) -> None:
    if vae.latent_bn is None or vae.latent_bn.channels != 128:
        return
    comparison = compare_batch_norm(vae.latent_bn)
    vae.batch_norm_comparison = comparison
    if not comparison.matches():
        logger.warning(
            "%s carries latent batch-norm statistics that differ from the official Ideogram 4 constants (%s). "
            "This pack decodes its latents with the official constants; ComfyUI core's VAE Decode uses the "
            "file's statistics, which the LATENT conversion to/from core accounts for.",
            vae.source,
            comparison.describe(),
        )


# ---- files, names, config ----------------------------------------------------------------------------------------

_PREFIXES = ("", "vae.", "first_stage_model.")  # bare, diffusers single-file, ComfyUI checkpoint
_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
# BFL / ComfyUI flux2-vae names -> diffusers names (docs/spec.md §5.5; BFL flux2 autoencoder.py,
# ComfyUI comfy/diffusers_convert.py). BFL counts up levels from the highest resolution, diffusers from the lowest.
_BFL_RENAMES = (
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
    (r"^decoder\.mid\.block_(\d)\.", lambda m, n: f"decoder.mid_block.resnets.{int(m[1]) - 1}."),
    (r"^decoder\.mid\.attn_1\.norm\.", "decoder.mid_block.attentions.0.group_norm."),
    (r"^decoder\.mid\.attn_1\.(q|k|v)\.", lambda m, n: f"decoder.mid_block.attentions.0.to_{m[1]}."),
    (r"^decoder\.mid\.attn_1\.proj_out\.", "decoder.mid_block.attentions.0.to_out.0."),
    (r"^decoder\.up\.(\d+)\.block\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets."),
    (r"^decoder\.up\.(\d+)\.upsample\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0."),
    (r"^decoder\.norm_out\.", "decoder.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)


def _bfl_to_diffusers(name: str, levels: int) -> str:
    for pattern, replacement in _BFL_RENAMES:
        if callable(replacement):
            name = re.sub(pattern, lambda m, r=replacement: r(m, levels), name)
        else:
            name = re.sub(pattern, replacement, name)
    return name


def _decoder_key_map(keys, source: str) -> tuple[dict[str, str], tuple[str, str] | None]:
    """File key -> diffusers decoder name for every tensor the decoder needs; plus the bn (mean, var) file keys."""
    keys = list(keys)
    key_set = set(keys)
    prefix = next((p for p in _PREFIXES if f"{p}decoder.conv_in.weight" in key_set), None)
    if prefix is None:
        raise ModelFileError(
            f"{source} holds no VAE decoder (no decoder.conv_in.weight, also looked under 'vae.' and "
            "'first_stage_model.'): it is not a VAE file. Pick flux2-vae.safetensors (ComfyUI models/vae) or the "
            "Ideogram 4 vae/diffusion_pytorch_model.safetensors"
        )
    names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    bfl = "decoder.mid.block_1.conv1.weight" in names
    if not bfl and "decoder.mid_block.resnets.0.conv1.weight" not in names:
        raise ModelFileError(
            f"{source} has a VAE decoder but not the FLUX.2 layout (no decoder.mid_block.* or decoder.mid.* "
            "tensors); use flux2-vae.safetensors or the Ideogram 4 vae/ file"
        )
    levels = len({m[1] for n in names if (m := re.match(r"decoder\.up\.(\d+)\.", n))})
    mapping = {}
    for name in names:
        if name.startswith(("encoder.", "quant_conv.", "bn.")) or not name.startswith(("decoder.", "post_quant_conv.")):
            continue
        mapping[prefix + name] = _bfl_to_diffusers(name, levels) if bfl else name
    bn_keys = (f"{prefix}bn.running_mean", f"{prefix}bn.running_var")
    return mapping, bn_keys if all(k in key_set for k in bn_keys) else None


def _canonical_decoder_state_dict(state_dict, source):
    mapping, bn_keys = _decoder_key_map(state_dict.keys(), source)
    decoder_sd = {target: state_dict[key] for key, target in mapping.items()}
    _flatten_attention_weights(decoder_sd)
    batch_norm = (state_dict[bn_keys[0]], state_dict[bn_keys[1]]) if bn_keys else None
    return decoder_sd, batch_norm


def _flatten_attention_weights(decoder_sd: dict[str, torch.Tensor]) -> None:
    # BFL stores the attention projections as 1x1 convs (C, C, 1, 1); diffusers as Linear (C, C).
    for linear in _ATTENTION_LINEARS:
        name = f"decoder.mid_block.attentions.0.{linear}.weight"
        if name in decoder_sd and decoder_sd[name].ndim == 4:
            decoder_sd[name] = decoder_sd[name].flatten(1)


def _infer_config(decoder_sd: dict[str, torch.Tensor], norm_num_groups: int, source: str) -> Flux2VAEConfig:
    latent_channels = decoder_sd["decoder.conv_in.weight"].shape[1]
    levels = sorted({int(m[1]) for n in decoder_sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", n))})
    if not levels or levels != list(range(len(levels))):
        raise ModelFileError(f"{source}: the decoder's up blocks are missing or not numbered 0..n-1")
    widths = [decoder_sd[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
    resnets = {int(m[1]) for n in decoder_sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", n))}
    config = Flux2VAEConfig(
        latent_channels=latent_channels,
        block_out_channels=tuple(reversed(widths)),
        layers_per_block=len(resnets) - 1,
        norm_num_groups=norm_num_groups,
        out_channels=decoder_sd["decoder.conv_out.weight"].shape[0],
    )
    if any(width % norm_num_groups for width in config.block_out_channels):
        raise ModelFileError(
            f"{source}: GroupNorm with {norm_num_groups} groups does not divide the decoder widths "
            f"{config.block_out_channels}; pass the VAE's norm_num_groups (from its config.json)"
        )
    return config


def _resolve_vae_path(path) -> tuple[pathlib.Path, dict]:
    """A file, a diffusers vae/ folder or a repo folder holding vae/ -> (safetensors file, config.json or {})."""
    path = pathlib.Path(path)
    if path.is_dir():
        for folder in (path, path / "vae"):
            candidate = folder / "diffusion_pytorch_model.safetensors"
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ModelFileError(
                f"{path} is a folder without diffusion_pytorch_model.safetensors (looked in it and in its vae/); "
                "point at the VAE .safetensors file"
            )
    if not path.is_file():
        raise ModelFileError(f"VAE file not found: {path}. Put flux2-vae.safetensors in ComfyUI/models/vae")
    if path.suffix.lower() == ".gguf":
        raise ModelFileError(f"{path}: GGUF VAEs are not supported; use flux2-vae.safetensors (about 160 MB)")
    config = {}
    config_path = path.parent / "config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and "norm_num_groups" in loaded and "latent_channels" in loaded:
                config = loaded
        except (OSError, ValueError):
            pass  # a broken neighbouring config must not block loading a valid safetensors file
    return path, config


def check_vae_header(path) -> None:
    """That `path` (a file or vae/ folder) holds a FLUX.2 VAE decoder, from the safetensors header alone."""
    from safetensors import safe_open

    file, _ = _resolve_vae_path(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated files
        raise ModelFileError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {quote(str(exc))}); "
                             "re-download it") from exc
    _decoder_key_map(keys, str(file))


def _read_decoder_tensors(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """Read only the decoder, post_quant_conv and bn tensors (never the encoder) from a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            mapping, bn_keys = _decoder_key_map(keys, str(file))
            wanted = list(mapping) + list(bn_keys or ())
            return {key: handle.get_tensor(key) for key in wanted}
    except ModelFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated files
        raise ModelFileError(
            f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc

