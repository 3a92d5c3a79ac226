"""The pack inside core graphs: our DiT files as core MODELs, and the official sampler as core SIGMAS / GUIDER /
NOISE for `SamplerCustomAdvanced` (docs/core_graphs.md).

Official parity in a core graph needs four things core does differently (docs/spec.md §C1.4-§C1.5): the official
schedule with its terminal point (Ideogram4 Sigmas), guidance switched by step index and an image-only
unconditional pass (Ideogram4 Guider), the official noise in token order (Ideogram4 Noise), and a start from the
unscaled noise at t_min with no rescaling at the end (the guider patches the model's flow sampling for its run).
"""

from __future__ import annotations

import copy
import functools

import torch
from comfy_api.latest import io

from ..errors import SamplingError
from ..models.latents import core_layout_latent, tokens_to_core_layout
from ..sampler.flow import (
    MAX_SIDE,
    MIN_SIDE,
    PIXELS_PER_TOKEN,
    initial_noise,
    token_grid,
)
from ..sampler.presets import PRESETS, TERMINALS
from ..sampler.schedule import guidance_schedule, official_sigmas
from . import comfy_adapter as comfy
from . import validation
from .loader import DitFileNode, file_inputs, uncond_path
from .types import CORE_CATEGORY

DEFAULT = PRESETS["default"]
LATENT_CHANNELS = 128  # 32 FLUX.2 VAE channels x the DiT's 2x2 patch
CORE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


class IG4CoreModelLoader(DitFileNode):
    @classmethod
    def define_schema(cls):
        files = comfy.model_files(comfy.DIT_FOLDER)
        return io.Schema(
            node_id="IG4CoreModelLoader",
            display_name="Ideogram4 GGUF Loader (core MODEL)",
            category=CORE_CATEGORY,
            search_aliases=["ideogram", "gguf", "unet loader", "diffusion model"],
            description="Loads both Ideogram 4 DiT branches as standard ComfyUI MODELs on core's own Ideogram 4 "
                        "model, from the two-branch Q4_K GGUF or any DiT file the pack reads (single-branch GGUF "
                        "pairs, fp8, bf16). Weights stay packed and decode per layer; core's samplers, guiders, "
                        "LoRA loaders and memory management work with them.",
            inputs=[
                *file_inputs(files),
                io.Combo.Input("compute_dtype", options=list(CORE_DTYPES), default="auto",
                               tooltip="auto: what ComfyUI picks for this device (bf16 on recent GPUs, fp32 on the "
                                       "CPU). Core's Ideogram 4 model runs in bf16 or fp32 only."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The conditional DiT (positive pass)."),
                     io.Model.Output(display_name="model_uncond",
                                     tooltip="The unconditional DiT (negative pass, image tokens only).")],
        )

    @classmethod
    def execute(cls, dit_name, uncond_name=comfy.NONE_CHOICE, compute_dtype="auto"):
        from .core_model import load_core_models

        path = comfy.model_path(comfy.DIT_FOLDER, dit_name)
        cond_model, uncond_model, _ = load_core_models(path, uncond_path(uncond_name),
                                                       dtype=CORE_DTYPES[compute_dtype])
        return io.NodeOutput(cond_model, uncond_model)


class IG4OfficialSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4OfficialSigmas",
            display_name="Ideogram4 Sigmas (official)",
            category=CORE_CATEGORY,
            search_aliases=["ideogram", "scheduler", "sigmas"],
            description="The official Ideogram 4 schedule as SIGMAS (sigma = 1 - t): logit-normal with the resolution "
                        "shift, clamped to [t_min, t_max], ending at the official terminal point t_max = 0.99945 (or "
                        "at t = 1 as core's scheduler does). Presets: quality 48 / mu 0 / std 1.5, default 20 / 0 / "
                        "1.75, turbo 12 / 0.5 / 1.75.",
            inputs=[
                io.Int.Input("steps", default=DEFAULT.steps, min=1, max=200, tooltip="Number of sampling steps."),
                io.Int.Input("width", default=1024, min=MIN_SIDE, max=MAX_SIDE, step=PIXELS_PER_TOKEN,
                             tooltip="Image width in pixels (the shift depends on the pixel count); the same as the "
                                     "latent's."),
                io.Int.Input("height", default=1024, min=MIN_SIDE, max=MAX_SIDE, step=PIXELS_PER_TOKEN,
                             tooltip="Image height in pixels; the same as the latent's."),
                io.Float.Input("mu", default=DEFAULT.mu, min=-5.0, max=5.0, step=0.05,
                               tooltip="Logit-normal mean before the resolution shift."),
                io.Float.Input("std", default=DEFAULT.std, min=0.1, max=5.0, step=0.05,
                               tooltip="Logit-normal spread."),
                io.Combo.Input("terminal", options=list(TERMINALS), default="official",
                               tooltip="official: stop at t = 0.99945 (sigma 5.5e-4) as the official code; one: run to "
                                       "sigma 0 as core's Ideogram4Scheduler."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the latent to be sampled; when connected, the width and height "
                                        "come from it (so they are set in one place, the Empty Latent)."),
            ],
            outputs=[io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def validate_inputs(cls, mu=None, std=None):
        return validation.numbers(cls, mu=mu, std=std)

    @classmethod
    def execute(cls, steps, width, height, mu=DEFAULT.mu, std=DEFAULT.std, terminal="official", latent=None):
        if latent is not None:
            samples = latent["samples"]
            height, width = (int(side) * PIXELS_PER_TOKEN for side in samples.shape[-2:])
        return io.NodeOutput(official_sigmas(steps, width, height, mu, std, terminal))


class IG4OfficialNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4OfficialNoise",
            display_name="Ideogram4 Noise (official)",
            category=CORE_CATEGORY,
            search_aliases=["ideogram", "random noise", "seed"],
            description="The start noise of Ideogram4 Sampler for a seed (drawn on the CPU in the DiT's token order, "
                        "then laid out as core's latent), so a core graph reproduces the pack's sampler image for "
                        "image. Core's Random Noise draws another layout: same seed, different image.",
            inputs=[io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                                 tooltip="The seed (the same image on every device).")],
            outputs=[io.Noise.Output(display_name="noise")],
        )

    @classmethod
    def execute(cls, noise_seed):
        return io.NodeOutput(OfficialNoise(noise_seed))


class OfficialNoise:
    """A core NOISE: `generate_noise(latent)` -> the official noise for this seed in core's latent layout."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if samples.ndim != 4:
            raise SamplingError(f"Ideogram4 Noise needs an image latent (batch, channels, h, w); got "
                                f"{tuple(samples.shape)}.")
        batch, channels, grid_h, grid_w = samples.shape
        tokens = initial_noise(self.seed, batch, grid_h * grid_w, channels)
        return tokens_to_core_layout(tokens, grid_h, grid_w)


class IG4EmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4EmptyLatent",
            display_name="Ideogram4 Empty Latent",
            category=CORE_CATEGORY,
            search_aliases=["ideogram", "empty latent image"],
            description="An empty Ideogram 4 latent for core samplers (core's FLUX.2 layout), marked so that VAE "
                        "Decode (Ideogram4) decodes the sampled result with the official de-normalisation.",
            inputs=[
                io.Int.Input("width", default=1024, min=MIN_SIDE, max=MAX_SIDE, step=PIXELS_PER_TOKEN,
                             tooltip="Image width in pixels, a multiple of 16."),
                io.Int.Input("height", default=1024, min=MIN_SIDE, max=MAX_SIDE, step=PIXELS_PER_TOKEN,
                             tooltip="Image height in pixels, a multiple of 16."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Images per run."),
            ],
            outputs=[io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, width, height, batch_size=1):
        grid_h, grid_w = token_grid(width, height)
        return io.NodeOutput(core_layout_latent(torch.zeros(batch_size, LATENT_CHANNELS, grid_h, grid_w)))


class IG4OfficialGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4OfficialGuider",
            display_name="Ideogram4 Guider (official CFG)",
            category=CORE_CATEGORY,
            search_aliases=["ideogram", "cfg guider", "dual model guider"],
            description="Ideogram 4's asymmetric CFG for SamplerCustomAdvanced: the conditional DiT sees the prompt, "
                        "the unconditional DiT only the image tokens; guidance switches to polish_guidance for the "
                        "last polish_steps steps by step index (as the official sampler, not by sigma range); the run "
                        "starts from the unscaled noise and the time input is rounded as the official code does.",
            inputs=[
                io.Model.Input("model", tooltip="The conditional DiT (Ideogram4 GGUF Loader (core MODEL), or core's "
                                                "UNETLoader)."),
                io.Model.Input("model_uncond", tooltip="The unconditional DiT."),
                io.Conditioning.Input("positive", tooltip="The prompt (Qwen3-VL Encode's core conditioning, or core's "
                                                          "CLIPTextEncode with an ideogram4 CLIP)."),
                io.Float.Input("guidance", default=DEFAULT.guidance, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the main steps (official 7.0)."),
                io.Int.Input("polish_steps", default=DEFAULT.polish_steps, min=0, max=200,
                             tooltip="The last steps run at polish_guidance (official: 3 for 48 steps, 2 for 20, 1 "
                                     "for 12)."),
                io.Float.Input("polish_guidance", default=DEFAULT.polish_guidance, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the polish steps (official 3.0)."),
                io.Boolean.Input("round_t", default=True,
                                 tooltip="Round the time input to the DiT's compute dtype before the time embedding "
                                         "(bf16: 0.8331 -> 0.83203125), as the official code does; no effect in fp32."),
            ],
            outputs=[io.Guider.Output(display_name="guider")],
        )

    @classmethod
    def validate_inputs(cls, guidance=None, polish_guidance=None):
        return validation.numbers(cls, guidance=guidance, polish_guidance=polish_guidance)

    @classmethod
    def execute(cls, model, model_uncond, positive, guidance=DEFAULT.guidance, polish_steps=DEFAULT.polish_steps,
                polish_guidance=DEFAULT.polish_guidance, round_t=True):
        guider = guider_class()(model, model_uncond, guidance=guidance, polish_steps=polish_steps,
                                polish_guidance=polish_guidance, round_t=round_t)
        guider.set_conds(positive)
        return io.NodeOutput(guider)


CORE_GRAPH_NODES = [IG4CoreModelLoader, IG4OfficialSigmas, IG4OfficialGuider, IG4OfficialNoise, IG4EmptyLatent]


# ---------------------------------------------------------------------------------------------------------------
# The guider (needs ComfyUI's sampler classes, so it is built on first use)


@functools.cache
def _official_flow_class(base: type) -> type:
    class OfficialFlowSampling(base):
        """core's flow sampling, except where a text-to-image run starts and ends: from the unscaled noise at t_min
        (core: sigma_0 * noise) and without dividing the result by 1 - sigma_last (the official loop returns z at
        t_max as it is)."""

        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            if latent_image is None or not torch.count_nonzero(latent_image):
                return noise * getattr(self, "noise_scale", 1.0)
            return super().noise_scaling(sigma, noise, latent_image, max_denoise)

        def inverse_noise_scaling(self, sigma, latent):
            return latent

    return OfficialFlowSampling


def official_flow_sampling(model_sampling):
    """A copy of a model's `model_sampling` with the official start and end (shares its tensors)."""
    patched = copy.copy(model_sampling)
    patched.__class__ = _official_flow_class(type(model_sampling))
    return patched


@functools.cache
def guider_class():
    import comfy.model_management
    import comfy.sampler_helpers
    import comfy.samplers

    class Ideogram4Guider(comfy.samplers.CFGGuider):
        """Asymmetric CFG over two core MODELs with the official per-step guidance (docs/core_graphs.md)."""

        def __init__(self, model, model_uncond, *, guidance, polish_steps, polish_guidance, round_t=True):
            for name, patcher in (("model", model), ("model_uncond", model_uncond)):
                if patcher is None or not hasattr(patcher, "get_model_object"):
                    raise SamplingError(f"Ideogram4 Guider: connect a MODEL to '{name}'.")
            if model_uncond is model:
                raise SamplingError("Ideogram4 Guider: 'model' and 'model_uncond' are the same MODEL; connect the "
                                    "unconditional DiT (the loader's second output) to model_uncond.")
            patched = model.clone()
            patched.add_object_patch("model_sampling", official_flow_sampling(model.get_model_object("model_sampling")))
            super().__init__(patched)
            self.uncond_model_patcher = model_uncond
            self.guidance, self.polish_steps, self.polish_guidance = float(guidance), int(polish_steps), float(
                polish_guidance)
            self.round_t = bool(round_t)
            self.uncond_inner = None

        def set_conds(self, positive):
            # The unconditional pass gets a null cond: no c_crossattn, so core's model runs the image tokens alone.
            self.inner_set_conds({"positive": positive, "negative": [[None, {}]]})

        def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                         disable_pbar=False, seed=None, latent_shapes=None):
            negative = {"negative": [c.copy() for c in self.conds["negative"]]}
            self.uncond_inner, negative, self.uncond_loaded = comfy.sampler_helpers.prepare_sampling(
                self.uncond_model_patcher, noise.shape, negative, self.uncond_model_patcher.model_options)
            self._negative = negative["negative"]
            self.uncond_model_patcher.pre_run()
            try:
                return super().outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar,
                                            seed, latent_shapes=latent_shapes)
            finally:
                self.uncond_model_patcher.cleanup()
                comfy.sampler_helpers.cleanup_models({"negative": self._negative}, self.uncond_loaded)
                self.uncond_inner = None

        def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
                         seed, latent_shapes=None):
            steps = len(sigmas) - 1
            self._sigmas = sigmas.float()
            self._guidance = guidance_schedule(steps, self.guidance, min(self.polish_steps, steps), self.polish_guidance)
            image = latent_image
            if image is not None and torch.count_nonzero(image) > 0:
                image = self.uncond_inner.process_latent_in(image)
            self._uncond_conds = comfy.samplers.process_conds(self.uncond_inner, noise, {"negative": self._negative},
                                                              device, image, denoise_mask, seed,
                                                              latent_shapes=latent_shapes)["negative"]
            dtype = self.inner_model.get_dtype_inference()
            self._t_dtype = dtype if self.round_t and dtype in (torch.bfloat16, torch.float16) else None
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                        disable_pbar, seed, latent_shapes=latent_shapes)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (core's signature)
            step = int((self._sigmas.to(timestep.device) - timestep.reshape(-1)[0].float()).abs().argmin())
            scale = self._guidance[min(step, len(self._guidance) - 1)]
            sigma = timestep
            if self._t_dtype is not None:
                # The official model reads t rounded to its compute dtype; core's model computes t = 1 - sigma, so
                # feed sigma = 1 - round(t) (exact in float32) and rescale the result to the true sigma below.
                sigma = 1.0 - (1.0 - timestep.float()).to(self._t_dtype).float()
            positive = self.conds.get("positive")
            cond = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, sigma, model_options)[0]
            uncond_options = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
            uncond = comfy.samplers.calc_cond_batch(self.uncond_inner, [self._uncond_conds], x, sigma,
                                                    uncond_options)[0]
            denoised = comfy.samplers.cfg_function(self.inner_model, cond, uncond, scale, x, sigma,
                                                   model_options=model_options, cond=positive,
                                                   uncond=self._uncond_conds)
            if sigma is timestep:
                return denoised
            # denoised = x - v * sigma_model (flow): the same velocity at the true sigma
            ratio = (timestep.float() / sigma).reshape(-1, *([1] * (x.ndim - 1)))
            return x - (x - denoised) * ratio

    return Ideogram4Guider
