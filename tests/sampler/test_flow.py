"""The Euler / asymmetric-CFG sampler against diffusers 0.42.1 `Ideogram4Pipeline`, plus its own contract."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "models"))
from dit_reference import official_state_dict, our_config, tiny_diffusers_dit  # noqa: E402
from pipeline_reference import pipeline_text_features, tiny_pipeline  # noqa: E402

from ideogram4_gguf.errors import SamplingError  # noqa: E402
from ideogram4_gguf.models.dit import Ideogram4DiT  # noqa: E402
from ideogram4_gguf.models.dit_loader import StateDictWeights  # noqa: E402
from ideogram4_gguf.sampler.flow import initial_noise, sample, token_grid  # noqa: E402
from ideogram4_gguf.sampler.presets import sampler_settings  # noqa: E402
from ideogram4_gguf.sampler.schedule import T_MAX, T_MIN  # noqa: E402

PROMPT = "a red fox"
SIZE = 256  # 16 x 16 image tokens


def _branches(cond_ref, uncond_ref, dtype=torch.float32):
    cond = Ideogram4DiT.from_weights(our_config(), StateDictWeights(official_state_dict(cond_ref)), compute_dtype=dtype)
    uncond = Ideogram4DiT.from_weights(
        our_config(), StateDictWeights(official_state_dict(uncond_ref)), with_text=False, compute_dtype=dtype
    )
    return cond, uncond


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def small_pair():
    cond, uncond = _branches(tiny_diffusers_dit(11), tiny_diffusers_dit(12))
    text = cond.project_text(torch.randn(9, cond.config.llm_features_dim, generator=torch.Generator().manual_seed(3)))
    return cond, uncond, text


def test_end_to_end_latents_match_diffusers_pipeline(pipe):
    seed, schedule = 1234, [7.0, 7.0, 7.0, 3.0]
    with torch.no_grad():
        expected = pipe(
            PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_schedule=schedule, mu=0.0, std=1.5,
            max_sequence_length=32, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed),
        ).images
    cond, uncond = _branches(pipe.transformer, pipe.unconditional_transformer)
    text = cond.project_text(pipeline_text_features(pipe, PROMPT, 32))
    settings = sampler_settings("quality", steps=4, guidance_schedule=schedule, terminal="one")
    got = sample(cond, uncond, text, SIZE, SIZE, seed=seed, settings=settings)

    assert got.shape == expected.shape == (1, 256, 32) and got.dtype == torch.float32
    noise = initial_noise(seed, 1, 256, 32)
    assert (expected - noise).abs().max() > 1.0  # the sampler moved the latents a long way from the noise
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-3, rel


def test_noise_is_the_pipeline_cpu_generator_draw(pipe):
    with torch.no_grad():
        latents = pipe.prepare_latents(2, 256, 32, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(5))
    torch.testing.assert_close(initial_noise(5, 2, 256, 32), latents, rtol=0, atol=0)


def test_official_terminal_differs_only_by_the_last_step(small_pair):
    cond, uncond, text = small_pair
    estimates = []
    official = sample(cond, uncond, text, SIZE, SIZE, seed=7, settings=sampler_settings("turbo", steps=3),
                      callback=lambda step, total, x0: estimates.append((step, total, x0)))
    one = sample(cond, uncond, text, SIZE, SIZE, seed=7, settings=sampler_settings("turbo", steps=3, terminal="one"))
    assert [(s, n) for s, n, _ in estimates] == [(1, 3), (2, 3), (3, 3)]
    # Integrating the last step to t = 1 is exactly the last clean-latent estimate z + (1 - t) v.
    torch.testing.assert_close(one, estimates[-1][2], rtol=0, atol=1e-5)
    assert (one - official).abs().max() > 1e-3


def test_one_step_is_a_single_euler_move_to_the_terminal(small_pair):
    cond, uncond, text = small_pair
    noise = initial_noise(8, 1, 256, 32)
    official = sample(cond, uncond, text, SIZE, SIZE, noise=noise, settings=sampler_settings("turbo", steps=1))
    one = sample(cond, uncond, text, SIZE, SIZE, noise=noise,
                 settings=sampler_settings("turbo", steps=1, terminal="one"))
    t_min, t_max = (float(torch.tensor(x, dtype=torch.float32)) for x in (T_MIN, T_MAX))
    # Both move along the same velocity v = (z1 - z0) / (t1 - t0); only the end point differs.
    torch.testing.assert_close((official - noise) / (t_max - t_min), (one - noise) / (1.0 - t_min), rtol=1e-4,
                               atol=1e-4)


def test_batch_draws_one_noise_tensor_and_samples_each_row(small_pair):
    cond, uncond, text = small_pair
    settings = sampler_settings("turbo", steps=2)
    batch = sample(cond, uncond, text, SIZE, SIZE, seed=3, batch_size=2, settings=settings)
    noise = initial_noise(3, 2, 256, 32)
    row1 = sample(cond, uncond, text, SIZE, SIZE, batch_size=1, settings=settings, noise=noise[1:])
    assert batch.shape == (2, 256, 32)
    torch.testing.assert_close(batch[1:], row1, rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 0.1


def test_callback_exception_stops_sampling(small_pair):
    cond, uncond, text = small_pair
    calls = []

    class Interrupted(Exception):
        pass

    def stop_at_two(step, total, x0):
        calls.append(step)
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        sample(cond, uncond, text, SIZE, SIZE, settings=sampler_settings("turbo"), callback=stop_at_two)
    assert calls == [1, 2]


def test_round_t_follows_the_compute_dtype(small_pair):
    # In bf16 the reference feeds bf16-rounded t; switching it off changes the result, in fp32 it is a no-op.
    cond, uncond, text = small_pair
    on = sample(cond, uncond, text, SIZE, SIZE, settings=sampler_settings("turbo", steps=2, round_t=True))
    off = sample(cond, uncond, text, SIZE, SIZE, settings=sampler_settings("turbo", steps=2, round_t=False))
    torch.testing.assert_close(on, off, rtol=0, atol=0)
    cond16, uncond16 = _branches(tiny_diffusers_dit(11), tiny_diffusers_dit(12), dtype=torch.bfloat16)
    text16 = text.to(torch.bfloat16)
    on16 = sample(cond16, uncond16, text16, SIZE, SIZE, settings=sampler_settings("turbo", steps=2, round_t=True))
    off16 = sample(cond16, uncond16, text16, SIZE, SIZE, settings=sampler_settings("turbo", steps=2, round_t=False))
    assert (on16 - off16).abs().max() > 0
    assert ((on16 - on).norm() / on.norm()).item() < 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=250), "multiple of 16"),
        (dict(height=4096), "between 256 and 2048"),
        (dict(width=128), "between 256 and 2048"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_sizes_and_batch_raise_sampling_error(small_pair, kwargs, message):
    cond, uncond, text = small_pair
    args = dict(width=SIZE, height=SIZE, batch_size=1) | kwargs
    with pytest.raises(SamplingError, match=message):
        sample(cond, uncond, text, args["width"], args["height"], batch_size=args["batch_size"])


def test_bad_seed_and_text_raise_sampling_error(small_pair):
    cond, uncond, text = small_pair
    with pytest.raises(SamplingError, match="seed"):
        sample(cond, uncond, text, SIZE, SIZE, seed=None)
    with pytest.raises(SamplingError, match="projected_text"):
        sample(cond, uncond, torch.zeros(9, 1000), SIZE, SIZE)
    with pytest.raises(SamplingError, match="projected_text"):
        sample(cond, uncond, text.expand(3, -1, -1), SIZE, SIZE, batch_size=2)


def test_token_grid():
    assert token_grid(1024, 1024) == (64, 64)
    assert token_grid(2048, 768) == (48, 128)  # (gh, gw): height first
    assert token_grid(1920, 1088) == (68, 120)
