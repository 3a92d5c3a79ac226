"""`WeightSource`: name -> tensor access over GGUF and safetensors files, whatever the storage format.

Model loaders ask a source for dense tensors (`tensor`) or for ready Linear layers (`linear`) and never
care whether the bytes are GGUF blocks, float8 with a per-row scale, or plain bf16. Name mapping for other
layouts (prefixes, diffusers names, llama.cpp names) is done with `with_prefix` / `renamed` views, beside
each model's loader.

A GGUF file is read by quant_tools' torch-free reader (`quant_tools/gguf_file.py`: one bounds-checked pass over the
header, one error line naming the file for anything malformed); `open_gguf` lays zero-copy torch views over its
memory-mapped bytes and raises the pack's `GGUFFormatError`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..errors import GGUFFormatError, ModelFileError, quote
from ..quant_tools.gguf_file import GGUFHeader, TensorEntry
from .dequant import block_layout, decodable, dequantize, packed_shape
from .linear import Fp8Linear, QuantLinear

FP8_STORAGE = "F8_E4M3"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class WeightSource:
    """Read-only mapping of tensor names to stored tensors."""

    path = ""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def storage(self, name: str) -> str:
        """How the tensor is stored: a ggml type name ("Q4_K", "F16", "BF16", "F32", ...) or "F8_E4M3"."""
        raise NotImplementedError

    def _dense(self, name: str, dtype, device) -> torch.Tensor:
        raise NotImplementedError

    def packed(self, name: str):
        """(qtype, packed uint8 tensor) of a GGUF-quantized tensor (zero-copy), else None: for layers that
        keep blocks packed themselves, e.g. an embedding table that decodes only the rows it looks up."""
        return None

    def __contains__(self, name: str) -> bool:
        return name in self._key_set()

    def stored_nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in its stored form (what QuantLinear / Fp8Linear keep in memory)."""
        numel = math.prod(self.shape(name))
        storage = self.storage(name)
        if storage in _STORAGE_BYTES:
            return numel * _STORAGE_BYTES[storage]
        if storage not in Q.__members__:
            raise ModelFileError(f"{self.describe()}: tensor {quote(name)} is stored as {quote(storage)}, which this "
                                 "pack cannot read.")
        block_size, type_size = block_layout(Q[storage])
        return numel // block_size * type_size

    def describe(self) -> str:
        return self.path

    def tensor(self, name: str, dtype=None, device="cpu") -> torch.Tensor:
        """The tensor as a dense torch tensor (dequantized; fp8 weights times their scale)."""
        self._require(name)
        if self.storage(name) == FP8_STORAGE:
            scale = self._fp8_scale(name)
            if scale is not None:
                dtype = dtype or torch.float32
                weight = self._dense(name, None, device).to(dtype)
                scale = scale.to(device=device, dtype=dtype)
                return weight * (scale[:, None] if scale.numel() > 1 else scale.reshape(()))
        return self._dense(name, dtype, device)

    def linear(self, prefix: str, compute_dtype=torch.float32, device="cpu", kernel="auto") -> nn.Module:
        """A Linear for `prefix.weight` (+ `prefix.bias`): QuantLinear, Fp8Linear or a plain nn.Linear."""
        name = f"{prefix}.weight"
        self._require(name)
        shape = self.shape(name)
        if len(shape) != 2:
            raise ModelFileError(f"{self.describe()}: {quote(name)} has shape {shape}, expected a 2-D Linear weight.")
        bias_name = f"{prefix}.bias"
        bias = None
        if bias_name in self._key_set():
            if tuple(self.shape(bias_name)) != (shape[0],):
                raise ModelFileError(f"{self.describe()}: {quote(bias_name)} has shape {tuple(self.shape(bias_name))}, "
                                     f"expected ({shape[0]},) for the weight of shape {tuple(shape)}; the file is "
                                     "corrupt or not the expected model.")
            bias = self.tensor(bias_name, compute_dtype, device)
        packed = self.packed(name)
        if packed is not None:
            qtype, raw = packed
            return QuantLinear(raw.to(device), qtype, shape[1], shape[0], bias, compute_dtype, kernel)
        if self.storage(name) == FP8_STORAGE:
            scale = self._fp8_scale(name)
            if scale is None:
                scale = torch.ones(1)
            return Fp8Linear(self._dense(name, None, device), scale.to(device), bias, compute_dtype)
        layer = nn.Linear(shape[1], shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(self._dense(name, compute_dtype, device), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def with_prefix(self, prefix: str) -> "WeightSource":
        """View of the tensors whose names start with `prefix`, with the prefix removed."""
        return _View(self, lambda name: name[len(prefix):] if name.startswith(prefix) else None,
                     f"{self.describe()} [{prefix}*]")

    def renamed(self, fn: Callable[[str], str | None]) -> "WeightSource":
        """View with every name mapped through fn (None drops the tensor)."""
        return _View(self, fn, self.describe())

    def close(self):
        pass

    def _key_set(self):
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = self._keys_cache = frozenset(self.keys())
        return cached

    def _require(self, name: str):
        if name not in self._key_set():
            raise self._missing(name)

    def _missing(self, name: str) -> ModelFileError:
        return ModelFileError(f"{self.describe()}: tensor {quote(name)} is missing. This file does not hold the "
                              "expected model (or is incomplete); check that you picked the right file.")

    def _fp8_scale(self, name: str):
        # Official Ideogram fp8: `<layer>.weight_scale`, one per output row; ComfyUI "fp8_scaled" files:
        # `<layer>.scale_weight`, one per tensor.
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        for candidate in (f"{name}_scale", f"{stem}.scale_weight"):
            if candidate in self._key_set():
                return self._dense(candidate, torch.float32, "cpu").reshape(-1)
        return None


# ---------------------------------------------------------------------------------------------------------------
# GGUF files: quant_tools' reader, torch views

# Element types whose GGUF data is plain numbers (viewed typed, not as packed bytes).
_FLOAT_TORCH_DTYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is the logical shape in torch order (a Linear weight is (out_features, in_features)).
    `raw` is a zero-copy view of the mapped file: a float tensor of that shape for F32/F16/BF16, else a
    uint8 tensor (*shape[:-1], bytes_per_row) of packed blocks.
    """

    name: str
    qtype: Q
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
        self.alignment = header.alignment
        self.metadata: dict[str, Any] = header.metadata
        self.tensors: dict[str, GGUFTensor] = {name: _torch_view(t) for name, t in header.tensors.items()}

    def __repr__(self):
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors)"

    def close(self):
        """Drop the tensor views (views handed out keep the mapping alive until they are freed)."""
        self.tensors = {}


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raises `GGUFFormatError` for anything malformed."""
    return GGUFFile(path)


def _torch_view(t: TensorEntry) -> GGUFTensor:
    raw = torch.from_numpy(t.data)
    if t.qtype in _FLOAT_TORCH_DTYPES:
        raw = raw.view(_FLOAT_TORCH_DTYPES[t.qtype]).reshape(t.shape)
    elif t.shape:
        raw = raw.reshape(packed_shape(t.shape, t.qtype))
    return GGUFTensor(t.name, t.qtype, t.shape, raw)


class GGUFSource(WeightSource):
    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.path = gguf.path
        self.metadata = gguf.metadata

    def keys(self):
        return list(self.gguf.tensors)

    def shape(self, name):
        return self._get(name).shape

    def storage(self, name):
        return self._get(name).qtype.name

    def _dense(self, name, dtype, device):
        t = self._decodable(name)
        if not t.is_quantized:
            return t.raw.to(device=device, dtype=dtype or t.raw.dtype)
        try:
            return dequantize(t.raw.to(device), t.qtype, t.shape, dtype or torch.float32)
        except GGUFFormatError as exc:
            raise GGUFFormatError(f"{self.path}: tensor {quote(name)}: {exc}") from exc

    def packed(self, name):
        t = self._decodable(name)
        return (t.qtype, t.raw) if t.is_quantized else None

    def _get(self, name):
        try:
            return self.gguf.tensors[name]
        except KeyError:
            raise self._missing(name) from None

    def _decodable(self, name):
        """The tensor, when its type is one `dequantize` reads; checked before a layer keeps the bytes, so an
        unreadable type fails at load time, naming the file, and never in the middle of sampling."""
        t = self._get(name)
        if not decodable(t.qtype):
            raise GGUFFormatError(f"{self.path}: tensor {quote(name)} is stored as {t.qtype.name}, which neither this "
                                  "pack nor gguf-py can decode; use a file quantized to a supported type (Q4_K, "
                                  "Q5_K, Q6_K, Q8_0, F16, ...).")
        return t

    def close(self):
        self.gguf.close()


class SafetensorsSource(WeightSource):
    """One or more safetensors files (the shards of one checkpoint) seen as one name space."""

    def __init__(self, files: Iterable[str | os.PathLike], label: str | None = None):
        from safetensors import safe_open

        self.files = [os.fspath(f) for f in files]
        self.path = label or (self.files[0] if len(self.files) == 1 else os.path.dirname(self.files[0]))
        self._handles = {}
        self._where = {}
        self._dtypes = {}
        for file in self.files:
            _require_file(file)
            try:
                handle = safe_open(file, framework="pt")
                names = list(handle.keys())
            except Exception as exc:
                raise ModelFileError(f"{file}: not a readable safetensors file ({exc}). Download it again; "
                                     "if it is a GGUF, pick it with a .gguf name.") from exc
            self._handles[file] = handle
            for name in names:
                if name in self._where:
                    raise ModelFileError(f"{file}: tensor {quote(name)} also appears in {self._where[name]}; "
                                         "these files are not shards of one checkpoint.")
                self._where[name] = file

    def keys(self):
        return list(self._where)

    def shape(self, name):
        return tuple(self._handles[self._file(name)].get_slice(name).get_shape())

    def storage(self, name):
        return _SAFETENSORS_STORAGE.get(self._handles[self._file(name)].get_slice(name).get_dtype(), "?")

    def _dense(self, name, dtype, device):
        file = self._file(name)
        try:
            tensor = self._handles[file].get_tensor(name)
        except Exception as exc:  # safetensors raises its own SafetensorError on damaged data
            raise ModelFileError(f"{file}: cannot read tensor {quote(name)} ({quote(str(exc), 200)}). Download the "
                                 "file again.") from exc
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def _file(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise self._missing(name) from None

    def close(self):
        self._handles = {}


_SAFETENSORS_STORAGE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "F8_E4M3": FP8_STORAGE,
                        "F8_E5M2": "F8_E5M2", "I64": "I64", "I32": "I32", "I16": "I16", "I8": "I8",
                        "U8": "U8", "BOOL": "BOOL"}


class StateDictSource(WeightSource):
    """An in-memory {name: tensor} dict seen as a WeightSource (tests, converted checkpoints).

    Tensors already in the requested dtype and device are handed out as they are (no copy).
    """

    def __init__(self, tensors: dict, label: str = "<state dict>"):
        self._tensors = dict(tensors)
        self.path = label
        self.metadata = {}

    def keys(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def storage(self, name):
        return _TORCH_STORAGE.get(self._tensors[name].dtype, str(self._tensors[name].dtype))

    def _dense(self, name, dtype, device):
        value = self._tensors[name]
        return value.to(device=device, dtype=dtype or value.dtype)


_TORCH_STORAGE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                  torch.float8_e4m3fn: FP8_STORAGE, torch.float64: "F64"}
_STORAGE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, FP8_STORAGE: 1, "F8_E5M2": 1,
                  "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _View(WeightSource):
    def __init__(self, base: WeightSource, fn, label: str):
        self.base, self.path = base, label
        self._to_base = {}
        for name in base.keys():
            mapped = fn(name)
            if mapped is not None:
                self._to_base[mapped] = name
        self.metadata = getattr(base, "metadata", {})

    def keys(self):
        return list(self._to_base)

    def shape(self, name):
        return self.base.shape(self._base_name(name))

    def storage(self, name):
        return self.base.storage(self._base_name(name))

    def _dense(self, name, dtype, device):
        return self.base._dense(self._base_name(name), dtype, device)

    def packed(self, name):
        return self.base.packed(self._base_name(name))

    def _base_name(self, name):
        try:
            return self._to_base[name]
        except KeyError:
            raise self._missing(name) from None

    def close(self):
        self.base.close()


class CombinedSource(WeightSource):
    """Several sources as one name space (e.g. a checkpoint split over unrelated files)."""

    def __init__(self, sources: list[WeightSource]):
        self.sources = sources
        self.path = " + ".join(s.describe() for s in sources)
        self._owner = {}
        for source in sources:
            for name in source.keys():
                if name in self._owner:
                    raise ModelFileError(f"tensor {quote(name)} is in both {self._owner[name].describe()} and "
                                         f"{source.describe()}; pass only one of them.")
                self._owner[name] = source

    def keys(self):
        return list(self._owner)

    def shape(self, name):
        return self._source(name).shape(name)

    def storage(self, name):
        return self._source(name).storage(name)

    def _dense(self, name, dtype, device):
        return self._source(name)._dense(name, dtype, device)

    def packed(self, name):
        return self._source(name).packed(name)

    def _source(self, name):
        try:
            return self._owner[name]
        except KeyError:
            raise self._missing(name) from None

    def close(self):
        for source in self.sources:
            source.close()


def _require_file(path: str):
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: file not found. Check the path, or download the model first "
                             "(`python -m ideogram4_gguf download`).")


def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def open_weights(paths) -> WeightSource:
    """A WeightSource over a .gguf file, a .safetensors file, a sharded `*.safetensors.index.json`, a folder
    holding one checkpoint, or a list of any of these (combined into one name space)."""
    if isinstance(paths, (list, tuple)):
        sources = [open_weights(p) for p in paths]
        return sources[0] if len(sources) == 1 else CombinedSource(sources)
    path = os.fspath(paths)
    _require_file(path)
    p = Path(path)
    if p.is_dir():
        return _open_folder(p)
    if path.endswith(".index.json"):
        return _open_index(p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(f"{path}: pickle checkpoints ({p.suffix}) are never loaded (they can run code). "
                             "Use the .safetensors or .gguf release of this model.")
    kind = _sniff(path)
    if kind == "gguf" or (kind == "unknown" and p.suffix.lower() == ".gguf"):
        return GGUFSource(open_gguf(path))
    if kind == "safetensors" or p.suffix.lower() == ".safetensors":
        return SafetensorsSource([path])
    raise ModelFileError(f"{path}: neither a GGUF nor a safetensors file (unrecognised header). Pick a "
                         ".gguf or .safetensors model file.")


def _open_index(index: Path) -> WeightSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{index}: not a safetensors index (expected a JSON object with a "
                             f"'weight_map'): {exc}") from exc
    shards = sorted({str(index.parent / shard) for shard in weight_map.values()})
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise ModelFileError(f"{index}: {len(missing)} shard(s) missing, e.g. {missing[0]}. Download the whole "
                             "folder.")
    return SafetensorsSource(shards, label=str(index.parent))


def _open_folder(folder: Path) -> WeightSource:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return _open_index(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return SafetensorsSource(files, label=str(folder))
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(open_gguf(ggufs[0]))
    raise ModelFileError(f"{folder}: no .safetensors, *.safetensors.index.json or single .gguf file in this "
                         "folder.")


__all__ = ["WeightSource", "GGUFSource", "SafetensorsSource", "StateDictSource", "CombinedSource", "open_weights",
           "FP8_STORAGE"]
