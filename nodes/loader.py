"""Ideogram4 Q4_K Loader: both DiT branches from a two-branch GGUF (or a pair of files)."""

from __future__ import annotations

import os
import weakref

from comfy_api.latest import io

from .. import pipeline
from ..ops import KERNELS
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY, DTYPES, Ideogram4Model


def validate_dit_files(dit_name, uncond_name):
    """Queue-time check of the DiT file (or pair): in the folders, and headers that hold an Ideogram 4 DiT."""
    uncond = validation.model_file(comfy.DIT_FOLDER, uncond_name, lambda path: None, optional=True)
    if uncond is not True:
        return uncond
    uncond_path = None if uncond_name in (None, "", comfy.NONE_CHOICE) else comfy.model_path(comfy.DIT_FOLDER,
                                                                                            uncond_name)
    return validation.model_file(comfy.DIT_FOLDER, dit_name, pipeline.check_dit_file, uncond_path)


# Two loader nodes (or a re-run with an unchanged file) share one load while anything still uses it.
_loaded = weakref.WeakValueDictionary()


class IG4ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = comfy.model_files(comfy.DIT_FOLDER)
        return io.Schema(
            node_id="IG4ModelLoader",
            display_name="Ideogram4 Q4_K Loader",
            category=CATEGORY,
            description="Loads both Ideogram 4 DiT branches (conditional + unconditional, for the asymmetric CFG) "
                        "from the two-branch Q4_K GGUF, or from a pair of single-branch files (GGUF of any quant "
                        "type, fp8 or bf16 safetensors). Weights stay packed; they move to the GPU when sampling.",
            inputs=[
                io.Combo.Input("dit_name", options=files,
                               tooltip="The DiT file in models/diffusion_models (or models/unet): the two-branch "
                                       "ideogram4-q4_k.gguf, or the conditional file of a pair."),
                io.Combo.Input("uncond_name", options=[comfy.NONE_CHOICE] + files, default=comfy.NONE_CHOICE,
                               tooltip="Only when dit_name holds one branch: the unconditional DiT file. Leave "
                                       "(none) for the two-branch GGUF."),
                io.Combo.Input("compute_dtype", options=DTYPES, default="auto",
                               tooltip="auto: bf16 on GPUs with fast bf16 (RTX 30xx and newer), fp16 on older GPUs "
                                       "(residual stream kept overflow-safe), fp32 on the CPU."),
                io.Combo.Input("dequant_kernel", options=list(KERNELS), default="auto",
                               tooltip="auto: the fused Triton kernel on CUDA for Q4_K/Q6_K/Q8_0, torch otherwise; "
                                       "torch: never Triton (for debugging)."),
                io.Combo.Input("memory_mode", options=list(pipeline.MEMORY_MODES), default="auto",
                               tooltip="auto: pick from free VRAM. gpu: both branches resident (~11 GB at 1024x1024). "
                                       "stream_uncond: the conditional branch resident, the unconditional one "
                                       "streamed layer by layer from pinned RAM (~6.5 GB). cpu_offload: both "
                                       "streamed (lowest VRAM, slowest)."),
            ],
            outputs=[Ideogram4Model.Output(display_name="model", tooltip="Both DiT branches, for Ideogram4 Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, dit_name=None, uncond_name=None):
        return validate_dit_files(dit_name, uncond_name)

    @classmethod
    def fingerprint_inputs(cls, dit_name, uncond_name=None, **_):
        return comfy.file_fingerprint(comfy.DIT_FOLDER, dit_name, uncond_name)

    @classmethod
    def execute(cls, dit_name, uncond_name=comfy.NONE_CHOICE, compute_dtype="auto", dequant_kernel="auto",
                memory_mode="auto"):
        path = comfy.model_path(comfy.DIT_FOLDER, dit_name)
        uncond = None if uncond_name in (None, "", comfy.NONE_CHOICE) else comfy.model_path(comfy.DIT_FOLDER,
                                                                                              uncond_name)
        device = comfy.torch_device()
        key = (path, os.path.getmtime(path), uncond, compute_dtype, dequant_kernel, memory_mode, str(device))
        model = _loaded.get(key)
        if model is None:
            model = pipeline.load_model(path, uncond, compute_dtype=compute_dtype, kernel=dequant_kernel,
                                        memory_mode=memory_mode, device=device)
            _loaded[key] = model
        return io.NodeOutput(model)
