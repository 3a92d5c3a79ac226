"""ComfyUI nodes (V3 API). Thin: they wire the lower layers to ComfyUI and hold no model math.

Imported only by ComfyUI (through the pack's `comfy_entrypoint`), never by the lower layers.
"""

from comfy_api.latest import ComfyExtension


class Ideogram4Extension(ComfyExtension):
    async def get_node_list(self):
        return []
