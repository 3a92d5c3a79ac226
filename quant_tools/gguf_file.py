"""Read a GGUF file, torch-free: a validated walk over the container, then gguf-py's parse (docs/spec.md §G1).

The one GGUF reading layer of the pack. `GGUFHeader` is the checked metadata and tensor table over a memory map;
quant_tools' `GGUFFile` (below, for `inspect` and `verify`) keeps only the table and reads tensor bytes by row range,
and the runtime's `ops/gguf_file.py` lays zero-copy torch views over the mapped bytes.

gguf-py's `GGUFReader` does the parsing. It trusts the counts in the header, though: an array whose count runs past
the end of the file makes it loop (and grow lists) for as long as the count says, and a bad offset surfaces as an
obscure numpy error. So a short bounds-checked walk over the same structure runs first (`_walk`); it touches only
the header bytes, never allocates in proportion to a number read from the file, and turns every problem into one
error line naming the file. It checks what llama.cpp's own reader checks (ggml `gguf.cpp`,
`gguf_init_from_file_impl`: UTF-8 keys and names, no duplicates, at most four dimensions, each below 2^63, known
types, data inside the file) and quotes what the file holds through `quote`, so a message stays one short line
whatever the file contains. A file that ends before what its header describes is called truncated (the usual
case: a cut download or copy); anything else is damage.

Errors are raised as the `error` class the caller passes: QuantToolError here, the pack's GGUFFormatError from
`ops`. Metadata values are handed out as gguf-py parses them (any type a key may hold; None where gguf-py cannot
decode one); the loaders check the type and range of every value they read.
"""

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import QuantToolError, quote
from .layout import BRANCH_PREFIXES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
MAX_DIM = (1 << 63) - 1  # ggml dimensions are int64_t, and so are file offsets: no file holds more bytes

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
# Element types whose data is plain numbers (aligned to their element size, handed out typed).
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table. `shape` is the logical shape in torch order (a Linear weight is (out, in));
    `data` is gguf-py's zero-copy numpy view of the mapped bytes (elements for F32/F16, else uint8 rows)."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple
    offset: int  # absolute
    nbytes: int
    data: np.ndarray


class GGUFHeader:
    """A validated GGUF file's metadata and tensor table, parsed by gguf-py over a memory map.

    mode: "r" (read-only views) or "c" (copy-on-write: writable views that share the mapping; nothing writes, so
    no page is ever copied). The mapping lives as long as this object or any `data` view."""

    def __init__(self, path, *, error=QuantToolError, mode="r"):
        self.path = os.fspath(path)
        self.size = check_layout(self.path, error)
        try:
            reader = _Reader(self.path, mode=mode)
            tensors = {t.name: _entry(t) for t in reader.tensors}
        except Exception as exc:  # the layout check passed, so this is a format detail gguf-py rejects
            raise error(_damaged(self.path, f"gguf-py cannot parse it ({quote(str(exc), 200)})")) from exc
        self.reader = reader
        self.alignment = int(reader.alignment)
        self.metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        self.tensors = tensors


def _entry(t) -> TensorEntry:
    return TensorEntry(t.name, GGMLQuantizationType(int(t.tensor_type)), tuple(int(d) for d in reversed(t.shape.tolist())),
                       int(t.data_offset), int(t.n_bytes), t.data)


def _field_value(f):
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError):
        return None


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
        order = "big" if self.byte_order == "S" else "little"  # "S": the file's order is swapped (big-endian)
        for _ in range(count):
            length = int.from_bytes(raw[offs:offs + 8], order)
            parts += (data[offs:offs + 8], data[offs + 8:offs + 8 + length])
            data_idxs.append(len(parts) - 1)
            offs += 8 + length
        return offs - orig_offs, parts, data_idxs, [GGUFValueType.ARRAY, item_type]


# ---------------------------------------------------------------------------------------------------------------
# The validated walk


def _truncated(path, problem):
    return f"{path}: the file is truncated: {problem}. The download or copy was cut short; download or copy it again."


def _damaged(path, problem):
    return f"{path}: not a readable GGUF file: {problem}. Download it again, or re-create it with quant_tools."


class _Bad(Exception):
    def __init__(self, problem, truncated=False):
        super().__init__(problem)
        self.problem, self.truncated = problem, truncated


def check_layout(path, error=QuantToolError) -> int:
    """Walk the whole header of the GGUF at `path` and check every tensor's place; returns the file size. Raises
    `error` with one line naming the file (truncated or damaged, and where)."""
    if not os.path.exists(path):
        raise error(f"{path}: file not found.")
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, expected a .gguf file.")
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise error(f"{path}: the file is empty; not a GGUF file.")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Cursor(buf, size))
    except _Bad as bad:
        raise error((_truncated if bad.truncated else _damaged)(path, bad.problem)) from None
    except OSError as exc:
        raise error(f"{path}: cannot read the file ({exc.strerror or exc}).") from exc
    return size


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"it ends at byte {self.size}, inside {what} (from byte {self.pos})", truncated=True)

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value if len(value) > 1 else value[0]

    def string(self, what: str, limit=None) -> bytes:
        length = self.unpack("Q", what)
        if limit is not None and length > limit:
            raise _Bad(f"{what} claims {length} bytes")
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
            raise _Bad(f"{what} at byte {start} is not valid UTF-8 ({quote(raw)})") from None

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n


def _walk(cur: _Cursor) -> None:
    magic = bytes(cur.buf[0:4])
    if magic != GGUF_MAGIC:
        if GGUF_MAGIC.startswith(magic):
            raise _Bad(f"it ends at byte {cur.size}, inside the header", truncated=True)
        hint = " (it looks like a safetensors file)" if bytes(cur.buf[8:9]) == b"{" else ""
        raise _Bad(f"it starts with {magic!r}, not the GGUF magic{hint}")
    cur.pos = 4
    version = cur.unpack("I", "the header")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise _Bad("it is a big-endian GGUF; only little-endian files are supported")
        raise _Bad(f"it has GGUF version {version}; supported versions are {SUPPORTED_VERSIONS}")
    n_tensors, n_kv = cur.unpack("QQ", "the header")
    # Each KV needs >= 13 bytes and each tensor info >= 24. Counts that need more bytes than any file can have are
    # damage; smaller ones that this file cannot hold mean it was cut, and the walk below finds where (each key and
    # tensor it reads takes bytes, so it ends with the file whatever the counts say).
    if n_kv * 13 + n_tensors * 24 > MAX_DIM:
        raise _Bad(f"its header claims {n_tensors} tensors and {n_kv} metadata keys, more than any file can hold")

    alignment = DEFAULT_ALIGNMENT
    keys = set()
    for _ in range(n_kv):
        key = cur.text("a metadata key")
        if key in keys:
            raise _Bad(f"metadata key {quote(key)} appears twice")
        keys.add(key)
        vtype = cur.unpack("I", f"the type of key {quote(key)}")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _Bad(f"general.alignment has value type {vtype}, not uint32 ({GGUFValueType.UINT32.value})")
            alignment = cur.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment = {alignment} is not a power of two")
            continue
        _skip_value(cur, vtype, key)

    infos, names = [], set()
    for _ in range(n_tensors):
        name = cur.text("a tensor name")
        if name in names:
            raise _Bad(f"tensor {quote(name)} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"the rank of tensor {quote(name)}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {quote(name)} claims {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", f"the shape of tensor {quote(name)}") for _ in range(n_dims)]
        raw_type = cur.unpack("I", f"the type of tensor {quote(name)}")
        offset = cur.unpack("Q", f"the data offset of tensor {quote(name)}")
        infos.append((name, dims, raw_type, offset))

    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        _check_tensor(cur, quote(name), dims, raw_type, data_start + offset)


def _check_tensor(cur: _Cursor, name: str, dims: list, raw_type: int, start: int) -> None:
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name} has unknown ggml type id {raw_type}") from None
    if any(d > MAX_DIM for d in dims):
        raise _Bad(f"tensor {name} has a dimension of {max(dims)}, beyond the int64 range of ggml (shape {dims})")
    if not dims and block_size > 1:
        raise _Bad(f"tensor {name} ({qtype.name}) has no dimensions; a quantized tensor needs rows of whole blocks")
    if dims and dims[0] % block_size:
        raise _Bad(f"tensor {name} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its block size "
                   f"{block_size}")
    n_bytes = math.prod(dims) // block_size * type_size
    if 0 in dims:
        # An empty tensor, but the other dimensions still have to describe something the file could hold (numpy
        # and torch reject shapes whose non-zero extent overflows).
        extent = math.prod(d for d in dims if d)
        if extent // block_size * type_size > cur.size:
            raise _Bad(f"tensor {name} has shape {dims} ({extent} elements of {qtype.name}), more than the whole file "
                       f"({cur.size} bytes) could hold")
    elif start + n_bytes > cur.size:
        where = f"tensor {name} data ({n_bytes} bytes at byte {start}) lies outside the file ({cur.size} bytes)"
        raise _Bad(where + (", and outside any file" if start + n_bytes > MAX_DIM else ""),
                   truncated=start + n_bytes <= MAX_DIM)
    if start % min(type_size, 8) and qtype in FLOAT_TYPES:
        raise _Bad(f"tensor {name} data at byte {start} is misaligned for {qtype.name}")


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
            if count * 8 > MAX_DIM:
                raise _Bad(f"{what} claims {count} strings, more than any file can hold")
            buf, pos, size = cur.buf, cur.pos, cur.size
            for _ in range(count):  # a tokenizer vocabulary is ~300 k strings: keep this loop lean
                if pos + 8 > size:
                    cur.pos = pos
                    cur.need(8, what)
                pos += 8 + int.from_bytes(buf[pos:pos + 8], "little")
            cur.pos = pos
            cur.need(0, what)
        else:
            raise _Bad(f"{what} is an array of type {item_type}, which GGUF readers do not support")
    else:
        raise _Bad(f"{what} has unknown value type {vtype}")


# ---------------------------------------------------------------------------------------------------------------
# quant_tools' view: the table, and tensor bytes by row range

# Tensor-name prefixes by branch: ours first, then layouts other tools write (ComfyUI-style, diffusers-style).
KNOWN_PREFIXES = (*BRANCH_PREFIXES.values(), "model.diffusion_model.", "transformer.")


@dataclass(frozen=True)
class FileTensor:
    name: str
    qtype: str  # GGML type name
    shape: tuple  # torch order (out, in)
    offset: int  # absolute
    nbytes: int

    @property
    def numel(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rows(self):
        return self.numel // self.shape[-1]

    def split_prefix(self):
        for prefix in KNOWN_PREFIXES:
            if self.name.startswith(prefix):
                return prefix, self.name[len(prefix):]
        return "", self.name


class GGUFFile:
    """The metadata and tensor table of a GGUF for `inspect` and `verify`. The tensor bytes are then read with
    positional reads, row chunk by row chunk, so that checking a 10 GB file keeps the resident memory small (a
    memory-mapped view would pull every page it touches into the process RSS); the header's mapping is dropped."""

    def __init__(self, path):
        header = GGUFHeader(path)
        self.path = Path(header.path)
        self.size = header.size
        self.alignment = header.alignment
        self.metadata = header.metadata
        self.tensors = [FileTensor(t.name, t.qtype.name, t.shape, t.offset, t.nbytes) for t in header.tensors.values()]

    def read_rows(self, tensor, row_start, row_stop):
        """uint8 (rows, row_bytes) of rows [row_start, row_stop)."""
        row_bytes = tensor.nbytes // tensor.rows
        out = np.empty((row_stop - row_start, row_bytes), np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(tensor.offset + row_start * row_bytes)
            view = memoryview(out).cast("B")
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise QuantToolError(f"{self.path}: unexpected end of file in {tensor.name}")
                done += got
        return out

    def branches(self):
        """prefix -> list of FileTensor, in file order ("" for bare names)."""
        groups = {}
        for t in self.tensors:
            groups.setdefault(t.split_prefix()[0], []).append(t)
        return groups
