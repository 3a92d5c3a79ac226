"""Sampler settings and the official presets (official `sampler_configs.PRESETS`, docs/spec.md §3.4).

Every knob of a preset can be overridden; an explicit `guidance_schedule` (chronological, first entry = noisiest
step) replaces the guidance / polish pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import SamplingError
from .schedule import guidance_schedule

TERMINALS = ("official", "one")


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    mu: float  # logit-normal mean before the resolution shift
    std: float  # logit-normal standard deviation
    guidance: float = 7.0
    polish_steps: int = 0  # the last `polish_steps` steps use `polish_guidance` instead of `guidance`
    polish_guidance: float = 3.0
    guidance_schedule: tuple[float, ...] | None = None  # per step, chronological; overrides the three above
    terminal: str = "official"  # "official": stop at t_max = 0.99945; "one": integrate to t = 1 (diffusers, ComfyUI)
    round_t: bool = True  # feed t rounded to the compute dtype to the time embedding, as the reference does

    def __post_init__(self):
        for name in ("mu", "std", "guidance", "polish_guidance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingError(f"{name} must be a finite number, got {value!r} (a NaN or infinite guidance gives "
                                    "a black image).")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SamplingError(f"steps must be a whole number >= 1, got {self.steps!r}.")
        if not self.std > 0:
            raise SamplingError(f"std (the schedule's spread) must be > 0, got {self.std!r}.")
        if not 0 <= self.polish_steps <= self.steps:
            raise SamplingError(f"polish_steps must be between 0 and steps ({self.steps}), got {self.polish_steps!r}.")
        if self.terminal not in TERMINALS:
            raise SamplingError(f"terminal must be one of {TERMINALS}, got {self.terminal!r}.")
        if self.guidance_schedule is not None:
            object.__setattr__(self, "guidance_schedule", tuple(float(g) for g in self.guidance_schedule))
            if not all(math.isfinite(g) for g in self.guidance_schedule):
                raise SamplingError(f"guidance_schedule must hold finite numbers, got {self.guidance_schedule!r}.")
            if len(self.guidance_schedule) != self.steps:
                raise SamplingError(
                    f"guidance_schedule has {len(self.guidance_schedule)} entries but there are {self.steps} steps; "
                    "give one guidance value per step (first = noisiest) or leave it empty to use guidance / "
                    "polish_guidance."
                )

    def per_step_guidance(self) -> list[float]:
        """One guidance value per step, chronological (first = noisiest)."""
        if self.guidance_schedule is not None:
            return list(self.guidance_schedule)
        return guidance_schedule(self.steps, self.guidance, self.polish_steps, self.polish_guidance)


PRESETS: dict[str, SamplerSettings] = {
    "quality": SamplerSettings(steps=48, mu=0.0, std=1.5, guidance=7.0, polish_steps=3, polish_guidance=3.0),
    "default": SamplerSettings(steps=20, mu=0.0, std=1.75, guidance=7.0, polish_steps=2, polish_guidance=3.0),
    "turbo": SamplerSettings(steps=12, mu=0.5, std=1.75, guidance=7.0, polish_steps=1, polish_guidance=3.0),
}


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds; ComfyUI's seed widgets end here too


def check_seed(seed) -> int:
    """A seed as an int in [0, 2^64 - 1]; negative or larger seeds are refused (not wrapped), so one seed always
    means one image."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SamplingError(f"seed must be a whole number, got {seed!r}.")
    if not 0 <= seed <= MAX_SEED:
        raise SamplingError(f"seed {seed} is out of range: use a whole number from 0 to {MAX_SEED} (2^64 - 1).")
    return seed


def sampler_settings(preset: str = "default", **overrides) -> SamplerSettings:
    """A preset with some knobs replaced; overrides that are None keep the preset's value."""
    if preset not in PRESETS:
        raise SamplingError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    known = {f.name for f in dataclasses.fields(SamplerSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SamplingError(f"Unknown sampler setting(s) {unknown}; known: {sorted(known)}.")
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
