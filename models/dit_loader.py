"""Load the two Ideogram 4 DiT branches from any supported file layout.

(Work in progress: the file layouts are built on `ops.WeightSource`; this part holds the name mapping and the
in-memory source used by tests and by callers that already hold a state dict.)
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

# diffusers 0.42.1 splits the fused attention projections (spec §2.2.1); q, k, v are row blocks of `qkv`.
_SPLIT_QKV = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])\.weight$")
_SPLIT_OUT = re.compile(r"^(layers\.\d+\.attention\.)to_out\.0\.weight$")


def fuse_split_attention(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names (`attention.to_q/to_k/to_v`, `attention.to_out.0`) -> official fused names.

    q, k, v are concatenated by rows (exact); every other tensor passes through untouched.
    """
    fused: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if m := _SPLIT_QKV.match(name):
            parts.setdefault(m.group(1), {})[m.group(2)] = tensor
        elif m := _SPLIT_OUT.match(name):
            fused[m.group(1) + "o.weight"] = tensor
        else:
            fused[name] = tensor
    for prefix, qkv in parts.items():
        fused[prefix + "qkv.weight"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return fused


class StateDictWeights:
    """The part of the `ops` WeightSource contract the model needs, over an in-memory {name: tensor} dict.

    Tensors already in the requested dtype and device are used as they are (no copy).
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def keys(self):
        return self._tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def tensor(self, name: str, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        value = self._tensors[name]
        return value.to(device=device, dtype=dtype or value.dtype)

    def linear(self, prefix: str, compute_dtype: torch.dtype, device="cpu") -> nn.Linear:
        weight = self.tensor(prefix + ".weight", compute_dtype, device)
        has_bias = prefix + ".bias" in self._tensors
        with torch.device("meta"):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            layer.bias = nn.Parameter(self.tensor(prefix + ".bias", compute_dtype, device), requires_grad=False)
        return layer
