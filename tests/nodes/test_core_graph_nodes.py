"""The core-graph nodes' pure parts, without ComfyUI (the real-ComfyUI runs are in tests/comfyui/test_core_graph.py):
sigmas = 1 - the official schedule, the official noise in core's layout, the marked empty latent."""

import pytest
import torch

from ideogram4_gguf.models import latents as L
from ideogram4_gguf.nodes.core_graph import IG4EmptyLatent, IG4OfficialNoise, IG4OfficialSigmas
from ideogram4_gguf.sampler.flow import initial_noise
from ideogram4_gguf.sampler.schedule import T_MAX, timesteps


@pytest.mark.parametrize("terminal", ["official", "one"])
def test_sigmas_are_one_minus_the_official_schedule(terminal):
    sigmas = IG4OfficialSigmas.execute(steps=20, width=1024, height=768, mu=0.0, std=1.75, terminal=terminal).args[0]
    t = timesteps(20, 1024, 768, 0.0, 1.75, terminal)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (21,)
    assert torch.equal(sigmas, 1.0 - t) and bool((sigmas[1:] < sigmas[:-1]).all())
    assert sigmas[-1].item() == pytest.approx(1.0 - T_MAX if terminal == "official" else 0.0, abs=1e-7)


def test_sigmas_take_the_size_from_a_connected_latent():
    latent = IG4EmptyLatent.execute(width=512, height=1024, batch_size=1).args[0]
    from_latent = IG4OfficialSigmas.execute(steps=12, width=256, height=256, mu=0.5, std=1.75, latent=latent).args[0]
    assert torch.equal(from_latent, 1.0 - timesteps(12, 512, 1024, 0.5, 1.75))


def test_noise_is_the_samplers_noise_in_core_layout():
    latent = IG4EmptyLatent.execute(width=320, height=256, batch_size=2).args[0]
    assert latent[L.IDEOGRAM4_LATENT_KEY] == L.IDEOGRAM4_CORE_LAYOUT_VERSION
    assert latent["samples"].shape == (2, 128, 16, 20) and not latent["samples"].any()
    noise = IG4OfficialNoise.execute(noise_seed=1234).args[0].generate_noise(latent)
    tokens = initial_noise(1234, 2, 16 * 20, 128)  # what Ideogram4 Sampler starts from
    back, grid = L.latent_dict_to_tokens(L.core_layout_latent(noise))
    assert grid == (16, 20) and torch.equal(back, tokens)
