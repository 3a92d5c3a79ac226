"""The pack's DiT files as ComfyUI core MODELs: core's own Ideogram 4 network (comfy/ldm/ideogram4/model.py) over our
weight sources, with Linear layers that keep the packed GGUF / fp8 bytes and decode them in the forward.

Why not `comfy.sd.load_diffusion_model_state_dict`: core detects Ideogram 4 but fixes every size except the input
channels and the layer count, cannot read GGUF, and would expand packed weights. Here the config comes from the
file's shapes (docs/dit.md) and the model is built the way that function builds it, with our operations.

What core's memory manager and LoRA loaders see (docs/spec.md §C1.7, §G5):
- a packed Linear's `weight` parameter is the stored bytes (uint8 GGUF blocks, or float8 with a per-row
  `weight_scale` buffer), so the model's size is its packed size and `.to(device)` moves packed bytes;
- partial loading / lowvram leaves packed weights on the offload device; the forward moves them per layer;
- LoRA patches are never merged into packed weights (that would mean re-quantizing): `Ideogram4ModelPatcher`
  attaches them as weight functions, which run on the decoded weight in every forward (core's lowvram mechanism),
  and removes them again when the model is unpatched (a bypassed LoRA node).

Imported only inside ComfyUI.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..errors import ModelFileError
from ..models.dit_loader import DiTBranches, find_dit_branches
from ..ops import Fp8Linear, QuantLinear, dequantize_packed, fp8_dense

logger = logging.getLogger(__name__)

# Config fields of core's Ideogram4Transformer2DModel, from ours (core fixes all but the first two).
_CORE_CONFIG = {"in_channels": "in_channels", "num_layers": "num_layers", "num_attention_heads": "num_heads",
                "attention_head_dim": "head_dim", "intermediate_size": "intermediate_size",
                "adaln_dim": "adaln_dim", "llm_features_dim": "llm_features_dim", "rope_theta": "rope_theta",
                "mrope_section": "mrope_section", "norm_eps": "norm_eps"}
# The text modules of a branch; the unconditional branch of some files lacks them (it never sees text).
_TEXT_MODULES = ("llm_cond_norm", "llm_cond_proj")


@functools.cache
def operations():
    """Core's manual-cast operations with a Linear that holds stored-form (packed) weights."""
    import comfy.ops

    base = comfy.ops.manual_cast

    class Ops(base):
        class Linear(base.Linear):
            """A core Linear whose `weight` may be stored form: `ig4_qtype` set = GGUF blocks, `ig4_fp8` set = float8
            with a per-row `weight_scale`; otherwise a plain manual-cast Linear."""

            ig4_qtype = None
            ig4_fp8 = False
            ig4_kernel = "auto"

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # No weight memory here: the loader puts the file's tensors in (a full-size branch would otherwise
                # allocate 9.3 B dense parameters first).
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device="meta", dtype=dtype),
                                                 requires_grad=False)
                self.bias = (torch.nn.Parameter(torch.empty(out_features, device="meta", dtype=dtype),
                                                requires_grad=False) if bias else None)

            @property
            def ig4_stored(self) -> bool:
                return self.ig4_qtype is not None or self.ig4_fp8

            def dense_weight(self, dtype, device) -> torch.Tensor:
                """The decoded weight in `dtype` on `device`, before any patch."""
                stored = self.weight.to(device, non_blocking=True)
                if self.ig4_qtype is not None:
                    return dequantize_packed(stored, self.ig4_qtype, (self.out_features, self.in_features), dtype,
                                             self.ig4_kernel)
                return fp8_dense(stored, self.weight_scale.to(device), dtype)

            def forward(self, x, *args, **kwargs):
                if not self.ig4_stored:
                    return super().forward(x, *args, **kwargs)
                comfy.ops.run_every_op()
                weight = self.dense_weight(x.dtype, x.device)
                applied = set()
                for function in self.weight_function:
                    key = getattr(function, "key", None)
                    if key is not None and key in applied:  # core may list one LoRA patch twice; apply it once
                        continue
                    applied.add(key)
                    weight = function(weight)
                bias = self.bias
                if bias is not None:
                    bias = bias.to(device=x.device, dtype=x.dtype, non_blocking=True)
                    for function in self.bias_function:
                        bias = function(bias)
                return F.linear(x, weight, bias)

    return Ops


class _NoTextProjection(torch.nn.Module):
    """Stands in for the text modules an unconditional branch file does not carry."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def forward(self, *args, **kwargs):
        raise ModelFileError(
            f"{self.label} has no text projection (llm_cond_norm / llm_cond_proj): the unconditional DiT never sees "
            "text in the official sampler. Run it image-only: leave the negative of Dual Model CFG Guider "
            "unconnected, or use Ideogram4 Guider (official CFG)."
        )


@functools.cache
def patcher_class():
    """core's ModelPatcher, with LoRA patches on packed weights applied in the forward instead of merged."""
    import comfy.lora
    import comfy.model_patcher
    import comfy.utils
    from comfy.model_patcher import LowVramPatch

    class Ideogram4ModelPatcher(comfy.model_patcher.ModelPatcher):
        def _stored_module(self, key):
            owner, _, param = key.rpartition(".")
            if param != "weight":
                return None
            try:
                module = comfy.utils.get_attr(self.model, owner)
            except AttributeError:
                return None
            return module if getattr(module, "ig4_stored", False) else None

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                                   force_cast=False):
            module = self._stored_module(key)
            if module is None:
                return super().patch_weight_to_device(key, device_to, inplace_update, return_weight, force_cast)
            if return_weight:  # the patched weight itself was asked for (model merging, saving): decode + patch
                device = device_to if device_to is not None else module.weight.device
                weight = module.dense_weight(torch.float32, device)
                if key in self.patches:
                    weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
                return weight
            module.weight_function = [f for f in module.weight_function if getattr(f, "key", None) != key]
            if key in self.patches:
                module.weight_function.append(LowVramPatch(key, self.patches))
            return None

        def load(self, *args, force_patch_weights=False, **kwargs):
            # lowvram modules too go through patch_weight_to_device, so a packed weight never gets merged
            return super().load(*args, force_patch_weights=True, **kwargs)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return super().partially_unload(device_to, memory_to_free, force_patch_weights=True)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for module in self.model.modules():
                    if getattr(module, "ig4_stored", False):
                        module.weight_function = [f for f in module.weight_function if not isinstance(f, LowVramPatch)]
            return super().unpatch_model(device_to, unpatch_weights)

    return Ideogram4ModelPatcher


def core_config(branches: DiTBranches) -> dict:
    """core's unet_config for this file's shapes."""
    config = branches.config
    values = {core: getattr(config, ours) for core, ours in _CORE_CONFIG.items()}
    values["mrope_section"] = list(values["mrope_section"])
    return {"image_model": "ideogram4", **values}


def build_core_model(branches: DiTBranches, branch: str, *, kernel: str = "auto", dtype: torch.dtype | None = None):
    """One branch ("cond" or "uncond") as a core ModelPatcher over core's Ideogram 4 model."""
    import comfy.model_management as mm
    import comfy.supported_models

    source = branches.cond if branch == "cond" else branches.uncond
    label = branches.cond_label if branch == "cond" else branches.uncond_label
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    unet_config = core_config(branches)
    model_config = comfy.supported_models.Ideogram4(unet_config)
    model_config.unet_config.update(unet_config)  # core's fixed sizes give way to the file's own
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:  # ComfyUI's choice for this device, as for its own models
        dtype = mm.unet_dtype(load_device, model_params=-1, supported_dtypes=supported)
        manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    else:  # asked for explicitly: compute in it even where ComfyUI would cast up (bf16 on a CPU)
        manual_cast = None
    model_config.set_inference_dtype(dtype, manual_cast, device=load_device)
    model_config.custom_operations = operations()

    model = model_config.get_model({}, "")
    network = model.diffusion_model
    keys = set(source.keys())
    if branch == "uncond" and not all(f"{name}.weight" in keys for name in _TEXT_MODULES):
        for name in _TEXT_MODULES:
            setattr(network, name, _NoTextProjection(label))
    _fill(network, source, label, kernel, dtype)
    mm.archive_model_dtypes(network)
    patcher = patcher_class()(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    return patcher


def _fill(network: torch.nn.Module, source, label: str, kernel: str, dtype: torch.dtype) -> None:
    """Every parameter of core's network from the weight source: packed / fp8 Linears keep their stored bytes."""
    linear_class = operations().Linear
    linears = set()
    for name, module in network.named_modules():
        if isinstance(module, linear_class):
            _fill_linear(module, source.linear(name, dtype, "cpu", kernel=kernel), kernel)
            linears.add(name)
    keys = set(source.keys())
    for name, param in list(network.named_parameters()):
        owner, _, attr = name.rpartition(".")
        if owner in linears:
            continue
        if name not in keys:
            raise ModelFileError(f"{label}: {name} is missing; the file is incomplete or not an Ideogram 4 DiT.")
        value = source.tensor(name, None, "cpu")
        if tuple(value.shape) != tuple(param.shape):
            raise ModelFileError(f"{label}: {name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}.")
        setattr(network.get_submodule(owner), attr, torch.nn.Parameter(value, requires_grad=False))


def _fill_linear(module, layer: torch.nn.Module, kernel: str) -> None:
    if isinstance(layer, QuantLinear):
        module.weight = torch.nn.Parameter(layer.packed, requires_grad=False)
        module.ig4_qtype, module.ig4_kernel = layer.qtype, kernel
    elif isinstance(layer, Fp8Linear):
        module.weight = torch.nn.Parameter(layer.weight_fp8, requires_grad=False)
        module.register_buffer("weight_scale", layer.weight_scale)
        module.ig4_fp8 = True
    else:
        module.weight = torch.nn.Parameter(layer.weight.detach(), requires_grad=False)
    module.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.detach(), requires_grad=False)


def load_core_models(path, uncond_path=None, *, kernel: str = "auto", dtype: torch.dtype | None = None):
    """(cond MODEL, uncond MODEL, DiTBranches) from any DiT file or pair the pack reads. dtype: the compute dtype
    (None: what ComfyUI picks for its device among core's bf16 / fp32)."""
    branches = find_dit_branches(path, uncond_path)
    cond = build_core_model(branches, "cond", kernel=kernel, dtype=dtype)
    uncond = build_core_model(branches, "uncond", kernel=kernel, dtype=dtype)
    logger.info("Ideogram 4 DiT as core MODELs: %s", branches.load_info(cond.model.get_dtype()).summary())
    return cond, uncond, branches
