"""Build the Qwen3 text encoder from whichever Qwen3-VL-8B file the user has.

| layout | where it comes from | tensor names |
|---|---|---|
| official fp8 | `ideogram-ai/ideogram-4-fp8` `text_encoder/` (one file or sharded), fp8 e4m3 + per-row `weight_scale` | `language_model.*` (+ `visual.*`) |
| transformers bf16 | `Qwen/Qwen3-VL-8B-Instruct` shards | `model.language_model.*`, `lm_head.weight` (+ `model.visual.*`) |
| ComfyUI single file | `qwen3vl_8b_fp8_scaled.safetensors` (fp8 + per-tensor `weight_scale` or old `scale_weight`), bf16 variants | `model.language_model.*` (Qwen3-VL) or `model.*` (Qwen3-8B layout) |
| llama.cpp GGUF | `Qwen3-VL-8B-Instruct-Q4_K_M.gguf` etc. (any type `ops.dequantize` reads) | `token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` |

Every layout is mapped onto the names of transformers' `Qwen3VLTextModel` (prefix stripped) and read through
`ops` (GGUF blocks stay packed in `QuantLinear`, fp8 stays fp8 in `Fp8Linear`). Vision tensors are never
read. The sizes come from the tensor shapes; RoPE theta and the norm epsilon from GGUF metadata or a
`config.json` beside the weights, else Qwen3-VL's values. Every value read from the file is checked (type,
range, and every tensor's shape against the model the sizes describe) before the encoder is built, and every
failure is one `ModelFileError` line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFileError, quote
from ..ops import dequantize, open_weights
from ..ops.weights import FP8_STORAGE, WeightSource
from .text_encoder import Qwen3TextConfig, Qwen3TextEncoder

logger = logging.getLogger(__name__)

QWEN3_VL_ROPE_THETA = 5_000_000.0  # Qwen3-VL text config (plain Qwen3-8B uses 1e6)

# llama.cpp tensor names -> transformers names (source: gguf-py 0.19 constants.py TENSOR_NAMES / MODEL_ARCH
# QWEN3VL, and llama.cpp convert_hf_to_gguf.py: Qwen2/Qwen3 q/k rows are stored unpermuted (NEOX rope)).
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d{1,6})\.(\w+)\.weight")  # a longer index is no layer of any model
_LAYER_NAME = re.compile(r"layers\.(\d{1,6})\.(.+)")
# Bounds of what the shapes and metadata may say: far beyond Qwen3-VL-8B (docs/spec.md §4.1), far below what
# would fail to build.
MAX_SIZE = 1 << 20
MAX_LAYERS = 1024

# Key prefixes of the text model in the safetensors layouts, most specific first.
TEXT_PREFIXES = ("language_model.", "model.language_model.", "model.", "text_model.", "")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")

# Tensors that identify files people pick by mistake.
_WRONG_FILES = (
    ("embed_image_indicator.weight", "an Ideogram 4 DiT (diffusion model)"),
    ("layers.0.attention.qkv.weight", "an Ideogram 4 DiT (diffusion model)"),
    ("decoder.conv_in.weight", "a VAE"),
    ("encoder.conv_in.weight", "a VAE"),
    ("mm.0.weight", "a vision projector (mmproj)"),
    ("v.patch_embd.weight", "a vision projector (mmproj)"),
)


def llama_cpp_name(name: str) -> str:
    """transformers text-model name -> llama.cpp GGUF name (the inverse of the table above)."""
    for gguf_name, ours in GGUF_GLOBAL_NAMES.items():
        if name == ours:
            return gguf_name
    layer, _, rest = name.removeprefix("layers.").partition(".")
    for gguf_block, ours in GGUF_BLOCK_NAMES.items():
        if rest == f"{ours}.weight":
            return f"blk.{layer}.{gguf_block}.weight"
    raise KeyError(f"{name!r} has no llama.cpp name")


def _from_llama_cpp(name: str) -> str | None:
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    match = _GGUF_BLOCK.fullmatch(name)
    if match and match.group(2) in GGUF_BLOCK_NAMES:
        return f"layers.{match.group(1)}.{GGUF_BLOCK_NAMES[match.group(2)]}.weight"
    return None


def _describe_wrong_file(source: WeightSource) -> str:
    keys = source.keys()
    for marker, what in _WRONG_FILES:
        if any(k == marker or k.endswith("." + marker) for k in keys):
            return f"it looks like {what}"
    sample = ", ".join(quote(k, 60) for k in sorted(keys)[:4]) or "no tensors"
    return f"found {len(keys)} tensors such as {sample}"


def text_model_view(source: WeightSource) -> tuple[WeightSource, str]:
    """The text-model tensors of `source` under transformers' `Qwen3VLTextModel` names, and the layout name."""
    keys = set(source.keys())
    if "token_embd.weight" in keys or any(k.startswith("blk.0.") for k in keys):
        source, layout = source.renamed(_from_llama_cpp), "llama.cpp GGUF"
        keys = set(source.keys())
    else:
        layout = None
    for prefix in TEXT_PREFIXES:
        if f"{prefix}layers.0.self_attn.q_proj.weight" in keys and f"{prefix}embed_tokens.weight" in keys:
            view = source.with_prefix(prefix) if prefix else source
            return view, layout or {"language_model.": "official (Qwen3VLModel)",
                                    "model.language_model.": "transformers Qwen3-VL"}.get(prefix, f"'{prefix}*'")
    raise ModelFileError(
        f"{source.describe()}: not a Qwen3-VL-8B text encoder ({_describe_wrong_file(source)}). Pick the "
        "official text_encoder/ folder, Qwen3-VL-8B-Instruct safetensors, ComfyUI's qwen3vl_8b_*.safetensors, or "
        "a llama.cpp Qwen3-VL-8B GGUF."
    )


def _config_json_beside(path) -> dict:
    paths = path if isinstance(path, (list, tuple)) else [path]
    for p in paths:
        p = Path(p)
        folder = p if p.is_dir() else p.parent
        candidate = folder / "config.json"
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, ValueError):
                logger.warning("Ignoring unreadable %s", candidate)
                continue
            if isinstance(config, dict):
                return config
            logger.warning("Ignoring %s: not a JSON object", candidate)
    return {}


def _real(value, where: str, low: float, high: float, typical: str) -> float:
    """A finite number in (low, high) read from a file; a ModelFileError naming `where` otherwise."""
    if (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and low < value < high):
        return float(value)
    raise ModelFileError(f"{where} is {quote(value)}; expected a number between {low:g} and {high:g} ({typical}). "
                         "The file's settings are damaged: download it again.")


def _hyperparameters(view: WeightSource, path) -> tuple[float, float]:
    """(rope_theta, rms_norm_eps) from GGUF metadata or config.json; Qwen3-VL's values otherwise."""
    metadata = getattr(view, "metadata", {}) or {}
    where = view.describe()
    arch = metadata.get("general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise ModelFileError(f"{where}: its metadata general.architecture is {quote(arch)}, not a name; the file is "
                             "damaged: download it again.")
    if arch:
        theta_key, eps_key = f"{arch}.rope.freq_base", f"{arch}.attention.layer_norm_rms_epsilon"
        theta = _real(metadata.get(theta_key, QWEN3_VL_ROPE_THETA), f"{where}: its metadata {quote(theta_key)}",
                      1, 1e12, "Qwen3-VL uses 5e6")
        eps = _real(metadata.get(eps_key, 1e-6), f"{where}: its metadata {quote(eps_key)}", 0, 1,
                    "Qwen3-VL uses 1e-6")
        return theta, eps
    config = _config_json_beside(path)
    if config and ("text_config" in config or "vocab_size" in config):
        try:
            hf = Qwen3TextConfig.from_hf_config(config)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            raise ModelFileError(f"{where}: the config.json beside it is not a Qwen3 config ({quote(str(exc))}); "
                                 "remove it or download it again.") from exc
        return (_real(hf.rope_theta, f"{where}: config.json rope_theta", 1, 1e12, "Qwen3-VL uses 5e6"),
                _real(hf.rms_norm_eps, f"{where}: config.json rms_norm_eps", 0, 1, "Qwen3-VL uses 1e-6"))
    return QWEN3_VL_ROPE_THETA, 1e-6


# The tensors of layer 0 the sizes are read from (name, rank).
SHAPE_TENSORS = (("embed_tokens.weight", 2), ("layers.0.self_attn.q_norm.weight", 1),
                 ("layers.0.self_attn.q_proj.weight", 2), ("layers.0.self_attn.k_proj.weight", 2),
                 ("layers.0.mlp.gate_proj.weight", 2), ("layers.0.input_layernorm.weight", 1))


def config_from_weights(view: WeightSource, path=None) -> Qwen3TextConfig:
    """Decoder sizes read off the tensor shapes (works for any width, from tiny test models to 8B)."""
    where = view.describe()
    keys = set(view.keys())
    if "layers.0.self_attn.q_norm.weight" not in keys:
        hint = " It has q/k/v biases, so it is a Qwen2 / Qwen2.5 model." if "layers.0.self_attn.k_proj.bias" in keys \
            else ""
        raise ModelFileError(f"{where}: the text model has no q_norm/k_norm, so it is not Qwen3.{hint} Ideogram 4 "
                             "needs the Qwen3-VL-8B text encoder.")
    missing = [name for name, _ in SHAPE_TENSORS if name not in keys]
    if missing:
        raise ModelFileError(f"{where}: the text-encoder tensors {', '.join(missing)} are missing; the file is "
                             "incomplete or not a Qwen3 text encoder.")
    shapes = {name: tuple(view.shape(name)) for name, _ in SHAPE_TENSORS}
    for name, rank in SHAPE_TENSORS:
        if len(shapes[name]) != rank or 0 in shapes[name] or max(shapes[name]) > MAX_SIZE:
            raise ModelFileError(f"{where}: {name} has shape {shapes[name]}, expected {rank} dimension(s) from 1 to "
                                 f"{MAX_SIZE}; the file is corrupt or not a Qwen3 text encoder.")
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    q_rows, k_rows = shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0]
    if head_dim % 2 or q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % (k_rows // head_dim):
        raise ModelFileError(f"{where}: the attention shapes do not fit together (q_proj {q_rows} rows, k_proj "
                             f"{k_rows} rows, head size {head_dim}); the file is corrupt or not a Qwen3 text encoder.")
    layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER_NAME.fullmatch(k))
                     and m.group(2) == "input_layernorm.weight"})
    if layers != list(range(len(layers))) or len(layers) > MAX_LAYERS:
        gap = next((i for i, n in enumerate(layers) if i != n), len(layers))
        raise ModelFileError(f"{where}: the decoder layers are not numbered 0 .. n-1 (layer {gap} is missing among "
                             f"{len(layers)}); the file is incomplete or corrupt.")
    theta, eps = _hyperparameters(view, path)
    return Qwen3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_layers=len(layers),
        num_heads=q_rows // head_dim,
        num_kv_heads=k_rows // head_dim,
        head_dim=head_dim,
        rope_theta=theta,
        rms_norm_eps=eps,
    )


def _check_shapes(view: WeightSource, encoder: nn.Module, where: str) -> None:
    """Every tensor the encoder reads, against the shape the config gives it (before a byte is loaded)."""
    absent, wrong = [], []
    for name, param in encoder.named_parameters():
        if name not in view:
            absent.append(name)
        elif tuple(view.shape(name)) != tuple(param.shape):
            wrong.append((name, tuple(view.shape(name)), tuple(param.shape)))
    if absent:
        raise ModelFileError(f"{where}: {len(absent)} text-encoder tensor(s) are missing (e.g. "
                             f"{', '.join(absent[:4])}); the file is incomplete or a different model.")
    if wrong:
        name, got, want = wrong[0]
        raise ModelFileError(f"{where}: {len(wrong)} tensor(s) do not have the shape this model needs (e.g. {name} is "
                             f"{got}, expected {want}); the file is corrupt or a different model.")


class QuantizedEmbedding(nn.Module):
    """Embedding table kept as GGUF packed rows; a lookup dequantizes only the rows of the given ids.

    A GGUF row is whole blocks (hidden % block size == 0), so gathering rows gathers their blocks.
    Output is float32 (exact decode); the encoder rounds it once to the compute dtype.
    """

    def __init__(self, packed: torch.Tensor, qtype, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim
        self.register_buffer("packed", packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.packed.index_select(0, ids.reshape(-1))
        return dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim), torch.float32)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, storage={self.qtype.name}"


class DenseEmbedding(nn.Module):
    """Embedding table in its stored dtype (a zero-copy file mapping when it can be); rows are cast later."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, ids.reshape(-1))


def _embedding(view: WeightSource, device, compute_dtype) -> nn.Module:
    name = "embed_tokens.weight"
    packed = view.packed(name)
    if packed is not None:
        qtype, raw = packed
        vocab, hidden = view.shape(name)
        return QuantizedEmbedding(raw.to(device), qtype, vocab, hidden)
    if view.storage(name) == FP8_STORAGE:
        # Scaled fp8 table: expanded once into the compute dtype (as big as a bf16 table, never float32).
        return DenseEmbedding(view.tensor(name, compute_dtype, device))
    # Float tables keep their stored dtype (a zero-copy mapping for GGUF); rows are rounded after lookup.
    return DenseEmbedding(view.tensor(name, None, device))


def source_stored_bytes(view: WeightSource, names) -> int:
    """Bytes the named tensors occupy in their stored form (what `QuantLinear`/`Fp8Linear` keep)."""
    return sum(view.stored_nbytes(name) for name in names)


def _auto_embed_device(view: WeightSource, num_layers: int, device) -> str | torch.device:
    """The CPU when the layers plus the embedding would not fit in the GPU's free memory (with 1 GiB spare for
    activations and the text features), else `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    layers = [k for k in view.keys() if (m := _LAYER_NAME.fullmatch(k)) and int(m.group(1)) < num_layers]
    needed = source_stored_bytes(view, layers + ["embed_tokens.weight"]) + (1 << 30)
    return "cpu" if needed > free else device


def load_text_encoder(
    path,
    compute_dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    embed_device=None,
    for_generation: bool = False,
    expected_feature_dim: int | None = None,
    kernel: str = "auto",
) -> Qwen3TextEncoder:
    """Load the Qwen3-VL-8B text encoder from `path` (a file, a folder, a `*.safetensors.index.json`, an
    official base-model folder with `text_encoder/`, or a list of files).

    embed_device: where the embedding table lives (default: `device`; "cpu" saves 0.35-1.24 GB of GPU memory,
    lookups then run on the CPU and only the activations move; "auto": the CPU when the GPU's free memory is
    short of the encoder's stored size + 1 GiB). for_generation: build every layer and the final norm (prompt
    upsampling). expected_feature_dim: the DiT's text feature size (53248) to reject a model of another width.
    """
    if isinstance(path, (str, os.PathLike)) and Path(path, "text_encoder").is_dir():
        path = Path(path, "text_encoder")
    source = open_weights(path)
    view, layout = text_model_view(source)
    config = config_from_weights(view, path)
    where = source.describe()
    if config.num_layers < config.layers_for_taps:
        raise ModelFileError(
            f"{where}: the text model has {config.num_layers} layers; Ideogram 4 reads layer "
            f"{max(config.tap_layers)}, so it needs the 36-layer Qwen3-VL-8B (a 2B/4B/other model will not do).")
    if expected_feature_dim is not None and config.feature_dim != expected_feature_dim:
        raise ModelFileError(
            f"{where}: hidden size {config.hidden_size} gives {config.feature_dim} text features, the DiT expects "
            f"{expected_feature_dim} (13 x 4096, Qwen3-VL-8B). Qwen3-VL-4B and others do not fit.")
    _check_storage(view, where)
    if config.rope_theta != QWEN3_VL_ROPE_THETA:
        logger.warning("%s: RoPE theta is %g, Qwen3-VL uses %g; is this plain Qwen3 rather than Qwen3-VL?",
                       where, config.rope_theta, QWEN3_VL_ROPE_THETA)
    logger.info("Text encoder from %s (%s layout, %d layers, hidden %d, embedding %s)", where, layout,
                config.num_layers, config.hidden_size, view.storage("embed_tokens.weight"))

    num_layers = config.num_layers if for_generation else config.layers_for_taps
    if for_generation and "norm.weight" not in view:
        raise ModelFileError(f"{where}: no final norm (norm.weight / output_norm.weight); cannot generate text.")
    encoder = Qwen3TextEncoder(config, num_layers=num_layers, final_norm=for_generation, dtype=compute_dtype,
                               device="meta")
    _check_shapes(view, encoder, where)
    if embed_device == "auto":
        embed_device = _auto_embed_device(view, num_layers, device)
    encoder.embed_tokens = _embedding(view, embed_device if embed_device is not None else device, compute_dtype)
    for i, layer in enumerate(encoder.layers):
        for name in LINEARS:
            parent, attr = _parent(layer, name)
            setattr(parent, attr, view.linear(f"layers.{i}.{name}", compute_dtype, device, kernel))
        for name in NORMS:
            parent, attr = _parent(layer, name)
            getattr(parent, attr).weight = _norm_weight(view, f"layers.{i}.{name}.weight", compute_dtype, device)
    if encoder.norm is not None:
        encoder.norm.weight = _norm_weight(view, "norm.weight", compute_dtype, device)
    encoder.source_path, encoder.layout = where, layout
    # A GGUF's tokenizer, kept so the caller can build it without parsing the file's metadata again
    # (`tokenizer_from_gguf_metadata`); parsing a 152 k-token vocabulary takes ~0.2 s.
    metadata = getattr(view, "metadata", {}) or {}
    encoder.tokenizer_metadata = {k: v for k, v in metadata.items() if k.startswith("tokenizer.ggml.")}
    return encoder.eval()


DENSE_STORAGE = ("F32", "F16", "BF16", "F8_E4M3")


def _check_storage(view: WeightSource, where: str) -> None:
    """Reject weight formats `ops` cannot run (e.g. ComfyUI's NVFP4 or int8 files) before building anything."""
    name = "layers.0.self_attn.q_proj.weight"
    storage = view.storage(name)
    if view.packed(name) is not None or storage in DENSE_STORAGE:
        return
    keys = view.keys()
    what = "NVFP4 (e.g. ComfyUI's qwen3vl_8b_nvfp4)" if any(k.endswith("weight_scale_2") for k in keys) \
        else f"{storage} tensors"
    raise ModelFileError(f"{where}: the linear weights are stored as {what}, which this pack cannot run. Use the "
                         "fp8 / bf16 safetensors or a GGUF (Q4_K_M, Q6_K, Q8_0, ...) of Qwen3-VL-8B.")


def _parent(module: nn.Module, dotted: str):
    *path, attr = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def _norm_weight(view: WeightSource, name: str, dtype, device) -> nn.Parameter:
    return nn.Parameter(view.tensor(name, dtype, device), requires_grad=False)


# Names an lm_head carries in the files users have (transformers checkpoints, ComfyUI's prefixing, diffusers'
# `prompt_enhancer_head` component, llama.cpp GGUFs).
LM_HEAD_NAMES = ("lm_head", "model.lm_head", "output", "prompt_enhancer_head.lm_head")


def load_lm_head(path, encoder: Qwen3TextEncoder, kernel: str = "auto") -> nn.Module:
    """The language-model head for prompt upsampling, from a file or folder the user supplies (the text
    encoder's own file when it carries one: Qwen3-VL-8B-Instruct shards, llama.cpp GGUFs), matched to
    `encoder`'s width, vocabulary, compute dtype and device."""
    source = open_weights(path)
    keys = set(source.keys())
    prefix = next((p for p in LM_HEAD_NAMES if f"{p}.weight" in keys), None)
    if prefix is None:
        raise ModelFileError(
            f"{source.describe()}: no lm_head found (looked for {', '.join(p + '.weight' for p in LM_HEAD_NAMES)}). "
            "Use the Qwen3-VL-8B-Instruct checkpoint, diffusers/qwen3-vl-8b-instruct-lm-head, or a Qwen3-VL GGUF.")
    config = encoder.config
    shape = source.shape(f"{prefix}.weight")
    if tuple(shape) != (config.vocab_size, config.hidden_size):
        raise ModelFileError(
            f"{source.describe()}: {prefix}.weight has shape {tuple(shape)}, the text encoder needs "
            f"({config.vocab_size}, {config.hidden_size}). The head must come from Qwen3-VL-8B.")
    return source.linear(prefix, encoder.compute_dtype, encoder.device, kernel).eval()
