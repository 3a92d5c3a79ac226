"""GGUF container: validate, memory-map, expose every tensor as a zero-copy torch view.

gguf-py's `GGUFReader` does the parsing. It trusts the counts in the header, though: an array whose count
runs past the end of the file makes it loop (and grow lists) for as long as the count says, and a bad
offset surfaces as an obscure numpy error. So a short bounds-checked walk over the same structure runs
first (`_check_layout`); it touches only the header bytes, never allocates in proportion to a number read
from the file, and turns every problem into one `GGUFFormatError` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import GGUFFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}

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
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        _check_layout(self.path)
        try:
            # mode "c" (copy-on-write) gives writable numpy views, so torch.from_numpy shares the mapping
            # without warnings; nothing ever writes, so no page is ever copied.
            reader = _Reader(self.path, mode="c")
        except Exception as exc:  # the layout check passed, so this is a format detail gguf-py rejects
            raise GGUFFormatError(f"{self.path}: gguf-py cannot parse this file ({exc}).") from exc
        self._reader = reader
        self.alignment = int(reader.alignment)
        self.metadata = {
            name: _field_value(field)
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")
        }
        for t in reader.tensors:
            self.tensors[t.name] = _make_tensor(self.path, t)

    def __repr__(self):
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors)"

    def close(self):
        """Drop the mapping (tensor views handed out keep it alive until they are freed)."""
        self.tensors = {}
        self._reader = None


class _Reader(GGUFReader):
    """GGUFReader with a fast path for metadata arrays.

    gguf-py parses an array element by element, each through its generic field parser: 7.8 s for the
    152 k-token vocabulary of a Qwen GGUF (measured here), paid on every text-encoder load. A numeric array
    becomes one numpy view instead, and a string array one loop of direct length reads. The resulting
    fields are the same as gguf-py's (tests/ops/test_gguf_file.py compares `contents()` of both).
    """

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type_raw = self._get(orig_offs, np.uint32)
        count_raw = self._get(orig_offs + 4, np.uint64)
        item_type, count = GGUFValueType(int(item_type_raw[0])), int(count_raw[0])
        offs = orig_offs + 12
        parts = [item_type_raw, count_raw]
        if item_type in self.gguf_scalar_to_np:
            values = self._get(offs, self.gguf_scalar_to_np[item_type], count)
            parts.append(values)
            return 12 + values.nbytes, parts, [2] if count else [], [GGUFValueType.ARRAY, item_type]
        if item_type != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        data_idxs = []
        # slices of a plain ndarray view: np.memmap's own __getitem__ costs ~4 us a call
        data = self.data.view(np.ndarray)
        raw = memoryview(data)
        for _ in range(count):
            length = int.from_bytes(raw[offs:offs + 8], "little")
            parts += (data[offs:offs + 8], data[offs + 8:offs + 8 + length])
            data_idxs.append(len(parts) - 1)
            offs += 8 + length
        return offs - orig_offs, parts, data_idxs, [GGUFValueType.ARRAY, item_type]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raises `GGUFFormatError` for anything malformed."""
    return GGUFFile(path)


def _field_value(field):
    try:
        return field.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


def _make_tensor(path: str, t) -> GGUFTensor:
    qtype = GGMLQuantizationType(int(t.tensor_type))
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    data = t.data
    if qtype is GGMLQuantizationType.BF16:
        # gguf-py hands BF16 out as bytes (numpy has no bfloat16); reinterpret without copying.
        raw = torch.from_numpy(data.reshape(-1)).view(torch.bfloat16).reshape(shape)
    else:
        raw = torch.from_numpy(data)
    return GGUFTensor(t.name, qtype, shape, raw)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, problem: str):
        raise GGUFFormatError(f"{self.path}: {problem}. The file is not a valid GGUF (corrupt or truncated?); "
                              "download it again or re-create it with quant_tools.")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated while reading {what} at byte {self.pos} (file has {self.size} bytes)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value if len(value) > 1 else value[0]

    def string(self, what: str, limit: int | None = None) -> bytes:
        length = self.unpack("Q", what)
        if limit is not None and length > limit:
            self.fail(f"{what} claims {length} bytes")
        self.need(length, what)
        value = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return value

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n


def _check_layout(path: str) -> None:
    if not os.path.exists(path):
        raise GGUFFormatError(f"{path}: file not found.")
    if os.path.isdir(path):
        raise GGUFFormatError(f"{path}: is a folder, expected a .gguf file.")
    size = os.path.getsize(path)
    if size < 24:
        raise GGUFFormatError(f"{path}: only {size} bytes; not a GGUF file (a GGUF header alone is 24 bytes).")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _walk(_Cursor(path, buf, size))


def _walk(cur: _Cursor) -> None:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        hint = " (it looks like a safetensors file)" if bytes(cur.buf[8:9]) == b"{" else ""
        cur.fail(f"starts with {magic!r}, not the GGUF magic{hint}")
    cur.pos = 4
    version = cur.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            cur.fail("is a big-endian GGUF; only little-endian files are supported")
        cur.fail(f"has GGUF version {version}; supported versions are {SUPPORTED_VERSIONS}")
    n_tensors, n_kv = cur.unpack("QQ", "the tensor and key counts")
    # Each KV needs >= 13 bytes and each tensor info >= 24: counts beyond that are lies, not big files.
    if n_kv * 13 > cur.size - cur.pos or n_tensors * 24 > cur.size - cur.pos:
        cur.fail(f"claims {n_tensors} tensors and {n_kv} metadata keys, more than {cur.size} bytes can hold")

    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string("a metadata key", MAX_NAME_BYTES)
        vtype = cur.unpack("I", f"the type of key {key!r}")
        if key == b"general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = cur.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                cur.fail(f"general.alignment = {alignment} is not a power of two")
            continue
        _skip_value(cur, vtype, key)

    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name", MAX_NAME_BYTES)
        n_dims = cur.unpack("I", f"the rank of tensor {name!r}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {name!r} claims {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        raw_type = cur.unpack("I", f"the type of tensor {name!r}")
        offset = cur.unpack("Q", f"the data offset of tensor {name!r}")
        infos.append((name.decode("utf-8", "replace"), dims, raw_type, offset))

    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            cur.fail(f"tensor {name!r} has unknown ggml type id {raw_type}")
        n_elements = 1
        for d in dims:
            n_elements *= d
        if dims and dims[0] % block_size:
            cur.fail(f"tensor {name!r} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its "
                     f"block size {block_size}")
        n_bytes = n_elements // block_size * type_size
        start = data_start + offset
        if start + n_bytes > cur.size:
            cur.fail(f"tensor {name!r} data ({n_bytes} bytes at byte {start}) lies outside the file "
                     f"({cur.size} bytes); the file is probably truncated")
        if start % min(type_size, 8) and qtype in _FLOAT_TORCH_DTYPES:
            cur.fail(f"tensor {name!r} data at byte {start} is misaligned for {qtype.name}")


def _skip_value(cur: _Cursor, vtype: int, key: bytes) -> None:
    what = f"the value of key {key.decode('utf-8', 'replace')!r}"
    if vtype in _SCALAR_SIZES:
        cur.skip(_SCALAR_SIZES[vtype], what)
    elif vtype == GGUFValueType.STRING:
        cur.string(what)
    elif vtype == GGUFValueType.ARRAY:
        item_type, count = cur.unpack("IQ", what)
        if item_type in _SCALAR_SIZES:
            cur.skip(count * _SCALAR_SIZES[item_type], what)
        elif item_type == GGUFValueType.STRING:
            if count * 8 > cur.size - cur.pos:
                cur.fail(f"{what} claims {count} strings")
            buf, pos, size = cur.buf, cur.pos, cur.size
            for _ in range(count):  # a tokenizer vocabulary is ~300 k strings: keep this loop lean
                if pos + 8 > size:
                    cur.pos = pos
                    cur.fail(f"truncated inside {what}")
                pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
            cur.pos = pos
            cur.need(0, what)
        else:
            cur.fail(f"{what} is an array of type {item_type}, which GGUF readers do not support")
    else:
        cur.fail(f"{what} has unknown value type {vtype}")

