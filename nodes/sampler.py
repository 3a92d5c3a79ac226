"""Ideogram4 Sampler: the official Euler flow-matching loop with asymmetric CFG -> LATENT.

Two nodes: the sampler runs a preset as it is (quality 48 steps, default 20, turbo 12: every value the official
code uses); the advanced sampler shows every value it runs with (steps, cfg, polish steps, mu, std, terminal).
`IG4Sampler`, the one sampler of workflows saved before, whose 0 / -1 widget values meant "the preset's", stays
registered (deprecated) so those workflows load and run as saved.
"""

from __future__ import annotations

from comfy_api.latest import io

from .. import pipeline
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY, Ideogram4Conditioning, Ideogram4Model


class IG4Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4Sampler",
            display_name="Ideogram4 Sampler (legacy)",
            is_deprecated=True,
            category=CATEGORY,
            description="Samples an image latent with Ideogram 4's official schedule (logit-normal with resolution "
                        "shift), asymmetric CFG (the unconditional branch sees image tokens only) and per-step "
                        "guidance with polish steps. Presets: quality 48 steps, default 20, turbo 12. A seed gives "
                        "the same image on any device.",
            inputs=[
                Ideogram4Model.Input("model", tooltip="From Ideogram4 Q4_K Loader."),
                Ideogram4Conditioning.Input("conditioning", tooltip="From Qwen3-VL Encode."),
                io.Int.Input("width", default=1024, min=256, max=2048, step=16,
                             tooltip="Image width in pixels: a multiple of 16, 256..2048 (trained around 2 MP)."),
                io.Int.Input("height", default=1024, min=256, max=2048, step=16,
                             tooltip="Image height in pixels: a multiple of 16, 256..2048."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Images per run (one prompt)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the noise is drawn on the CPU in token order, so a seed gives the "
                                     "same image on every device."),
                io.Combo.Input("preset", options=list(pipeline.PRESETS), default="default",
                               tooltip="quality: 48 steps (mu 0, std 1.5); default: 20 steps (mu 0, std 1.75); "
                                       "turbo: 12 steps (mu 0.5, std 1.75). Guidance 7 with 3.0 for the last 3/2/1 "
                                       "polish steps."),
                io.Int.Input("steps", default=0, min=0, max=200, tooltip="0 = the preset's step count."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the main steps; 0 = the preset's (7.0)."),
                io.Int.Input("polish_steps", default=-1, min=-1, max=200,
                             tooltip="Final steps run at polish_guidance; -1 = the preset's."),
                io.Float.Input("polish_guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of the polish steps; 0 = the preset's (3.0)."),
                io.Boolean.Input("custom_schedule", default=False,
                                 tooltip="Use mu and std below instead of the preset's logit-normal schedule."),
                io.Float.Input("mu", default=0.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Logit-normal mean before the resolution shift (used with custom_schedule)."),
                io.Float.Input("std", default=1.75, min=0.1, max=5.0, step=0.05,
                               tooltip="Logit-normal spread (used with custom_schedule)."),
                terminal_input(),
            ],
            outputs=[latent_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, guidance=None, polish_guidance=None, mu=None, std=None):
        return validation.numbers(cls, guidance=guidance, polish_guidance=polish_guidance, mu=mu, std=std)

    @classmethod
    def execute(cls, model, conditioning, width, height, batch_size, seed, preset="default", steps=0, guidance=0.0,
                polish_steps=-1, polish_guidance=0.0, custom_schedule=False, mu=0.0, std=1.75,
                terminal="official"):
        # 0 / -1 widget values: the preset's
        overrides = dict(
            steps=steps or None,
            guidance=guidance or None,
            polish_steps=None if polish_steps < 0 else polish_steps,
            polish_guidance=polish_guidance or None,
            mu=mu if custom_schedule else None,
            std=std if custom_schedule else None,
            terminal=terminal,
        )
        return run(cls, model, conditioning, width, height, batch_size, seed, preset, **overrides)


DEFAULT = pipeline.PRESETS["default"]


def image_inputs():
    return [
        Ideogram4Model.Input("model", tooltip="From Ideogram4 Q4_K Loader (or Ideogram4 LoRA)."),
        Ideogram4Conditioning.Input("conditioning", tooltip="From Qwen3-VL Encode."),
        io.Int.Input("width", default=1024, min=pipeline.MIN_SIDE, max=pipeline.MAX_SIDE,
                     step=pipeline.PIXELS_PER_TOKEN,
                     tooltip="Image width in pixels: a multiple of 16, 256..2048 (trained around 2 MP)."),
        io.Int.Input("height", default=1024, min=pipeline.MIN_SIDE, max=pipeline.MAX_SIDE,
                     step=pipeline.PIXELS_PER_TOKEN,
                     tooltip="Image height in pixels: a multiple of 16, 256..2048."),
        io.Int.Input("batch_size", default=1, min=1, max=pipeline.MAX_BATCH, tooltip="Images per run (one prompt)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed; the noise is drawn on the CPU in token order, so a seed gives the same "
                             "image on every device."),
    ]


def terminal_input():
    return io.Combo.Input("terminal", options=list(pipeline.TERMINALS), default="official",
                          tooltip="official: stop at t = 0.99945 as the official code; one: integrate to t = 1 as "
                                  "diffusers and ComfyUI core do.")


def latent_output():
    return io.Latent.Output(display_name="latent", tooltip="Ideogram 4 latent; decode with VAE Decode (Ideogram4).")


def run(cls, model, conditioning, width, height, batch_size, seed, preset="default", **settings):
    steps = pipeline.sampler_settings(preset, **settings).steps
    progress = comfy.SamplingProgress(steps, node_id=cls.hidden.unique_id, grid=pipeline.token_grid(width, height))
    latent = pipeline.sample_latents(
        model, conditioning, width=width, height=height, seed=seed, batch_size=batch_size, preset=preset,
        callback=progress, free_bytes=comfy.memory_for_planning(model.device),
        make_room=lambda needed: comfy.make_room(needed, model.device), **settings)
    comfy.track_placement(model)
    return io.NodeOutput(latent)


class IG4PresetSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4PresetSampler",
            display_name="Ideogram4 Sampler",
            category=CATEGORY,
            search_aliases=["ideogram", "ksampler", "sampler", "generate"],
            description="Samples an image latent with one of Ideogram 4's official presets: the logit-normal schedule "
                        "with resolution shift, asymmetric CFG (the unconditional branch sees image tokens only), "
                        "guidance 7 with 3.0 for the last polish steps. quality: 48 steps (std 1.5, 3 polish steps); "
                        "default: 20 steps (std 1.75, 2 polish); turbo: 12 steps (mu 0.5, std 1.75, 1 polish). "
                        "Every value shown: Ideogram4 Sampler (advanced).",
            inputs=[*image_inputs(),
                    io.Combo.Input("preset", options=list(pipeline.PRESETS), default="default",
                                   tooltip="quality: 48 steps; default: 20 steps; turbo: 12 steps (the official "
                                           "presets, all their values).")],
            outputs=[latent_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, conditioning, width, height, batch_size, seed, preset="default"):
        return run(cls, model, conditioning, width, height, batch_size, seed, preset)


class IG4SamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4SamplerAdvanced",
            display_name="Ideogram4 Sampler (advanced)",
            category=CATEGORY,
            search_aliases=["ideogram", "ksampler advanced", "sampler", "cfg", "schedule"],
            description="The official Euler flow-matching loop with every value shown: steps, cfg (guidance of the "
                        "main steps), polish steps at polish_cfg (the last steps, switched by step index), the "
                        "logit-normal schedule (mu before the resolution shift, std) and the terminal point. The "
                        "defaults are the official default preset; quality: 48 / 7 / 3 / 3.0 / mu 0 / std 1.5; "
                        "turbo: 12 / 7 / 1 / 3.0 / mu 0.5 / std 1.75.",
            inputs=[
                *image_inputs(),
                io.Int.Input("steps", default=DEFAULT.steps, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=DEFAULT.guidance, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance (CFG scale) of the main steps; official 7.0."),
                io.Int.Input("polish_steps", default=DEFAULT.polish_steps, min=0, max=200,
                             tooltip="The last steps, run at polish_cfg (official: 3 for 48 steps, 2 for 20, 1 for 12)."),
                io.Float.Input("polish_cfg", default=DEFAULT.polish_guidance, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance of the polish steps; official 3.0."),
                io.Float.Input("mu", default=DEFAULT.mu, min=-5.0, max=5.0, step=0.05,
                               tooltip="Logit-normal mean before the resolution shift (higher: more steps near the "
                                       "noise end)."),
                io.Float.Input("std", default=DEFAULT.std, min=0.1, max=5.0, step=0.05, tooltip="Logit-normal spread."),
                terminal_input(),
            ],
            outputs=[latent_output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, steps=None, cfg=None, polish_steps=None, polish_cfg=None, mu=None, std=None):
        problem = validation.numbers(cls, cfg=cfg, polish_cfg=polish_cfg, mu=mu, std=std, steps=steps,
                                     polish_steps=polish_steps)
        if problem is True and isinstance(steps, int) and isinstance(polish_steps, int) and polish_steps > steps:
            problem = f"polish_steps ({polish_steps}) cannot exceed steps ({steps})"
        return problem

    @classmethod
    def execute(cls, model, conditioning, width, height, batch_size, seed, steps=DEFAULT.steps, cfg=DEFAULT.guidance,
                polish_steps=DEFAULT.polish_steps, polish_cfg=DEFAULT.polish_guidance, mu=DEFAULT.mu, std=DEFAULT.std,
                terminal="official"):
        return run(cls, model, conditioning, width, height, batch_size, seed, steps=steps, guidance=cfg,
                   polish_steps=polish_steps, polish_guidance=polish_cfg, mu=mu, std=std, terminal=terminal)
