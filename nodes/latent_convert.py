"""Ideogram4 Latent to FLUX.2: hand our LATENT to ComfyUI core's VAE Decode (or other FLUX.2-latent nodes)."""

from __future__ import annotations

from comfy_api.latest import io

from .. import pipeline
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY


class IG4LatentToFlux2(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4LatentToFlux2",
            display_name="Ideogram4 Latent to FLUX.2 (core)",
            search_aliases=["ideogram", "flux2 latent", "convert latent"],
            category=CATEGORY,
            description="Converts an Ideogram 4 latent (token channel order, official normalisation) into ComfyUI "
                        "core's FLUX.2 latent, normalised with the statistics of the VAE file core's VAE Decode will "
                        "use, so core decodes the same image as VAE Decode (Ideogram4) up to float rounding.",
            inputs=[
                io.Latent.Input("latent", tooltip="From Ideogram4 Sampler."),
                io.Combo.Input("vae_name", display_name="vae", options=comfy.model_files(comfy.VAE_FOLDER),
                               tooltip="The FLUX.2 VAE that core's VAE Decode loads (its latent statistics are "
                                       "read from the file)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="A core FLUX.2 latent.")],
        )

    @classmethod
    def validate_inputs(cls, vae_name=None):
        return validation.model_file(comfy.VAE_FOLDER, vae_name, pipeline.check_vae_file)

    @classmethod
    def fingerprint_inputs(cls, vae_name, **_):
        return comfy.file_fingerprint(comfy.VAE_FOLDER, vae_name)

    @classmethod
    def execute(cls, latent, vae_name):
        return io.NodeOutput(pipeline.latent_to_core(latent, comfy.model_path(comfy.VAE_FOLDER, vae_name), vae_name))
