"""The official logit-normal time schedule with resolution shift (docs/spec.md §3.2).

Model time t: 0 = pure noise, 1 = clean data. diffusers and ComfyUI use sigma = 1 - t.
"""

from __future__ import annotations

import math

import torch

from ..errors import SamplingError

# Official clamps, written there as logSNR bounds 18 / -15 with t = sigmoid(-logsnr / 2).
T_MIN = 1.0 / (1.0 + math.exp(9.0))  # 1.2339457e-4: the first model evaluation
T_MAX = 1.0 / (1.0 + math.exp(-7.5))  # 0.99944722: where the official run stops

# The schedule's mean moves by half the log of the pixel count relative to 512 x 512 (more steps near the noise
# end for larger images).
BASE_PIXELS = 512 * 512


def schedule_mean(mu: float, width: int, height: int) -> float:
    return mu + 0.5 * math.log(width * height / BASE_PIXELS)


def timesteps(
    steps: int, width: int, height: int, mu: float, std: float, terminal: str = "official"
) -> torch.Tensor:
    """steps + 1 model times, chronological: t[0] = T_MIN, ..., t[steps] = terminal; float32.

    T(u) = clamp(1 - sigmoid(mean + std * probit(u)), T_MIN, T_MAX) on u = 1, (N-1)/N, ..., 0, evaluated in float64
    and then rounded to float32. The step positions u are built in float32, as the official `make_step_intervals`
    does (`torch.linspace(0, 1, N + 1, dtype=float32)`): diffusers builds them in float64, which moves some t by one
    float32 ulp, and the time embedding magnifies that ~1e4 times (docs/spec.md §3.2).
    The model is evaluated at t[0..steps-1]; t[steps] only sets the last step's length: T_MAX for
    terminal="official", 1.0 for terminal="one" (diffusers / ComfyUI append sigma 0).
    """
    if steps < 1:
        raise SamplingError(f"steps must be >= 1, got {steps}.")
    if terminal not in ("official", "one"):
        raise SamplingError(f"terminal must be 'official' or 'one', got {terminal!r}.")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32).to(torch.float64).flip(0)
    y = schedule_mean(mu, width, height) + std * torch.special.ndtri(u)
    t = (1.0 - torch.special.expit(y)).clamp(T_MIN, T_MAX).to(torch.float32)
    if terminal == "one":
        t[-1] = 1.0
    return t


def official_sigmas(steps: int, width: int, height: int, mu: float, std: float,
                    terminal: str = "official") -> torch.Tensor:
    """The schedule as ComfyUI SIGMAS: sigma = 1 - t (float32, descending), steps + 1 values; the last is
    1 - T_MAX for terminal="official", 0 for terminal="one"."""
    return 1.0 - timesteps(steps, width, height, mu, std, terminal)


def guidance_schedule(steps: int, guidance: float, polish_steps: int, polish_guidance: float) -> list[float]:
    """Guidance of each step, chronological: (steps - k) x guidance, then k = polish_steps x polish_guidance.

    The official code indexes its tuple by loop index (index 0 = last step); this is the same schedule written
    first-step-first, as diffusers takes it (docs/spec.md §3.3). The switch is by step index, not by sigma range.
    """
    if not 0 <= polish_steps <= steps:
        raise SamplingError(f"polish_steps must be between 0 and steps ({steps}), got {polish_steps}.")
    return [float(guidance)] * (steps - polish_steps) + [float(polish_guidance)] * polish_steps
