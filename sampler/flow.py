"""Euler flow-matching sampler with asymmetric CFG (official Ideogram 4 loop, docs/spec.md §3).

Each step evaluates the conditional branch on [text rows | image rows] and the unconditional branch on the image
rows alone, mixes v = g * v_cond + (1 - g) * v_uncond in float32 and moves z by v * (t_next - t_cur), t rising
from ~0 (noise) to the terminal point (~1, data).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import SamplingError
from .presets import SamplerSettings, check_seed, sampler_settings
from .schedule import timesteps

# One image token covers 16 x 16 pixels (VAE x8, DiT patch x2).
PIXELS_PER_TOKEN = 16
# Documented range of the model (official docs, ComfyUI scheduler); only the multiple of 16 is a hard limit there.
MIN_SIDE, MAX_SIDE = 256, 2048

StepCallback = Callable[[int, int, torch.Tensor], None]


def token_grid(width: int, height: int) -> tuple[int, int]:
    """(gh, gw) image-token grid for a pixel size, after checking it is one the model supports."""
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or side % PIXELS_PER_TOKEN or not MIN_SIDE <= side <= MAX_SIDE:
            raise SamplingError(
                f"{name} {side!r} is not supported: use a multiple of {PIXELS_PER_TOKEN} between {MIN_SIDE} and "
                f"{MAX_SIDE} pixels."
            )
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


def initial_noise(seed: int, batch_size: int, num_tokens: int, channels: int) -> torch.Tensor:
    """(B, N, C) float32 standard normal in token order from a CPU generator.

    Drawing on the CPU makes a seed give the same image on every device (CPU and CUDA generators differ); it equals
    diffusers' `randn_tensor` with a CPU generator. The official code draws on the pipeline device instead.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((batch_size, num_tokens, channels), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample(
    cond_branch,
    uncond_branch,
    projected_text: torch.Tensor,
    width: int,
    height: int,
    *,
    seed: int = 0,
    batch_size: int = 1,
    settings: SamplerSettings | None = None,
    noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample latent tokens (B, N, C) float32 in model space (before the latent de-normalisation).

    cond_branch / uncond_branch: `Ideogram4DiT` built with / without text. projected_text: the conditional
    branch's `project_text(features)` for one prompt, (n, hidden) or (1, n, hidden), computed once per image.
    settings: `sampler_settings(preset, **overrides)`; default the "default" preset (20 steps).
    noise: optional (B, N, C) start latents replacing the seeded draw.
    callback(step, total, x0): after each step, step = steps done (1..total), x0 = the current clean-latent
    estimate z + (1 - t) * v. An exception raised by the callback stops sampling and propagates unchanged (this is
    how interruption works).
    """
    settings = settings or sampler_settings("default")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SamplingError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    grid = token_grid(width, height)
    num_tokens = grid[0] * grid[1]
    channels = cond_branch.config.in_channels
    if uncond_branch.config != cond_branch.config:
        raise SamplingError("The conditional and unconditional branches have different shapes; load a matching pair.")
    hidden = cond_branch.config.hidden_size
    shape = None if projected_text is None else tuple(projected_text.shape)
    if shape is None or len(shape) not in (2, 3) or shape[-1] != hidden or (len(shape) == 3 and shape[0] not in (
        1, batch_size
    )):
        raise SamplingError(
            "projected_text must be the conditional branch's project_text(...) output for one prompt, (n, "
            f"{hidden}) or (1 or batch_size, n, {hidden}); got {shape}."
        )
    check_seed(seed)

    device = cond_branch.device
    if noise is None:
        noise = initial_noise(seed, batch_size, num_tokens, channels)
    elif tuple(noise.shape) != (batch_size, num_tokens, channels):
        raise SamplingError(f"noise has shape {tuple(noise.shape)}, expected {(batch_size, num_tokens, channels)}.")
    z = noise.to(device=device, dtype=torch.float32)

    t = timesteps(settings.steps, width, height, settings.mu, settings.std, settings.terminal)
    guidance = settings.per_step_guidance()
    text = projected_text.to(device=device, dtype=cond_branch.compute_dtype)
    text_len = text.shape[-2]

    # RoPE tables once per image; the unconditional branch reads the image rows of the same table.
    cond_rotary = cond_branch.rotary(text_len, grid)
    same_place = uncond_branch.device == device and uncond_branch.compute_dtype == cond_branch.compute_dtype
    uncond_rotary = cond_rotary if same_place else uncond_branch.rotary(0, grid)

    for i in range(settings.steps):
        t_cur = t[i].item()
        t_in = torch.full((batch_size,), t_cur, dtype=torch.float32)
        if settings.round_t:
            # The reference casts t to the DiT's compute dtype before the sinusoid (bf16: 0.8331 -> 0.83203125).
            t_in = t_in.to(cond_branch.compute_dtype)
        v_cond = cond_branch(z, t_in, text, grid, cond_rotary)
        v_uncond = uncond_branch(z.to(uncond_branch.device), t_in, None, grid, uncond_rotary).to(device)
        g = guidance[i]
        v = g * v_cond + (1.0 - g) * v_uncond
        if callback is not None:
            x0 = z + (1.0 - t_cur) * v
        z = z + v * (t[i + 1] - t[i]).item()
        if callback is not None:
            callback(i + 1, settings.steps, x0)
    return z
