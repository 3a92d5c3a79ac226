"""GGUF container: validate, memory-map, expose every tensor as a zero-copy torch view.

gguf-py's `GGUFReader` does the parsing. It trusts the counts in the header, though: an array whose count
runs past the end of the file makes it loop (and grow lists) for as long as the count says, and a bad
offset surfaces as an obscure numpy error. So a short bounds-checked walk over the same structure runs
first (`_check_layout`); it touches only the header bytes, never allocates in proportion to a number read
from the file, and turns every problem into one `GGUFFormatError` naming the file. It checks what llama.cpp's
own reader checks (ggml `gguf.cpp`, `gguf_init_from_file_impl`: UTF-8 keys and names, no duplicates, at most
four dimensions, each below 2^63, known types, data inside the file) and quotes what the file holds through
`errors.quote`, so a message stays one short line whatever the file contains.

Metadata values are handed out as gguf-py parses them (any type a key may hold); the loaders check the type
and range of every value they read.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import GGUFFormatError, quote

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
MAX_DIM = (1 << 63) - 1  # ggml dimensions are int64_t

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
            tensors = {t.name: _make_tensor(t) for t in reader.tensors}
        except Exception as exc:  # the layout check passed, so this is a format detail gguf-py rejects
            raise GGUFFormatError(f"{self.path}: gguf-py cannot parse this file ({quote(str(exc), 200)}). Download "
                                  "it again or re-create it with quant_tools.") from exc
        self._reader = reader
        self.alignment = int(reader.alignment)
        self.metadata = {
            name: _field_value(field)
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")
        }
        self.tensors = tensors

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

    def _get(self, offset, dtype, count=1, override_order=None):
        # The same views as gguf-py's `_get`, sliced from a plain ndarray view of the mapping: np.memmap's own
        # __getitem__ / __array_finalize__ cost ~6 us a call, 3/4 of the time to open a 400-tensor file.
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        arr = plain[offset:offset + itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

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


def _make_tensor(t) -> GGUFTensor:
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

    def text(self, what: str) -> str:
        """A key or tensor name: a GGUF string of valid UTF-8, at most MAX_NAME_BYTES long."""
        start = self.pos
        raw = self.string(what, MAX_NAME_BYTES)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {start} is not valid UTF-8 ({quote(raw)})")

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n


def _check_layout(path: str) -> None:
    if not os.path.exists(path):
        raise GGUFFormatError(f"{path}: file not found.")
    if os.path.isdir(path):
        raise GGUFFormatError(f"{path}: is a folder, expected a .gguf file.")
    try:
        size = os.path.getsize(path)
        if size < 24:
            raise GGUFFormatError(f"{path}: only {size} bytes; not a GGUF file (a GGUF header alone is 24 bytes).")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Cursor(path, buf, size))
    except OSError as exc:
        raise GGUFFormatError(f"{path}: cannot read the file ({exc.strerror or exc}).") from exc


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
    keys = set()
    for _ in range(n_kv):
        key = cur.text("a metadata key")
        if key in keys:
            cur.fail(f"metadata key {quote(key)} appears twice")
        keys.add(key)
        vtype = cur.unpack("I", f"the type of key {quote(key)}")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                cur.fail(f"general.alignment has value type {vtype}, not uint32 ({GGUFValueType.UINT32.value})")
            alignment = cur.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                cur.fail(f"general.alignment = {alignment} is not a power of two")
            continue
        _skip_value(cur, vtype, key)

    infos, names = [], set()
    for _ in range(n_tensors):
        name = cur.text("a tensor name")
        if name in names:
            cur.fail(f"tensor {quote(name)} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"the rank of tensor {quote(name)}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {quote(name)} claims {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", f"the shape of tensor {quote(name)}") for _ in range(n_dims)]
        raw_type = cur.unpack("I", f"the type of tensor {quote(name)}")
        offset = cur.unpack("Q", f"the data offset of tensor {quote(name)}")
        infos.append((name, dims, raw_type, offset))

    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        _check_tensor(cur, quote(name), dims, raw_type, data_start + offset)


def _check_tensor(cur: _Cursor, name: str, dims: list[int], raw_type: int, start: int) -> None:
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        cur.fail(f"tensor {name} has unknown ggml type id {raw_type}")
    if any(d > MAX_DIM for d in dims):
        cur.fail(f"tensor {name} has a dimension of {max(dims)}, beyond the int64 range of ggml (shape {dims})")
    if not dims and block_size > 1:
        cur.fail(f"tensor {name} ({qtype.name}) has no dimensions; a quantized tensor needs rows of whole blocks")
    if dims and dims[0] % block_size:
        cur.fail(f"tensor {name} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its block size "
                 f"{block_size}")
    # A zero dimension makes the tensor empty, but the other dimensions still have to describe something the
    # file could hold (numpy and torch reject shapes whose non-zero extent overflows).
    extent = math.prod(d for d in dims if d)
    if extent // block_size * type_size > cur.size:
        cur.fail(f"tensor {name} has shape {dims} ({extent} elements of {qtype.name}), more than the whole file "
                 f"({cur.size} bytes) could hold")
    n_bytes = math.prod(dims) // block_size * type_size
    if start + n_bytes > cur.size:
        cur.fail(f"tensor {name} data ({n_bytes} bytes at byte {start}) lies outside the file "
                 f"({cur.size} bytes); the file is probably truncated")
    if start % min(type_size, 8) and qtype in _FLOAT_TORCH_DTYPES:
        cur.fail(f"tensor {name} data at byte {start} is misaligned for {qtype.name}")


def _skip_value(cur: _Cursor, vtype: int, key: str) -> None:
    what = f"the value of key {quote(key)}"
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
