"""VAE Decode (Ideogram4): our LATENT (or a core FLUX.2 one) -> IMAGE with the FLUX.2 VAE decoder."""

from __future__ import annotations

from comfy_api.latest import io

from .. import pipeline
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY

TILED = ["auto", "on", "off"]


class IG4VAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4VAEDecode",
            display_name="VAE Decode (Ideogram4)",
            search_aliases=["ideogram", "vae decode", "decode"],
            category=CATEGORY,
            description="Decodes an Ideogram 4 latent with the FLUX.2 VAE: official de-normalisation, patch-major "
                        "unpatchify, decoder. Large images decode in tiles when they would not fit free memory. "
                        "Also accepts core FLUX.2 latents (converted with the VAE file's own statistics).",
            inputs=[
                io.Latent.Input("latent", tooltip="From Ideogram4 Sampler (or a core FLUX.2 latent)."),
                io.Combo.Input("vae_name", display_name="vae", options=comfy.model_files(comfy.VAE_FOLDER),
                               tooltip="The FLUX.2 VAE from models/vae: ComfyUI's flux2-vae.safetensors or the base "
                                       "repo's vae/diffusion_pytorch_model.safetensors."),
                io.Combo.Input("tiled", options=TILED, default="auto",
                               tooltip="auto: tile only when the estimated peak would not fit free memory (2048x2048 "
                                       "in bf16 needs ~5 GB untiled); on: always tile; off: never."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="RGB image batch, for Save Image.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, vae_name=None):
        return validation.model_file(comfy.VAE_FOLDER, vae_name, pipeline.check_vae_file)

    @classmethod
    def fingerprint_inputs(cls, vae_name, **_):
        return comfy.file_fingerprint(comfy.VAE_FOLDER, vae_name)

    @classmethod
    def execute(cls, latent, vae_name, tiled="auto"):
        path = comfy.model_path(comfy.VAE_FOLDER, vae_name)
        device = comfy.torch_device()
        vae = pipeline.load_vae(path, device=device)  # small (0.1 GB decoder): loaded per run, freed after
        latent = pipeline.latent_from_core(latent, vae, vae_name)

        def make_room(needed):
            # ComfyUI makes room for an untiled decode first (it may evict our DiT); tiles only if still short.
            comfy.make_room(needed, device)
            return comfy.free_memory_bytes(device)

        image = pipeline.decode(vae, latent, tiled=tiled, make_room=make_room,
                                progress=comfy.node_progress(cls.hidden.unique_id))
        return io.NodeOutput(image)
