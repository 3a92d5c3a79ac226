"""A small safetensors reader that numpy alone can use: float8 (e4m3fn, e5m2), bfloat16, float16, float32.

The `safetensors` package hands numpy no float8 or bfloat16, so the header is parsed here (8-byte
little-endian length + JSON; every tensor is a byte range after the header) and tensors are read as row ranges
with positional reads into fresh numpy buffers. Positional reads rather than a long-lived memory map keep the
resident memory bounded: every page of a mapped 9 GB source that the quantizer touches would count in the
process RSS until the kernel reclaims it, while read() data lives only as long as the chunk being quantized.
"""

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QuantToolError

F32 = np.float32


def _float8_table(exponent_bits, mantissa_bits, finite_only):
    """float32 value of each of the 256 float8 bit patterns (sign | exponent | mantissa)."""
    bias = (1 << (exponent_bits - 1)) - 1
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = codes & ((1 << mantissa_bits) - 1)
    subnormal = mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
    normal = (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
    value = sign * np.where(exponent == 0, subnormal, normal)
    top = exponent == (1 << exponent_bits) - 1
    if finite_only:  # e4m3fn: no inf; only S.1111.111 is nan
        value = np.where(top & (mantissa == (1 << mantissa_bits) - 1), np.nan, value)
    else:  # e5m2: IEEE-like inf and nan
        value = np.where(top, np.where(mantissa == 0, sign * np.inf, np.nan), value)
    return value.astype(F32)


_TABLES = {}


def _table(name):
    if name not in _TABLES:
        _TABLES[name] = _float8_table(4, 3, True) if name == "F8_E4M3" else _float8_table(5, 2, False)
    return _TABLES[name]


def _bf16_to_f32(raw):
    return (raw.astype(np.uint32) << 16).view(F32)


# safetensors dtype -> (numpy storage dtype, decoder to float32)
DTYPES = {
    "F32": (np.dtype("<f4"), lambda raw: raw.astype(F32, copy=False)),
    "F16": (np.dtype("<f2"), lambda raw: raw.astype(F32)),
    "BF16": (np.dtype("<u2"), _bf16_to_f32),
    "F8_E4M3": (np.dtype("u1"), lambda raw: _table("F8_E4M3")[raw]),
    "F8_E5M2": (np.dtype("u1"), lambda raw: _table("F8_E5M2")[raw]),
    "F64": (np.dtype("<f8"), lambda raw: raw.astype(F32)),
}

_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple
    begin: int  # absolute file offsets
    end: int

    @property
    def numel(self):
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class SafetensorsFile:
    """Header of one .safetensors file plus row-range reads. Raises QuantToolError for a malformed file."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise QuantToolError(f"{self.path}: no such file")
        self.size = self.path.stat().st_size
        self._file = open(self.path, "rb", buffering=0)
        self._lock = threading.Lock()
        header_len = int.from_bytes(self._read_at(0, 8), "little") if self.size >= 8 else -1
        if header_len < 2 or 8 + header_len > self.size:
            self.close()
            raise QuantToolError(f"{self.path}: not a safetensors file (bad header length); is it truncated?")
        try:
            header = json.loads(self._read_at(8, header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.close()
            raise QuantToolError(f"{self.path}: not a safetensors file (header is not JSON: {exc})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {}
        data_start = 8 + header_len
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, data_start)

    def _entry(self, name, info, data_start):
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QuantToolError(f"{self.path}: malformed header entry for {name!r}") from None
        entry = Entry(name, dtype, shape, data_start + int(begin), data_start + int(end))
        itemsize = DTYPES[dtype][0].itemsize if dtype in DTYPES else _SIZES.get(dtype)
        if itemsize is not None and entry.end - entry.begin != entry.numel * itemsize:
            raise QuantToolError(f"{self.path}: tensor {name!r} has {entry.end - entry.begin} bytes for shape {shape}")
        if entry.end > self.size:
            raise QuantToolError(f"{self.path}: tensor {name!r} ends past the end of the file; the file is truncated")
        return entry

    def _read_at(self, offset, count):
        with self._lock:
            self._file.seek(offset)
            return self._file.read(count)

    def _read_into(self, offset, buffer):
        view = memoryview(buffer).cast("B")
        with self._lock:
            self._file.seek(offset)
            done = 0
            while done < len(view):
                got = self._file.readinto(view[done:])
                if not got:
                    raise QuantToolError(f"{self.path}: unexpected end of file at byte {offset + done}")
                done += got

    def keys(self):
        return self.entries.keys()

    def read_raw(self, name, row_start=0, row_stop=None):
        """Stored elements of rows [row_start, row_stop) along the first axis, in the storage dtype."""
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            raise QuantToolError(
                f"{self.path}: tensor {name!r} is stored as {entry.dtype}, a format quant_tools does not read "
                "(it reads float8 e4m3fn/e5m2 with optional weight_scale, bf16, fp16, fp32); use the official fp8 "
                "or a bf16 release of the weights"
            )
        storage = DTYPES[entry.dtype][0]
        shape = entry.shape or (1,)
        rows = shape[0]
        row_stop = rows if row_stop is None else min(row_stop, rows)
        per_row = int(np.prod(shape[1:], dtype=np.int64))
        out = np.empty((row_stop - row_start,) + tuple(shape[1:]), storage)
        if out.size:
            self._read_into(entry.begin + row_start * per_row * storage.itemsize, out)
        return out if entry.shape else out.reshape(())

    def read_f32(self, name, row_start=0, row_stop=None):
        """float32 values of rows [row_start, row_stop)."""
        dtype = self.entries[name].dtype
        raw = self.read_raw(name, row_start, row_stop)
        return DTYPES[dtype][1](raw)

    def close(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __repr__(self):
        return f"<SafetensorsFile {self.path} ({len(self.entries)} tensors)>"


def open_many(paths):
    """SafetensorsFile for each path, opened once even if listed twice."""
    seen = {}
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen[key] = SafetensorsFile(path)
    return list(seen.values())
