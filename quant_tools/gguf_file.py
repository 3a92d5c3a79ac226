"""Read a GGUF file for `inspect` and `verify`: metadata and tensor table through gguf-py, bytes by row range.

gguf-py's GGUFReader parses the header; the tensor bytes are then read with positional reads, row chunk by row
chunk, so that checking a 10 GB file keeps the resident memory small (a memory-mapped view would pull every
page it touches into the process RSS). When gguf-py cannot parse a file, a short walk over the layout
(docs/spec.md §G1) tells a truncated file (the usual case: a cut download or copy) from a damaged one.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import QuantToolError

# Tensor-name prefixes by branch: ours first, then layouts other tools write (ComfyUI-style, diffusers-style).
KNOWN_PREFIXES = ("conditional_transformer.", "unconditional_transformer.", "model.diffusion_model.", "transformer.")


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
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantToolError(f"{self.path}: no such file")
        self.size = self.path.stat().st_size
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError ... on bad files
            short = truncation(self.path, self.size)
            if short is not None:
                raise QuantToolError(f"{self.path}: the file is truncated: {short}. The download or copy was cut "
                                     "short; download or copy it again.") from None
            raise QuantToolError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: "
                                 f"{_cut(str(exc))})") from None
        self.alignment = reader.alignment
        self.metadata = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception:  # an exotic value type: keep the key, show it as unreadable
                self.metadata[key] = "<unreadable>"
        self.tensors = []
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(list(t.shape)))
            self.tensors.append(FileTensor(t.name, t.tensor_type.name, shape, int(t.data_offset), int(t.n_bytes)))
            if t.data_offset + t.n_bytes > self.size:
                raise QuantToolError(f"{self.path}: tensor {t.name} ends past the end of the file; truncated download?")
        del reader

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


def _cut(text, limit=200):
    return text if len(text) <= limit else text[:limit] + "..."


class _Short(Exception):
    pass


def truncation(path, size):
    """How a GGUF file that gguf-py cannot parse ends too early ("it ends at byte N, inside ..."), or None when
    it is long enough for everything its header describes (then it is damaged some other way)."""
    with open(path, "rb") as f:
        head = f.read(min(size, 64 << 20))  # headers are small; a longer one is read only as far as this
    pos = 0

    def take(n, what):
        nonlocal pos
        if pos + n > len(head):
            raise _Short(f"it ends at byte {size}, inside {what}" if len(head) == size else None)
        pos += n
        return head[pos - n:pos]

    def number(fmt, what):
        return struct.unpack("<" + fmt, take(struct.calcsize("<" + fmt), what))[0]

    def value(vtype, what):
        if vtype in _SCALAR_SIZES:
            take(_SCALAR_SIZES[vtype], what)
        elif vtype == 8:
            take(number("Q", what), what)
        elif vtype == 9:
            item_type, count = number("I", what), number("Q", what)
            if count > size:  # every item takes at least one byte: a count no file could hold is damage
                raise _Short(None)
            if item_type in _SCALAR_SIZES:
                take(count * _SCALAR_SIZES[item_type], what)
            else:
                for _ in range(count):
                    value(item_type, what)
        else:
            raise _Short(None)  # not a type GGUF knows: damaged, not truncated

    try:
        if take(4, "the header") != b"GGUF":
            return None
        take(4, "the header")
        n_tensors, n_kv = number("Q", "the header"), number("Q", "the header")
        alignment = 32
        for _ in range(n_kv):
            key = take(number("Q", "the metadata"), "the metadata")
            vtype = number("I", "the metadata")
            if key == b"general.alignment" and vtype == 4:
                alignment = number("I", "the metadata") or 32
            else:
                value(vtype, f"the metadata value of {_cut(key.decode('utf-8', 'replace'), 80)}")
        tensors = []
        for _ in range(n_tensors):
            name = take(number("Q", "the tensor table"), "the tensor table").decode("utf-8", "replace")
            dims = [number("Q", "the tensor table") for _ in range(number("I", "the tensor table"))]
            tensors.append((name, dims, number("I", "the tensor table"), number("Q", "the tensor table")))
    except _Short as short:
        return short.args[0]
    data_start = -(-pos // alignment) * alignment
    for name, dims, raw_type, offset in tensors:
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
        except (KeyError, ValueError):
            return None
        end = data_start + offset + int(np.prod(dims, dtype=object)) // block_size * type_size
        if end > size:
            return f"it has {size} bytes, tensor {_cut(name, 80)} needs {end}"
    return None


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
