"""Schedule and presets against diffusers 0.42.1 (`_logit_normal_sigmas`, `FlowMatchEulerDiscreteScheduler`) and
the official numbers in docs/spec.md §3.2-§3.4."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu

from ideogram4_gguf.errors import SamplingError
from ideogram4_gguf.sampler.presets import PRESETS, sampler_settings
from ideogram4_gguf.sampler.schedule import T_MAX, T_MIN, schedule_mean, timesteps


@pytest.mark.parametrize("preset", ["quality", "default", "turbo"])
@pytest.mark.parametrize("width, height", [(1024, 1024), (2048, 2048), (1536, 1024), (256, 2048)])
def test_schedule_matches_diffusers_sigmas(preset, width, height):
    p = PRESETS[preset]
    mean = _resolution_aware_mu(height=height, width=width, base_mu=p.mu)
    assert schedule_mean(p.mu, width, height) == pytest.approx(mean, abs=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=_logit_normal_sigmas(p.steps, mean, std=p.std).tolist())
    diffusers_t = 1.0 - scheduler.sigmas  # model time, with diffusers' terminal sigma 0 -> t = 1

    ours = timesteps(p.steps, width, height, p.mu, p.std)
    assert ours.dtype == torch.float32 and ours.shape == (p.steps + 1,)
    assert (ours[:-1] - diffusers_t[:-1]).abs().max().item() <= 1e-6
    assert ours[-1].item() == pytest.approx(T_MAX, abs=1e-7)  # official terminal
    one = timesteps(p.steps, width, height, p.mu, p.std, terminal="one")
    torch.testing.assert_close(one[:-1], ours[:-1], rtol=0, atol=0)
    assert one[-1].item() == 1.0 == diffusers_t[-1].item()


# docs/spec.md §3.2 test vectors: t[1], t[2], t[N-2], t[N-1] (4 decimals), chronological.
SPEC_TABLE = [
    ("quality", 1024, (0.0230, 0.0359, 0.8704, 0.9139)),
    ("quality", 2048, (0.0116, 0.0183, 0.7705, 0.8414)),
    ("default", 1024, (0.0273, 0.0504, 0.8249, 0.8989)),
    ("default", 2048, (0.0139, 0.0259, 0.7019, 0.8164)),
    ("turbo", 1024, (0.0263, 0.0528, 0.6224, 0.7733)),
    ("turbo", 2048, (0.0133, 0.0271, 0.4518, 0.6304)),
]


@pytest.mark.parametrize("preset, side, expected", SPEC_TABLE)
def test_schedule_spec_test_vectors(preset, side, expected):
    p = PRESETS[preset]
    t = timesteps(p.steps, side, side, p.mu, p.std)
    n = p.steps
    got = (t[1].item(), t[2].item(), t[n - 2].item(), t[n - 1].item())
    assert got == pytest.approx(expected, abs=5e-5)
    assert t[0].item() == pytest.approx(1.2339457e-4, rel=1e-6)
    assert t[-1].item() == pytest.approx(0.99945, abs=1e-5)
    assert torch.all(t[1:] > t[:-1])


def test_quality_1024_full_digits():
    t = timesteps(48, 1024, 1024, 0.0, 1.5)
    assert t[:4].tolist() == pytest.approx([1.2339e-4, 0.02301335, 0.03589356, 0.04768277], abs=1e-7)
    assert t[-5:].tolist() == pytest.approx([0.7992068, 0.8331382, 0.870383, 0.9138915, 0.9994472], abs=1e-7)
    assert T_MIN == pytest.approx(1.2339457e-4, rel=1e-7) and T_MAX == pytest.approx(0.99944722, rel=1e-8)


def test_presets_are_the_official_ones():
    # official sampler_configs.PRESETS (docs/spec.md §3.4); the quality schedule equals diffusers' default
    # guidance_schedule
    import inspect

    from diffusers import Ideogram4Pipeline

    default_schedule = inspect.signature(Ideogram4Pipeline.__call__).parameters["guidance_schedule"].default
    assert PRESETS["quality"].per_step_guidance() == list(default_schedule) == [7.0] * 45 + [3.0] * 3
    assert (PRESETS["quality"].mu, PRESETS["quality"].std) == (0.0, 1.5)
    assert PRESETS["default"].per_step_guidance() == [7.0] * 18 + [3.0] * 2
    assert (PRESETS["default"].steps, PRESETS["default"].mu, PRESETS["default"].std) == (20, 0.0, 1.75)
    assert PRESETS["turbo"].per_step_guidance() == [7.0] * 11 + [3.0]
    assert (PRESETS["turbo"].steps, PRESETS["turbo"].mu, PRESETS["turbo"].std) == (12, 0.5, 1.75)
    assert all(p.terminal == "official" and p.round_t for p in PRESETS.values())


def test_overrides_replace_preset_knobs():
    s = sampler_settings("quality", steps=10, polish_steps=4, polish_guidance=2.5, guidance=5.0, mu=None)
    assert s.per_step_guidance() == [5.0] * 6 + [2.5] * 4
    assert s.mu == 0.0 and s.std == 1.5
    explicit = sampler_settings("turbo", steps=3, guidance_schedule=[9, 8, 1])
    assert explicit.per_step_guidance() == [9.0, 8.0, 1.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "steps"),
        (dict(steps=4, guidance_schedule=[7.0, 3.0]), "guidance_schedule has 2 entries"),
        (dict(polish_steps=50), "polish_steps"),
        (dict(terminal="zero"), "terminal"),
        (dict(std=0.0), "std"),
        (dict(cfg=3.0), "Unknown sampler setting"),
    ],
)
def test_bad_settings_raise_sampling_error(overrides, message):
    with pytest.raises(SamplingError, match=message):
        sampler_settings("default", **overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(SamplingError, match="default.*quality.*turbo"):
        sampler_settings("fast")


def _official_timesteps(steps, width, height, mu, std, grid_dtype=torch.float32):
    """The official recipe, restated (ideogram-oss/ideogram4 `make_step_intervals` + `LogitNormalSchedule`):
    float32 step positions, the formula in float64, the result rounded to float32; t at u = 1, (N-1)/N, ..., 0.
    grid_dtype=float64: the positions as diffusers 0.42.1 builds them (`_logit_normal_sigmas`)."""
    intervals = torch.linspace(0.0, 1.0, steps + 1, dtype=grid_dtype)
    y = schedule_mean(mu, width, height) + std * torch.special.ndtri(intervals.to(torch.float64))
    t_min, t_max = 1.0 / (1 + math.exp(0.5 * 18.0)), 1.0 / (1 + math.exp(0.5 * -15.0))
    return (1 - torch.special.expit(y)).clamp(t_min, t_max).to(torch.float32).flip(0)


def test_step_positions_are_float32_like_the_official_code():
    # Bit-equal to the official recipe for every step count 1..64 at a few sizes; float64 positions (diffusers)
    # move some t by one float32 ulp in that range, so this test tells the two apart.
    moved_by_float64 = 0
    for steps in range(1, 65):
        for width, height, mu, std in [(1024, 1024, 0.0, 1.5), (2048, 1536, 0.5, 1.75), (512, 768, 0.3, 1.1)]:
            ours = timesteps(steps, width, height, mu, std)
            assert torch.equal(ours, _official_timesteps(steps, width, height, mu, std)), (steps, width, height)
            float64 = _official_timesteps(steps, width, height, mu, std, grid_dtype=torch.float64)
            assert (ours - float64).abs().max().item() <= 1.2e-7  # at most one float32 ulp of t < 1
            moved_by_float64 += int(not torch.equal(ours, float64))
    assert moved_by_float64 > 0
