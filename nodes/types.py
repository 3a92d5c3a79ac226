"""The pack's own ComfyUI socket types (custom, so they connect only to this pack's nodes)."""

from comfy_api.latest import io

# pipeline.Ideogram4Model: both DiT branches + where they run.
Ideogram4Model = io.Custom("IDEOGRAM4_MODEL")
# pipeline.TextConditioning: the text encoder's interleaved taps for one prompt (projected later, once per image).
Ideogram4Conditioning = io.Custom("IDEOGRAM4_CONDITIONING")

CATEGORY = "Ideogram4"
CORE_CATEGORY = "Ideogram4/core graph"  # nodes that hand out and take core types (MODEL, SIGMAS, GUIDER, ...)
DTYPES = ["auto", "bf16", "fp16", "fp32"]
