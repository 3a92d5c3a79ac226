"""Ideogram 4 GGUF: a ComfyUI node pack for Ideogram 4 from a two-branch GGUF Q4_K file.

Importing this package must stay cheap and must work without ComfyUI (and without torch): the
ComfyUI entry point imports the node modules only when ComfyUI asks for them.
"""

__version__ = "0.1.0"

# ComfyUI serves this folder's .js files (web/show_text.js draws our nodes' text output on the node).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists this pack's nodes."""
    from .nodes import Ideogram4Extension

    return Ideogram4Extension()
