"""Read a GGUF file, torch-free, in one bounds-checked pass over its header (docs/spec.md §G1).

The one GGUF reading layer of the pack. `GGUFHeader` is a file's checked metadata and tensor table, each tensor's
bytes a zero-copy view of one memory map; quant_tools' `GGUFFile` (below, for `inspect` and `verify`) keeps only
the table and reads tensor bytes by row range, and the runtime (`ops/weights.py`) lays torch views over the bytes.

The parse trusts nothing the file says: it never reads past the end of the file, never allocates in proportion to
a number read from it before the bytes are there, and turns every problem into one error line naming the file. It
checks what llama.cpp's own reader checks (ggml `gguf.cpp`, `gguf_init_from_file_impl`: UTF-8 keys and names, no
duplicates, at most four dimensions, each below 2^63, known types, data inside the file) and quotes what the file
holds through `quote`, so a message stays one short line whatever the file contains. A file that ends before what
its header describes is called truncated (the usual case: a cut download or copy); anything else is damage.

Metadata values are what gguf-py's `GGUFReader` hands out for the same bytes (`ReaderField.contents()`: Python
ints, floats, bools, strings and lists of them; tests/ops/test_gguf_pin.py compares the two on every value
type), with None where a string is not valid UTF-8; the loaders check the type and range of every value they read.
Errors are raised as the `error` class the caller passes: QuantToolError here, the pack's GGUFFormatError from
`ops`. gguf-py supplies the type tables (`GGMLQuantizationType`, `GGML_QUANT_SIZES`, `GGUFValueType`).
"""

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import QuantToolError, quote
from .layout import branch_prefixes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
MAX_DIM = (1 << 63) - 1  # ggml dimensions are int64_t, and so are file offsets: no file holds more bytes

# Metadata value types read as numbers (little-endian), as numpy reads them: gguf-py's `gguf_scalar_to_np`.
_SCALARS = {
    GGUFValueType.UINT8: np.dtype("u1"), GGUFValueType.INT8: np.dtype("i1"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"), GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"), GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Element types whose data is plain numbers (aligned to their element size, viewed typed by the runtime).
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table. `shape` is the logical shape in torch order (a Linear weight is (out, in));
    `data` is its bytes: a zero-copy uint8 view of the memory map."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple
    offset: int  # absolute
    nbytes: int
    data: np.ndarray


class GGUFHeader:
    """A validated GGUF file's metadata and tensor table over a memory map of the file.

    mode: "r" (read-only views) or "c" (copy-on-write: writable views that share the mapping; nothing writes, so
    no page is ever copied). The mapping lives as long as any `data` view."""

    def __init__(self, path, *, error=QuantToolError, mode="r"):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise error(f"{self.path}: file not found.")
        if os.path.isdir(self.path):
            raise error(f"{self.path}: is a folder, expected a .gguf file.")
        try:
            if os.path.getsize(self.path) == 0:
                raise error(f"{self.path}: the file is empty; not a GGUF file.")
            # (a plain ndarray over the mapping: np.memmap's own __getitem__ costs microseconds a slice)
            mapped = np.memmap(self.path, dtype=np.uint8, mode=mode).view(np.ndarray)
            with memoryview(mapped) as buf:
                cur = _Cursor(buf, mapped.size)
                self.metadata, tensors = _read_header(cur, mapped)
        except _Bad as bad:
            raise error((_truncated if bad.truncated else _damaged)(self.path, bad.problem)) from None
        except OSError as exc:
            raise error(f"{self.path}: cannot read the file ({exc.strerror or exc}).") from exc
        self.size = mapped.size
        self.alignment = cur.alignment
        self.tensors = {t.name: t for t in tensors}


# ---------------------------------------------------------------------------------------------------------------
# The validated parse


def _truncated(path, problem):
    return f"{path}: the file is truncated: {problem}. The download or copy was cut short; download or copy it again."


def _damaged(path, problem):
    return f"{path}: not a readable GGUF file: {problem}. Download it again, or re-create it with quant_tools."


class _Bad(Exception):
    def __init__(self, problem, truncated=False):
        super().__init__(problem)
        self.problem, self.truncated = problem, truncated


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file. `what` names the part being read for the error
    message; a "{}" in it stands for the key or tensor being read (`subject`), quoted only if a message is made."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0
        self.subject, self.alignment = "", DEFAULT_ALIGNMENT

    def where(self, what: str) -> str:
        return what.format(quote(self.subject)) if "{}" in what else what

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise _Bad(f"it ends at byte {self.size}, inside {self.where(what)} (from byte {self.pos})", truncated=True)

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value if len(value) > 1 else value[0]

    def string(self, what: str, limit=None) -> bytes:
        length = self.unpack("Q", what)
        if limit is not None and length > limit:
            raise _Bad(f"{self.where(what)} claims {length} bytes")
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

    def numbers(self, dtype: np.dtype, count: int, what: str) -> list:
        self.need(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values


def _read_header(cur: _Cursor, mapped: np.ndarray) -> tuple[dict, list[TensorEntry]]:
    """(metadata, tensors) of the file `cur` reads; each tensor's `data` is its slice of `mapped`."""
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
    # damage; smaller ones that this file cannot hold mean it was cut, and the parse below finds where (each key and
    # tensor it reads takes bytes, so it ends with the file whatever the counts say).
    if n_kv * 13 + n_tensors * 24 > MAX_DIM:
        raise _Bad(f"its header claims {n_tensors} tensors and {n_kv} metadata keys, more than any file can hold")

    metadata = {}
    for _ in range(n_kv):
        key = cur.subject = cur.text("a metadata key")
        if key in metadata:
            raise _Bad(f"metadata key {quote(key)} appears twice")
        vtype = cur.unpack("I", "the type of key {}")
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _Bad(f"general.alignment has value type {vtype}, not uint32 ({GGUFValueType.UINT32.value})")
            cur.alignment = metadata[key] = cur.unpack("I", "general.alignment")
            if cur.alignment == 0 or cur.alignment & (cur.alignment - 1):
                raise _Bad(f"general.alignment = {cur.alignment} is not a power of two")
            continue
        metadata[key] = _read_value(cur, vtype)

    infos, names = [], set()
    for _ in range(n_tensors):
        name = cur.subject = cur.text("a tensor name")
        if name in names:
            raise _Bad(f"tensor {quote(name)} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", "the rank of tensor {}")
        if n_dims > MAX_DIMS:
            raise _Bad(f"tensor {quote(name)} claims {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cur.unpack("Q", "the shape of tensor {}") for _ in range(n_dims)]
        raw_type = cur.unpack("I", "the type of tensor {}")
        offset = cur.unpack("Q", "the data offset of tensor {}")
        infos.append((name, dims, raw_type, offset))

    data_start = -(-cur.pos // cur.alignment) * cur.alignment
    return metadata, [_checked_tensor(cur, mapped, name, dims, raw_type, data_start + offset)
                      for name, dims, raw_type, offset in infos]


def _checked_tensor(cur: _Cursor, mapped: np.ndarray, name: str, dims: list, raw_type: int, start: int) -> TensorEntry:
    try:
        qtype = GGMLQuantizationType(raw_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {quote(name)} has unknown ggml type id {raw_type}") from None
    if any(d > MAX_DIM for d in dims):
        raise _Bad(f"tensor {quote(name)} has a dimension of {max(dims)}, beyond the int64 range of ggml (shape {dims})")
    if not dims and block_size > 1:
        raise _Bad(f"tensor {quote(name)} ({qtype.name}) has no dimensions; a quantized tensor needs rows of whole blocks")
    if dims and dims[0] % block_size:
        raise _Bad(f"tensor {quote(name)} ({qtype.name}) has rows of {dims[0]} values, not a multiple of its block size "
                   f"{block_size}")
    n_bytes = math.prod(dims) // block_size * type_size
    if 0 in dims:
        # An empty tensor, but the other dimensions still have to describe something the file could hold (numpy
        # and torch reject shapes whose non-zero extent overflows).
        extent = math.prod(d for d in dims if d)
        if extent // block_size * type_size > cur.size:
            raise _Bad(f"tensor {quote(name)} has shape {dims} ({extent} elements of {qtype.name}), more than the whole "
                       f"file ({cur.size} bytes) could hold")
    elif start + n_bytes > cur.size:
        where = f"tensor {quote(name)} data ({n_bytes} bytes at byte {start}) lies outside the file ({cur.size} bytes)"
        raise _Bad(where + (", and outside any file" if start + n_bytes > MAX_DIM else ""),
                   truncated=start + n_bytes <= MAX_DIM)
    if start % min(type_size, 8) and qtype in FLOAT_TYPES:
        raise _Bad(f"tensor {quote(name)} data at byte {start} is misaligned for {qtype.name}")
    return TensorEntry(name, qtype, tuple(reversed(dims)), start, n_bytes, mapped[start:start + n_bytes])


def _read_value(cur: _Cursor, vtype: int):
    """One metadata value, as gguf-py's `ReaderField.contents()` gives it (None: a string that is not UTF-8)."""
    what = "the value of key {}"
    if vtype in _SCALARS:
        return cur.numbers(_SCALARS[vtype], 1, what)[0]
    if vtype == GGUFValueType.STRING:
        return _decoded(cur.string(what))
    if vtype != GGUFValueType.ARRAY:
        raise _Bad(f"{cur.where(what)} has unknown value type {vtype}")
    item_type, count = cur.unpack("IQ", what)
    if item_type in _SCALARS:
        return cur.numbers(_SCALARS[item_type], count, what)
    if item_type != GGUFValueType.STRING:
        raise _Bad(f"{cur.where(what)} is an array of type {item_type}, which GGUF readers do not support")
    if count * 8 > MAX_DIM:
        raise _Bad(f"{cur.where(what)} claims {count} strings, more than any file can hold")
    buf, pos, size, items = cur.buf, cur.pos, cur.size, []
    for _ in range(count):  # a tokenizer vocabulary is ~150 k strings: keep this loop lean
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8, what)
        end = pos + 8 + int.from_bytes(buf[pos:pos + 8], "little")
        if end > size:
            cur.pos = pos + 8
            cur.need(end - pos - 8, what)
        if items is not None:
            try:
                items.append(str(buf[pos + 8:end], "utf-8"))
            except UnicodeDecodeError:
                items = None  # the whole value is unreadable, as gguf-py's contents() raises for it; read on
        pos = end
    cur.pos = pos
    return items


def _decoded(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# quant_tools' view: the table, and tensor bytes by row range

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
        # the branches' name prefixes, longest first (one may contain another: `transformer.` in `x.transformer.`)
        self.prefixes = sorted(branch_prefixes(header.tensors), key=len, reverse=True)

    def split_prefix(self, name):
        """(branch prefix, name without it); ("", name) outside every branch."""
        prefix = next((p for p in self.prefixes if name.startswith(p)), "")
        return prefix, name[len(prefix):]

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
            groups.setdefault(self.split_prefix(t.name)[0], []).append(t)
        return groups
