"""Linear layers that keep their weights in stored form and expand them into the compute dtype at forward.

`QuantLinear` holds GGUF packed blocks, `Fp8Linear` holds float8_e4m3fn weights with a per-output-row
float32 scale (the official Ideogram fp8 release). Both keep the stored bytes on whatever device the module
is moved to; one layer exists in full precision only while its forward runs.

`.weight` is a small descriptor, not the packed tensor: code that asks `layer.weight.dtype` (to cast its
activations, say) must get the compute dtype, never uint8 -- loaders that leak uint8 there crash with
"addmm not implemented for 'Byte'".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from . import triton_dequant
from .dequant import dequantize

KERNELS = ("auto", "triton", "torch")


class StoredWeight:
    """What `layer.weight` returns for a stored-form layer: the shape and dtype the rest of the model sees."""

    def __init__(self, layer: "_StoredLinear"):
        self._layer = layer

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.compute_dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def device(self) -> torch.device:
        return self._layer.stored_device

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self, dtype=None) -> torch.Tensor:
        return self._layer.dense_weight(dtype or self._layer.compute_dtype)

    def __repr__(self):
        return f"StoredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, storage={self._layer.storage})"


class _StoredLinear(nn.Module):
    def __init__(self, in_features, out_features, bias, compute_dtype):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> StoredWeight:
        return StoredWeight(self)

    _stored_buffers: tuple[str, ...] = ()

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype)/.half()/.bfloat16() change the compute dtype; the stored tensors only ever move (or get
        # pinned). float8 counts as floating point to torch, so without this a model.to(bfloat16) would
        # expand every fp8 weight to bf16 -- twice the memory, and a different numerical recipe.
        stored = {name: self._buffers.pop(name) for name in self._stored_buffers}
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            for name, tensor in stored.items():
                probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
                moved = fn(tensor) if probe.dtype == tensor.dtype else tensor.to(probe.device)
                self._buffers[name] = moved
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.stored_device)).dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return F.linear(x, self.dense_weight(self.compute_dtype), self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"storage={self.storage}, compute_dtype={self.compute_dtype}")


class QuantLinear(_StoredLinear):
    """Linear over GGUF packed blocks (any type `ops.dequantize` reads).

    kernel: "auto" uses the fused Triton kernel on CUDA when Triton has one for the type, else torch;
    "triton" insists on Triton (falls back to torch with a warning where it cannot run); "torch" never uses it.
    """

    def __init__(self, packed: torch.Tensor, qtype, in_features, out_features, bias=None,
                 compute_dtype=torch.float32, kernel="auto"):
        super().__init__(in_features, out_features, bias, compute_dtype)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.qtype = Q(qtype)
        self.kernel = kernel
        self.register_buffer("packed", packed)

    _stored_buffers = ("packed",)

    @property
    def storage(self) -> str:
        return self.qtype.name

    @property
    def stored_device(self):
        return self.packed.device

    def dense_weight(self, dtype):
        return dequantize_packed(self.packed, self.qtype, (self.out_features, self.in_features), dtype, self.kernel)


class Fp8Linear(_StoredLinear):
    """Linear over float8_e4m3fn weights with a per-output-row float32 `weight_scale` (official fp8 layout).

    Dequantized as the official `Fp8Linear` does, for bit parity with it: both factors are first cast to
    the compute dtype, then multiplied there (not in float32).
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias=None,
                 compute_dtype=torch.bfloat16):
        out_features, in_features = weight_fp8.shape
        super().__init__(in_features, out_features, bias, compute_dtype)
        scale = weight_scale.detach().reshape(-1).to(torch.float32)
        if scale.numel() not in (1, out_features):
            raise ValueError(f"weight_scale has {scale.numel()} values; expected 1 or one per output row "
                             f"({out_features})")
        self.register_buffer("weight_fp8", weight_fp8.detach())
        self.register_buffer("weight_scale", scale.expand(out_features).contiguous())

    storage = "F8_E4M3"
    _stored_buffers = ("weight_fp8", "weight_scale")

    @property
    def stored_device(self):
        return self.weight_fp8.device

    def dense_weight(self, dtype):
        return fp8_dense(self.weight_fp8, self.weight_scale, dtype)


def dequantize_packed(packed: torch.Tensor, qtype, shape, dtype, kernel: str = "auto") -> torch.Tensor:
    """GGUF packed blocks -> a dense (out, in) weight in `dtype`, on the packed bytes' device: the fused Triton
    kernel where it runs (kernel "auto" / "triton"), else the torch decoder; bit-identical either way."""
    if kernel != "torch" and triton_dequant.can_run(packed, qtype, kernel):
        return triton_dequant.dequantize(packed, qtype, shape, dtype)
    return dequantize(packed, qtype, shape, dtype)


def fp8_dense(weight_fp8: torch.Tensor, weight_scale: torch.Tensor, dtype) -> torch.Tensor:
    """float8 weights x per-row scale, as the official `Fp8Linear` computes them: both factors cast to the compute
    dtype first, multiplied there (for bit parity with it)."""
    return weight_fp8.to(dtype) * weight_scale.to(dtype)[:, None]
