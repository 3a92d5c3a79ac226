"""Read a GGUF file for `inspect` and `verify`: metadata and tensor table through gguf-py, bytes by row range.

gguf-py's GGUFReader parses the header; the tensor bytes are then read with positional reads, row chunk by row
chunk, so that checking a 10 GB file keeps the resident memory small (a memory-mapped view would pull every
page it touches into the process RSS).
"""

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
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError ... on bad files
            raise QuantToolError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.size = self.path.stat().st_size
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
