"""Ideogram4 Q4_K Loader (and its advanced form): both DiT branches from a two-branch GGUF (or a pair of files).

The basic loader asks only what a user decides (the file, the memory mode); the advanced one adds the knobs for
unusual files and debugging (compute dtype, dequant kernel, branch prefixes), as ComfyUI-GGUF splits its loaders.
`IG4ModelLoader`, the single loader of workflows saved before, stays registered (deprecated) so they still load
and run as saved.
"""

from __future__ import annotations

import os
import weakref

from comfy_api.latest import io

from .. import pipeline
from ..errors import ModelFileError
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY, DTYPES, Ideogram4Model

DESCRIPTION = ("Loads both Ideogram 4 DiT branches (conditional + unconditional, for the asymmetric CFG) from the "
               "two-branch Q4_K GGUF, or from a pair of single-branch files (GGUF of any quant type, fp8 or bf16 "
               "safetensors). Weights stay packed; they move to the GPU when sampling.")
MEMORY_TOOLTIP = ("auto: pick from free VRAM. gpu: both branches resident (~11 GB at 1024x1024). stream_uncond: the "
                  "conditional branch resident, the unconditional one streamed layer by layer from pinned RAM "
                  "(~6.5 GB). cpu_offload: both streamed (lowest VRAM, slowest).")
DTYPE_TOOLTIP = ("auto: bf16 on GPUs with fast bf16 (RTX 30xx and newer), fp16 on older GPUs (residual stream kept "
                 "overflow-safe), fp32 on the CPU.")
KERNEL_TOOLTIP = "auto: the fused Triton kernel on CUDA for Q4_K/Q6_K/Q8_0, torch otherwise; torch: never Triton."


def file_inputs(files):
    return [
        io.Combo.Input("dit_name", display_name="dit", options=files,
                       tooltip="The DiT file in models/diffusion_models (or models/unet): the two-branch "
                               "ideogram4-q4_k.gguf, or the conditional file of a pair."),
        io.Combo.Input("uncond_name", display_name="uncond", options=[comfy.NONE_CHOICE] + files,
                       default=comfy.NONE_CHOICE,
                       tooltip="Only when the dit file holds one branch: the unconditional DiT file. Leave (none) for "
                               "the two-branch GGUF."),
    ]


def validate_dit_files(dit_name, uncond_name, branch_prefixes=None):
    """Queue-time check of the DiT file (or pair): in the folders, and headers that hold an Ideogram 4 DiT."""
    uncond = validation.model_file(comfy.DIT_FOLDER, uncond_name, lambda path: None, optional=True)
    if uncond is not True:
        return uncond
    try:
        prefixes = parse_branch_prefixes(branch_prefixes)
    except ModelFileError as exc:
        return str(exc)
    return validation.model_file(comfy.DIT_FOLDER, dit_name, pipeline.check_dit_file, uncond_path(uncond_name),
                                 prefixes)


def uncond_path(uncond_name):
    """The path of the `uncond` choice, None for (none)."""
    return None if uncond_name in (None, "", comfy.NONE_CHOICE) else comfy.model_path(comfy.DIT_FOLDER, uncond_name)


class DitFileNode(io.ComfyNode):
    """What every DiT loader node (ours and the core-MODEL one) does with its `dit` / `uncond` files: checks them
    at queue time and re-runs when a file changes."""

    @classmethod
    def validate_inputs(cls, dit_name=None, uncond_name=None):
        return validate_dit_files(dit_name, uncond_name)

    @classmethod
    def fingerprint_inputs(cls, dit_name, uncond_name=None, **_):
        return comfy.file_fingerprint(comfy.DIT_FOLDER, dit_name, uncond_name)


def memory_mode_input():
    return io.Combo.Input("memory_mode", options=list(pipeline.MEMORY_MODES), default="auto", tooltip=MEMORY_TOOLTIP)


def model_output():
    return Ideogram4Model.Output(display_name="model", tooltip="Both DiT branches, for Ideogram4 Sampler.")


def parse_branch_prefixes(text):
    """"cond_prefix,uncond_prefix" (blank: auto) -> None or the pair; an empty side means bare tensor names."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ModelFileError(f"branch_prefixes {text!r}: give two prefixes separated by a comma, conditional first "
                             "(e.g. 'model.transformer.,model.unconditional_transformer.'), or leave it empty.")
    return tuple(parts)


# Loader nodes (or a re-run with an unchanged file) share one load while anything still uses it.
_loaded = weakref.WeakValueDictionary()


def load(dit_name, uncond_name=comfy.NONE_CHOICE, compute_dtype="auto", dequant_kernel="auto", memory_mode="auto",
         branch_prefixes=None):
    path = comfy.model_path(comfy.DIT_FOLDER, dit_name)
    uncond = uncond_path(uncond_name)
    prefixes = parse_branch_prefixes(branch_prefixes)
    device = comfy.torch_device()
    key = (path, os.path.getmtime(path), uncond, compute_dtype, dequant_kernel, memory_mode, str(device), prefixes)
    model = _loaded.get(key)
    if model is None:
        model = pipeline.load_model(path, uncond, compute_dtype=compute_dtype, kernel=dequant_kernel,
                                    memory_mode=memory_mode, device=device, branch_prefixes=prefixes)
        _loaded[key] = model
    return model


class IG4Loader(DitFileNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4Loader",
            display_name="Ideogram4 Q4_K Loader",
            category=CATEGORY,
            search_aliases=["ideogram", "gguf", "ideogram4 loader", "unet loader", "load diffusion model"],
            description=DESCRIPTION,
            inputs=[*file_inputs(comfy.model_files(comfy.DIT_FOLDER)),
                    memory_mode_input()],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, dit_name, uncond_name=comfy.NONE_CHOICE, memory_mode="auto"):
        return io.NodeOutput(load(dit_name, uncond_name, memory_mode=memory_mode))


class IG4LoaderAdvanced(DitFileNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4LoaderAdvanced",
            display_name="Ideogram4 Q4_K Loader (advanced)",
            category=CATEGORY,
            search_aliases=["ideogram", "gguf", "ideogram4 loader", "dequant kernel", "branch prefixes"],
            description=DESCRIPTION + " The advanced form adds the compute dtype, the dequant kernel and the branch "
                                      "prefixes of an unusual two-branch file.",
            inputs=[
                *file_inputs(comfy.model_files(comfy.DIT_FOLDER)),
                memory_mode_input(),
                io.Combo.Input("compute_dtype", options=DTYPES, default="auto", tooltip=DTYPE_TOOLTIP),
                io.Combo.Input("dequant_kernel", options=list(pipeline.KERNELS), default="auto",
                               tooltip=KERNEL_TOOLTIP),
                io.String.Input("branch_prefixes", default="",
                                tooltip="Only for a two-branch file whose tensor prefixes do not say which branch is "
                                        "which: 'cond_prefix,uncond_prefix' (an empty side: bare names). Empty: "
                                        "decided from the file (the log says which prefix became which branch)."),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def validate_inputs(cls, dit_name=None, uncond_name=None, branch_prefixes=None):
        return validate_dit_files(dit_name, uncond_name, branch_prefixes)

    @classmethod
    def execute(cls, dit_name, uncond_name=comfy.NONE_CHOICE, memory_mode="auto", compute_dtype="auto",
                dequant_kernel="auto", branch_prefixes=""):
        return io.NodeOutput(load(dit_name, uncond_name, compute_dtype, dequant_kernel, memory_mode, branch_prefixes))


class IG4ModelLoader(DitFileNode):
    """The loader of workflows saved before the basic / advanced split: unchanged, deprecated."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4ModelLoader",
            display_name="Ideogram4 Q4_K Loader (legacy)",
            category=CATEGORY,
            is_deprecated=True,
            description=DESCRIPTION + " Kept so that older workflows load; new ones use Ideogram4 Q4_K Loader or its "
                                      "advanced form.",
            inputs=[
                *file_inputs(comfy.model_files(comfy.DIT_FOLDER)),
                io.Combo.Input("compute_dtype", options=DTYPES, default="auto", tooltip=DTYPE_TOOLTIP),
                io.Combo.Input("dequant_kernel", options=list(pipeline.KERNELS), default="auto",
                               tooltip=KERNEL_TOOLTIP),
                memory_mode_input(),
            ],
            outputs=[model_output()],
        )

    @classmethod
    def execute(cls, dit_name, uncond_name=comfy.NONE_CHOICE, compute_dtype="auto", dequant_kernel="auto",
                memory_mode="auto"):
        return io.NodeOutput(load(dit_name, uncond_name, compute_dtype, dequant_kernel, memory_mode))
