"""quant_tools: rebuild Ideogram 4 GGUF files (Q4_K and other mixes) from the official weights.

Standalone on purpose: numpy, gguf, safetensors and tqdm only (no torch, no import from the rest of the pack),
so it runs as `python -m quant_tools ...` from the repository root as well as `ideogram4_gguf.quant_tools`. The
reverse holds: the pack's runtime imports two of its modules, `layout` (the Ideogram 4 DiT layout: config, tensor
table, names, QKV fusion) and `gguf_file` (the validated GGUF reader), so that each fact is written once.

    from quant_tools import quantize, dequantize
    packed = quantize(weights_f32, "Q4_K")          # uint8 (rows, n // 256 * 144), byte-identical to ggml
    weights = dequantize(packed, "Q4_K", n)          # float32 (rows, n), bit-identical to gguf-py

Importing this package is cheap: the submodules load on first use.
"""

__version__ = "0.1.0"

__all__ = ["QuantToolError", "__version__", "dequantize", "quantize"]


def __getattr__(name):
    if name in ("quantize", "dequantize"):
        from . import quants

        return getattr(quants, name)
    if name == "QuantToolError":
        from .errors import QuantToolError

        return QuantToolError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
