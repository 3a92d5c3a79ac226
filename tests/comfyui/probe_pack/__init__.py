"""A test-only custom-node pack, loaded beside ideogram4_gguf by the real-ComfyUI tests (never shipped).

It reports what only the running server knows: ComfyUI's list of loaded models, the pack's live DiT pairs and
their placements, and the calls our nodes made into ComfyUI's memory manager (`free_memory`, `get_free_memory`,
recorded by a spy that `IG4TestSpyMemory` installs); and it saves tensors the tests compare (a MODEL's forward
output on seeded inputs, a CONDITIONING). Each node re-runs every time (IS_CHANGED is NaN).

Tiny Qwen3 text encoders: core sizes its Ideogram 4 text encoder for Qwen3-VL-8B only (hidden 4096, detected by
that width). So that core's own CLIPLoader(type=ideogram4) can load the tests' tiny encoder, this pack widens
core's detection to TINY_TE_HIDDEN-wide Qwen3 files and gives core's config those sizes: core's code, tiny weights.
"""

import gc
import json
import os
import sys

import comfy.model_management as mm
import comfy.sd
import comfy.text_encoders.ideogram4
import comfy.text_encoders.llama
import folder_paths
import torch
from safetensors.torch import save_file

# The tests' tiny Qwen3 text encoder (tests/comfyui/test_core_conditioning.py builds it with these sizes).
TINY_TE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 36, "num_attention_heads": 2,
           "num_key_value_heads": 1}
TINY_TE_HEAD_DIM = 32


def _allow_tiny_qwen3_text_encoder():
    detect = comfy.sd.detect_te_model

    def detect_te_model(sd):
        norm = sd.get("model.layers.0.post_attention_layernorm.weight")
        if (norm is not None and norm.shape[0] == TINY_TE["hidden_size"]
                and "model.layers.0.self_attn.q_norm.weight" in sd):
            comfy.text_encoders.ideogram4.QWEN3VL_8B_CONFIG.update(TINY_TE)
            comfy.text_encoders.llama.Qwen3_8BConfig.head_dim = TINY_TE_HEAD_DIM
            return comfy.sd.TEModel.QWEN3_8B
        return detect(sd)

    comfy.sd.detect_te_model = detect_te_model


_allow_tiny_qwen3_text_encoder()

_calls = {"free_memory": [], "get_free_memory": []}


def _install_spy():
    if getattr(mm.free_memory, "_ig4_spy", False):
        return
    real_free, real_get_free = mm.free_memory, mm.get_free_memory

    def free_memory(memory_required, device, *args, **kwargs):
        _calls["free_memory"].append({"bytes": int(memory_required), "device": str(device)})
        return real_free(memory_required, device, *args, **kwargs)

    def get_free_memory(dev=None, *args, **kwargs):
        _calls["get_free_memory"].append({"device": str(dev)})
        return real_get_free(dev, *args, **kwargs)

    free_memory._ig4_spy = get_free_memory._ig4_spy = True
    mm.free_memory, mm.get_free_memory = free_memory, get_free_memory


def _pack_module(suffix):
    # ComfyUI imports a custom-node folder under its path as module name (".../custom_nodes/ideogram4_gguf")
    for name, module in list(sys.modules.items()):
        if name.endswith("ideogram4_gguf" + suffix) and "custom_nodes" in name:
            return module
    return None


def _report():
    loaded = []
    for item in mm.current_loaded_models:
        patcher = item.model
        if patcher is None:
            continue
        loaded.append({"model_class": type(patcher.model).__name__,
                       "model_module": type(patcher.model).__module__,
                       "size": int(patcher.size), "device": str(item.device)})
    pipeline = _pack_module(".pipeline")
    models = []
    if pipeline is not None:
        gc.collect()
        for obj in gc.get_objects():
            if type(obj) is pipeline.Ideogram4Model:
                placement = obj.placement
                models.append({"placed": placement is not None,
                               "device_bytes": None if placement is None else int(placement.device_bytes),
                               "mode": None if placement is None else placement.mode})
    encode = _pack_module(".nodes.encode")
    kept_encoders = None if encode is None else len(encode._kept)
    return {"loaded": loaded, "ideogram4_models": models, "kept_encoders": kept_encoders, "calls": _calls}


class _Probe:
    CATEGORY = "testing/ideogram4"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        # `after`: any output, linked only to order the probe after that node inside a workflow
        return {"required": {"label": ("STRING", {"default": ""})}, "optional": {"after": ("*",)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")


class IG4TestSpyMemory(_Probe):
    def run(self, label, after=None):
        _install_spy()
        for calls in _calls.values():
            calls.clear()
        return {"ui": {"text": [json.dumps({"spy": True})]}}


class IG4TestMemoryReport(_Probe):
    def run(self, label, after=None):
        return {"ui": {"text": [json.dumps(_report())]}}


def _save(label, tensor):
    os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
    path = f"{folder_paths.get_output_directory()}/{label}.safetensors"
    save_file({"tensor": tensor.detach().float().cpu().contiguous()}, path)
    return {"ui": {"text": [json.dumps({"path": path, "shape": list(tensor.shape)})]}}


class IG4TestModelForward(_Probe):
    """A MODEL's raw output (ComfyUI's apply_model) on seeded random inputs: latent (1, C, grid, grid), sigma 0.7,
    and `text_tokens` rows of random text features (0: none, the image-only pass). Its output (the label) only
    orders other probes after it."""

    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": ""}),
                             "seed": ("INT", {"default": 0}), "text_tokens": ("INT", {"default": 3}),
                             "grid": ("INT", {"default": 2})},
                "optional": {"after": ("*",)}}

    def run(self, model, label, seed, text_tokens, grid, after=None):
        network = model.model.diffusion_model
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, network.in_channels, grid, grid, generator=generator)
        context = None
        if text_tokens:
            features = network.llm_cond_norm.weight.shape[0]
            context = torch.randn(1, text_tokens, features, generator=generator)
        mm.load_models_gpu([model])
        with torch.no_grad():
            out = model.model.apply_model(x.to(model.load_device), torch.tensor([0.7], device=model.load_device),
                                          c_crossattn=None if context is None else context.to(model.load_device))
        return {**_save(label, out), "result": (label,)}


class IG4TestSaveConditioning(_Probe):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "label": ("STRING", {"default": ""})}}

    def run(self, conditioning, label):
        [[tensor, extra]] = conditioning
        report = _save(label, tensor)
        report["ui"]["text"].append(json.dumps(sorted(extra)))
        return report


NODE_CLASS_MAPPINGS = {"IG4TestSpyMemory": IG4TestSpyMemory, "IG4TestMemoryReport": IG4TestMemoryReport,
                       "IG4TestModelForward": IG4TestModelForward, "IG4TestSaveConditioning": IG4TestSaveConditioning}
