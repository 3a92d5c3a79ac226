"""ComfyUI nodes (V3 API). Thin: they wire `pipeline` to ComfyUI and hold no model math.

Imported only by ComfyUI (through the pack's `comfy_entrypoint`), never by the lower layers.
"""

from comfy_api.latest import ComfyExtension

from . import comfy_adapter
from .core_graph import CORE_GRAPH_NODES
from .decode import IG4VAEDecode
from .encode import IG4TextEncode
from .json_prompt import IG4JsonPrompt
from .latent_convert import IG4LatentToFlux2
from .loader import IG4Loader, IG4LoaderAdvanced, IG4ModelLoader
from .lora import IG4LoraLoader
from .sampler import IG4PresetSampler, IG4Sampler, IG4SamplerAdvanced
from .upsample import IG4PromptUpsample

NODES = [IG4Loader, IG4LoaderAdvanced, IG4LoraLoader, IG4TextEncode, IG4PresetSampler, IG4SamplerAdvanced, IG4VAEDecode,
         IG4JsonPrompt, IG4PromptUpsample, IG4LatentToFlux2, *CORE_GRAPH_NODES,
         IG4ModelLoader, IG4Sampler]  # the last two: deprecated, for workflows saved before


class Ideogram4Extension(ComfyExtension):
    async def on_load(self):
        comfy_adapter.register_model_folders()
        comfy_adapter.register_lora_key_map()

    async def get_node_list(self):
        return list(NODES)
