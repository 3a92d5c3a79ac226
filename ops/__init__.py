"""The dequant ops module: GGUF container, dequant kernels, stored-form Linear layers, weight sources.

Contract for the model loaders: docs/ARCHITECTURE.md ("The ops contract").
"""

from .dequant import block_layout, dequantize, packed_shape, supported_qtypes
from .linear import KERNELS, Fp8Linear, QuantLinear, StoredWeight, dequantize_packed, fp8_dense
from .weights import (FP8_STORAGE, CombinedSource, GGUFFile, GGUFSource, GGUFTensor, SafetensorsSource,
                      StateDictSource, WeightSource, open_gguf, open_weights)

__all__ = [
    "open_gguf", "GGUFFile", "GGUFTensor",
    "dequantize", "block_layout", "packed_shape", "supported_qtypes",
    "QuantLinear", "Fp8Linear", "StoredWeight", "KERNELS", "dequantize_packed", "fp8_dense",
    "WeightSource", "GGUFSource", "SafetensorsSource", "StateDictSource", "CombinedSource", "open_weights",
    "FP8_STORAGE",
]
