"""GGUF container: validate, memory-map, expose every tensor as a zero-copy torch view.

The reading itself is quant_tools' torch-free layer (`quant_tools/gguf_file.py`: the bounds-checked walk over the
header, gguf-py's parse with a fast path for metadata arrays, one error line naming the file for anything
malformed). This module only lays torch views over the mapped bytes and raises the pack's `GGUFFormatError`.

Metadata values are handed out as gguf-py parses them (any type a key may hold; None where gguf-py cannot decode
one); the loaders check the type and range of every value they read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType

from ..errors import GGUFFormatError
from ..quant_tools.gguf_file import GGUFHeader, TensorEntry

# Element types whose GGUF data is plain numbers (the reader hands them out typed, not as bytes).
_FLOAT_TORCH_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is the logical shape in torch order (a Linear weight is (out_features, in_features)).
    `raw` is a zero-copy view of the mapped file: a float tensor of that shape for F32/F16/BF16, else a
    uint8 tensor (*shape[:-1], bytes_per_row) of packed blocks.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * self.raw.element_size()

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in _FLOAT_TORCH_DTYPES


class GGUFFile:
    """A validated, memory-mapped GGUF file. Nothing is read into RAM until a tensor is used."""

    def __init__(self, path: str | os.PathLike):
        # mode "c" (copy-on-write) gives writable numpy views, so torch.from_numpy shares the mapping without
        # warnings; nothing ever writes, so no page is ever copied.
        header = GGUFHeader(path, error=GGUFFormatError, mode="c")
        self.path = header.path
        self._reader = header.reader
        self.alignment = header.alignment
        self.metadata: dict[str, Any] = header.metadata
        self.tensors: dict[str, GGUFTensor] = {name: _make_tensor(t) for name, t in header.tensors.items()}

    def __repr__(self):
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors)"

    def close(self):
        """Drop the mapping (tensor views handed out keep it alive until they are freed)."""
        self.tensors = {}
        self._reader = None


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raises `GGUFFormatError` for anything malformed."""
    return GGUFFile(path)


def _make_tensor(t: TensorEntry) -> GGUFTensor:
    if t.qtype is GGMLQuantizationType.BF16:
        # gguf-py hands BF16 out as bytes (numpy has no bfloat16); reinterpret without copying.
        raw = torch.from_numpy(t.data.reshape(-1)).view(torch.bfloat16).reshape(t.shape)
    else:
        raw = torch.from_numpy(t.data)
    return GGUFTensor(t.name, t.qtype, t.shape, raw)
