"""Test helpers shared across the test folders: llama.cpp's reference quantizer (the oracle) and a small GGUF
writer over gguf-py. Importable as `gguf_files` (tests/conftest.py puts this folder on sys.path)."""

import ctypes

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter


def ggml_quantize(weights: np.ndarray, qtype) -> np.ndarray:
    """llama.cpp `ggml_quantize_chunk` without an importance matrix (ggml-python 0.0.45, docs/spec.md §G4.6):
    (rows, n) float32 -> (rows, n // block * type_size) uint8. qtype: a GGMLQuantizationType or its name."""
    ggml = pytest.importorskip("ggml", reason="ggml-python (the reference quantizer) is not installed")
    qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    src = np.ascontiguousarray(weights, dtype=np.float32)
    rows, n = src.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    written = ggml.ggml_quantize_chunk(int(qtype), src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                       out.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None)
    assert written == out.nbytes
    return out


def write_gguf(path, tensors: dict, metadata: dict | None = None, arch: str = "ideogram4"):
    """tensors: name -> numpy array (stored in its dtype) or (qtype, packed uint8 bytes).
    metadata: key -> str | bool | int (uint32) | float (float32) | list (typed by its first item)."""
    writer = GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_array(key, list(value))
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[1], raw_dtype=value[0])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
