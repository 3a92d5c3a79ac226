"""Synthetic Ideogram 4 DiT files for the benchmark: the real tensor table and file layouts, random weights.

The real weights are gated, and quantizing 2 x 9.3 B float weights through quant_tools takes ~20 minutes on a
small CPU. The Q4_K file is instead built from a pool of real Q4_K blocks:

1. a pool of weights like a trained DiT's linears (Gaussian, sigma 0.02, 1 % of the input columns x 8) is
   quantized once with quant_tools' byte-exact encoder (65 536 blocks, ~1 s);
2. every quantized tensor of the file is filled with pool blocks drawn at random (Q4_K blocks are independent:
   each carries its own d / dmin, so any sequence of valid blocks is a valid tensor with the pool's statistics);
3. 1-D tensors, biases and the F16 leftovers of the recipe (input_proj, embed_image_indicator) get plausible
   float values (norm gains 1 + N(0, 0.1), biases N(0, 0.02), weights N(0, 0.02)), encoded by quant_tools;
4. the file is laid out and written by quant_tools' own planner and metadata writer (two-branch names
   `conditional_transformer.` / `unconditional_transformer.`, the `ideogram4.*` keys, the recipe JSON), so the
   loader reads it exactly like a `quantize` output. The metadata says "synthetic" where the source hashes go.

The bf16 dense build is the Q4_K file decoded (ops.dequantize, bit-exact) and rounded to bf16: the same model, so
the benchmark can check that both formats give the same velocities. It is the official folder layout
(`transformer/` + `unconditional_transformer/`, one safetensors file each + config.json), streamed tensor by
tensor so its size (18.6 GB per branch at full size) never sits in memory.

Files are cached under `cache_dir`, keyed by the config, recipe and seed; a partial file is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
from ideogram4_gguf.models.dit import Ideogram4Config
from ideogram4_gguf.ops import dequantize, open_gguf

# Bump when the bytes a given key produces change, so stale caches are not reused.
FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("IDEOGRAM4_BENCH_CACHE", Path.home() / ".cache" / "ideogram4_gguf" / "bench"))

PRESETS = {
    # the published model (docs/spec.md §2.1)
    "full": Ideogram4Config(),
    # full width, 2 blocks: the real GEMM and dequant shapes at a size a CPU can step in seconds
    "reduced": dataclasses.replace(Ideogram4Config(), num_layers=2),
    # CI: every row length still a multiple of 256 (Q4_K blocks), head_dim 128 fits mrope (24, 20, 20)
    "tiny": Ideogram4Config(hidden_size=256, num_layers=2, num_heads=2, head_dim=128, intermediate_size=768,
                            adaln_dim=256, in_channels=128, llm_features_dim=512),
}

POOL_BLOCKS = 1 << 16
WEIGHT_SIGMA = 0.02
OUTLIER_FRACTION, OUTLIER_SCALE = 0.01, 8.0
FILL_BLOCKS = 1 << 18  # blocks gathered per write (38 MB of Q4_K)
SAFETENSORS_ALIGN = 8


def log_default(line: str) -> None:
    print(line, flush=True)


def cache_key(config: Ideogram4Config, recipe: str, seed: int) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    text = json.dumps({"config": fields, "recipe": recipe, "seed": seed, "v": FORMAT_VERSION}, sort_keys=True,
                      default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def parameter_count(config: Ideogram4Config, with_text: bool) -> int:
    return sum(math.prod(shape) for shape in tensor_shapes(config, with_text).values())


def tensor_shapes(config: Ideogram4Config, with_text: bool = True) -> dict[str, tuple[int, ...]]:
    """Official name -> shape of one branch, in file order (quant_tools' table; uncond without llm_cond_*)."""
    return config.tensor_shapes(with_text)


# ---------------------------------------------------------------------------------------------------------------
# Q4_K (or any quant_tools recipe) two-branch GGUF


def q4_k_gguf(config: Ideogram4Config, cache_dir=DEFAULT_CACHE_DIR, recipe: str = "q4_k", seed: int = 0,
              preset: str = "custom", log=log_default) -> dict:
    """Path of the cached synthetic two-branch GGUF for `config`, built first when absent.

    Returns {"path", "bytes", "cached", "build_s"}."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"ideogram4-synthetic-{preset}-{recipe}-{cache_key(config, recipe, seed)}.gguf"
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "cached": True, "build_s": None}
    started = time.perf_counter()
    _write_gguf(config, path, recipe, seed, log)
    return {"path": str(path), "bytes": path.stat().st_size, "cached": False,
            "build_s": time.perf_counter() - started}


class _SyntheticTensor:
    """What quant_tools' planner needs of a source tensor: its shape."""

    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)
        self.storage = "synthetic"


def _write_gguf(config: Ideogram4Config, path: Path, recipe_name: str, seed: int, log) -> None:
    import gguf
    from ideogram4_gguf.quant_tools import build
    from ideogram4_gguf.quant_tools.recipe import Recipe
    from ideogram4_gguf.quant_tools.sources import BranchSource

    recipe = Recipe.load(recipe_name)
    branches = [
        BranchSource(role, Path("synthetic"), "synthetic random weights (bench/synthetic.py)", [],
                     {name: _SyntheticTensor(name, shape) for name, shape in config.tensor_shapes().items()},
                     config=config, naming="official fused names")
        for role in ("conditional", "unconditional")
    ]
    planned = build.plan(branches, recipe)
    total = sum(t.nbytes for t in planned)
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 30):
        raise OSError(f"not enough disk space in {path.parent} for the synthetic GGUF: {total / 1e9:.2f} GB needed, "
                      f"{free / 1e9:.2f} GB free")
    log(f"building synthetic {recipe_name} GGUF ({total / 1e9:.2f} GB, {len(planned)} tensors) -> {path}")
    rng = np.random.default_rng(seed)
    pools = {}
    temp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(temp, build.ARCH)
    try:
        build._add_metadata(writer, branches, recipe, False, ["synthetic/random-weights"])
        for t in planned:
            byte_shape = (t.numel // t.shape[-1], t.shape[-1] // t.qtype.block_size * t.qtype.type_size)
            writer.add_tensor_info(t.out_name, byte_shape[1:] if len(t.shape) == 1 else byte_shape,
                                   np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        build._pad(fout, writer.data_alignment)
        for t in planned:
            for chunk in _tensor_bytes(t, rng, pools):
                fout.write(memoryview(chunk).cast("B"))
            build._pad(fout, writer.data_alignment)
        fout.flush()
        writer.close()
        os.replace(temp, path)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise


def _pool(qtype, rng, blocks: int) -> np.ndarray:
    """(blocks, type_size) blocks quantized by quant_tools from Gaussian + outlier-column weights."""
    from ideogram4_gguf.quant_tools.quants import quantize

    cols = 4096
    rows = -(-blocks * qtype.block_size // cols)
    weights = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(WEIGHT_SIGMA)
    outliers = rng.choice(cols, int(cols * OUTLIER_FRACTION), replace=False)
    weights[:, outliers] *= np.float32(OUTLIER_SCALE)
    return quantize(weights, qtype).reshape(-1, qtype.type_size)


def _float_values(name: str, shape, rng) -> np.ndarray:
    if len(shape) == 1 and "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (WEIGHT_SIGMA * rng.standard_normal(shape)).astype(np.float32)


def _tensor_bytes(t, rng, pools):
    """The stored bytes of one planned tensor, in chunks."""
    from ideogram4_gguf.quant_tools.quants import quantize

    name = t.out_name.split(".", 1)[1]
    if not t.qtype.is_quantized:
        values = _float_values(name, t.shape, rng).reshape(-1, t.shape[-1])
        yield quantize(values, t.qtype)
        return
    n_blocks = t.numel // t.qtype.block_size
    if t.qtype.name not in pools:
        # a tiny model needs no 65 k-block pool (CI builds it in a fraction of a second)
        pools[t.qtype.name] = _pool(t.qtype, rng, min(POOL_BLOCKS, max(4096, n_blocks)))
    pool = pools[t.qtype.name]
    for start in range(0, n_blocks, FILL_BLOCKS):
        count = min(FILL_BLOCKS, n_blocks - start)
        yield pool[rng.integers(0, len(pool), count)]


# ---------------------------------------------------------------------------------------------------------------
# bf16 dense: the GGUF decoded, official folder layout


def bf16_folder_bytes(config: Ideogram4Config) -> int:
    return 2 * 2 * parameter_count(config, with_text=True)


def bf16_folder(gguf_path, config: Ideogram4Config, cache_dir=DEFAULT_CACHE_DIR, log=log_default) -> dict:
    """The bf16 official-layout folder decoded from `gguf_path`; built when absent and the disk allows.

    Returns {"path", "bytes", "cached", "build_s"} or {"skipped": reason}."""
    gguf_path = Path(gguf_path)
    folder = Path(cache_dir) / gguf_path.stem.replace("-q4_k-", "-bf16-")
    marker = folder / "complete.json"
    needed = bf16_folder_bytes(config)
    if marker.is_file():
        return {"path": str(folder), "bytes": needed, "cached": True, "build_s": None}
    free = shutil.disk_usage(Path(cache_dir)).free
    if free < needed + (2 << 30):
        return {"skipped": f"bf16 dense needs {needed / 1e9:.1f} GB of disk in {cache_dir}, "
                           f"{free / 1e9:.1f} GB free"}
    started = time.perf_counter()
    log(f"building bf16 dense folder ({needed / 1e9:.2f} GB) from {gguf_path.name} -> {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    gguf = open_gguf(gguf_path)
    try:
        for prefix, sub in (("conditional_transformer.", "transformer"),
                            ("unconditional_transformer.", "unconditional_transformer")):
            (folder / sub).mkdir(parents=True)
            tensors = {n[len(prefix):]: t for n, t in gguf.tensors.items() if n.startswith(prefix)}
            _write_safetensors_bf16(folder / sub / "diffusion_pytorch_model.safetensors", tensors)
            (folder / sub / "config.json").write_text(_diffusers_config(config))
    finally:
        gguf.close()
    marker.write_text(json.dumps({"from": gguf_path.name}))
    return {"path": str(folder), "bytes": needed, "cached": False, "build_s": time.perf_counter() - started}


def _diffusers_config(config: Ideogram4Config) -> str:
    return json.dumps({
        "_class_name": "Ideogram4Transformer2DModel", "in_channels": config.in_channels,
        "num_layers": config.num_layers, "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
        "adaln_dim": config.adaln_dim, "llm_features_dim": config.llm_features_dim,
        "rope_theta": config.rope_theta, "mrope_section": list(config.mrope_section), "norm_eps": config.norm_eps,
    }, indent=1)


def _write_safetensors_bf16(path: Path, tensors: dict) -> None:
    """safetensors file written tensor by tensor: header (8-byte little-endian length + JSON), then the data."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = 2 * math.prod(t.shape)
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % SAFETENSORS_ALIGN)
    temp = path.with_name(path.name + ".partial")
    with open(temp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            dense = dequantize(t.raw, t.qtype, t.shape, torch.bfloat16)  # fp32 decode, one rounding to bf16
            f.write(dense.contiguous().view(torch.uint8).numpy())
    os.replace(temp, path)
