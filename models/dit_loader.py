"""Load the two Ideogram 4 DiT branches from any supported file layout.

- a two-branch GGUF (our quant_tools output, Transformer Lab's file): prefixes `conditional_transformer.` /
  `unconditional_transformer.`, `transformer.` / `unconditional_transformer.` or `cond.` / `uncond.`;
- a pair of single-branch GGUFs (stable-diffusion.cpp / ComfyUI-GGUF style): bare official names, no metadata;
- the official fp8 folder: `transformer/` + `unconditional_transformer/`, single or sharded safetensors, fp8 with a
  per-row `weight_scale`;
- ComfyUI single files (`ideogram4_fp8_scaled` + `ideogram4_unconditional_fp8_scaled`), optionally prefixed
  `model.diffusion_model.`;
- bf16 diffusers releases with split `attention.to_q/to_k/to_v` and `attention.to_out.0` names.

The model is recognised by its tensors (`embed_image_indicator.weight`), never by metadata alone; the config comes
from the tensor shapes, completed by `ideogram4.*` GGUF metadata or a diffusers `config.json` for the two RoPE
settings that no shape reveals.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError
from ..ops import FP8_STORAGE, StateDictSource, WeightSource, open_weights
from .dit import ARCH_TENSOR, Ideogram4Config, Ideogram4DiT, default_compute_dtype

# (conditional, unconditional) prefixes accepted inside one file, in the order they are tried.
BRANCH_PREFIX_PAIRS = (
    ("conditional_transformer.", "unconditional_transformer."),
    ("transformer.", "unconditional_transformer."),
    ("cond.", "uncond."),
)
# Prefixes of a file that holds a single branch: bare names, or a ComfyUI checkpoint prefix.
SINGLE_BRANCH_PREFIXES = ("", "model.diffusion_model.")
# The official diffusers-style release folder.
BRANCH_FOLDERS = ("transformer", "unconditional_transformer")

# What a wrong file most likely is, from a tell-tale name fragment (for the error message only).
OTHER_MODELS = (
    ("double_blocks.", "a FLUX transformer"),
    ("language_model.", "a text encoder (Qwen3-VL?)"),
    ("blk.", "a llama.cpp language model (a text encoder?)"),
    ("model.layers.", "a language model (a text encoder?)"),
    ("decoder.up", "a VAE"),
    ("encoder.down", "a VAE"),
)

# `ideogram4.<field>` GGUF metadata (our quant_tools) and diffusers `config.json` keys -> config fields.
DIFFUSERS_CONFIG_KEYS = {"rope_theta": "rope_theta", "mrope_section": "mrope_section", "norm_eps": "norm_eps"}

_SPLIT_QKV = re.compile(r"^(layers\.\d+\.attention\.)to_([qkv])\.weight$")
_SPLIT_OUT = re.compile(r"^(layers\.\d+\.attention\.)to_out\.0\.(weight)$")
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


@dataclass
class DiTLoadInfo:
    """What was loaded from where; `summary()` is one line for logs and UIs."""

    layout: str
    files: list[str]
    prefixes: tuple[str, str]
    config: Ideogram4Config
    compute_dtype: torch.dtype
    storage: dict[str, Counter] = field(default_factory=dict)  # branch -> {"Q4_K": n, "F16": n, ...}

    def summary(self) -> str:
        kinds = {branch: ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
                 for branch, counts in self.storage.items()}
        return (
            f"Ideogram 4 DiT ({self.layout}; {self.config.num_layers} layers, hidden {self.config.hidden_size}) from "
            f"{' + '.join(self.files)}; cond: {kinds.get('cond', '?')}; uncond: {kinds.get('uncond', '?')}; "
            f"compute {str(self.compute_dtype).replace('torch.', '')}"
        )


def load_dit_branches(
    path,
    uncond_path=None,
    *,
    compute_dtype: torch.dtype | None = None,
    device="cpu",
    config_overrides: dict | None = None,
    kernel: str = "auto",
) -> tuple[Ideogram4DiT, Ideogram4DiT, DiTLoadInfo]:
    """(cond_branch, uncond_branch, info) from one two-branch file/folder, or from a cond file plus `uncond_path`.

    compute_dtype: default bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on the CPU. Quantized and fp8
    weights stay packed in their Linear layers; load on the CPU and `.to(device)` later moves the packed bytes.
    config_overrides: config fields to force (e.g. `mrope_section` for a non-standard model without metadata).
    kernel: dequant kernel of the quantized Linears ("auto": fused Triton on CUDA where it has one, else torch).
    """
    device = torch.device(device)
    compute_dtype = compute_dtype or default_compute_dtype(device)
    branches = find_dit_branches(path, uncond_path, config_overrides=config_overrides)
    build = dict(compute_dtype=compute_dtype, device=device, kernel=kernel)
    cond = Ideogram4DiT.from_weights(branches.config, branches.cond, with_text=True, **build)
    uncond = Ideogram4DiT.from_weights(branches.config, branches.uncond, with_text=False, **build)
    return cond, uncond, branches.load_info(compute_dtype)


@dataclass
class DiTBranches:
    """Both branches of a DiT file (or pair) as weight sources under the official tensor names, and their config.

    What `load_dit_branches` builds our modules from, and what the ComfyUI-core loader builds core's model from."""

    cond: WeightSource
    uncond: WeightSource
    config: Ideogram4Config
    layout: str
    files: list[str]
    prefixes: tuple[str, str]
    cond_label: str
    uncond_label: str

    def load_info(self, compute_dtype: torch.dtype) -> DiTLoadInfo:
        return DiTLoadInfo(
            layout=self.layout, files=self.files, prefixes=self.prefixes, config=self.config,
            compute_dtype=compute_dtype,
            storage={"cond": _storage_counts(self.cond, True, self.config),
                     "uncond": _storage_counts(self.uncond, False, self.config)},
        )


def find_dit_branches(path, uncond_path=None, *, config_overrides: dict | None = None) -> DiTBranches:
    """Find the two branches in one two-branch file/folder, or a cond file plus `uncond_path`, and read their
    config from the tensor shapes (see `load_dit_branches`); a clear ModelFileError for anything else."""
    branches = _find_branches(path, uncond_path)
    config = _config_from_weights(branches.cond, branches.hints, config_overrides, branches.cond_label)
    uncond_config = _config_from_weights(
        branches.uncond, branches.hints, {**(config_overrides or {}), "llm_features_dim": config.llm_features_dim},
        branches.uncond_label, with_text=False,
    )
    if uncond_config != config:
        diff = [f"{f}: {getattr(config, f)} vs {getattr(uncond_config, f)}" for f in Ideogram4Config.field_names()
                if getattr(config, f) != getattr(uncond_config, f)]
        raise ModelFileError(
            f"The two DiT branches do not belong together ({branches.cond_label} vs {branches.uncond_label}: "
            f"{'; '.join(diff)}). Pick the conditional and unconditional files of the same release."
        )
    return DiTBranches(branches.cond, branches.uncond, config, branches.layout, branches.files, branches.prefixes,
                       branches.cond_label, branches.uncond_label)


# ---------------------------------------------------------------------------------------------------------------
# Finding the two branches


@dataclass
class _Branches:
    cond: object
    uncond: object
    layout: str
    files: list[str]
    prefixes: tuple[str, str]
    cond_label: str
    uncond_label: str
    hints: dict


def _find_branches(path, uncond_path) -> _Branches:
    path = Path(os.fspath(path))
    if path.is_dir() and all((path / name).is_dir() for name in BRANCH_FOLDERS):
        if uncond_path is not None:
            raise ModelFileError(
                f"{path} already holds both branches ({'/ and '.join(BRANCH_FOLDERS)}/); do not pass a separate "
                "unconditional file."
            )
        cond_dir, uncond_dir = (path / name for name in BRANCH_FOLDERS)
        cond, cond_prefix = _single_branch(open_weights(cond_dir), str(cond_dir), "conditional")
        uncond, uncond_prefix = _single_branch(open_weights(uncond_dir), str(uncond_dir), "unconditional")
        hints = _folder_config(cond_dir)
        return _Branches(cond, uncond, "official folder", [str(cond_dir), str(uncond_dir)],
                         (cond_prefix, uncond_prefix), str(cond_dir), str(uncond_dir), hints)

    source = open_weights(path)
    hints = {**_metadata_config(source), **(_folder_config(path) if path.is_dir() else {})}
    prefixes = _branch_prefixes(source, str(path))
    pair = next((p for p in BRANCH_PREFIX_PAIRS if set(p) == prefixes), None)
    if pair is not None:
        if uncond_path is not None:
            raise ModelFileError(
                f"{path} already holds both branches ({pair[0]}* and {pair[1]}*); do not pass a separate "
                "unconditional file."
            )
        label = f"{path} [{{}}*]"
        return _Branches(_official_names(source.with_prefix(pair[0])), _official_names(source.with_prefix(pair[1])),
                         "two-branch file", [str(path)], pair, label.format(pair[0]), label.format(pair[1]), hints)

    cond, cond_prefix = _single_branch(source, str(path), "conditional", prefixes)
    if uncond_path is None:
        raise ModelFileError(
            f"{path} holds a single DiT branch (found {ARCH_TENSOR} once, prefix {cond_prefix or 'none'!r}). "
            "Ideogram 4 needs both branches: pass the unconditional file as well (e.g. "
            "`ideogram4_unconditional_...`), or use a two-branch GGUF."
        )
    uncond_source = open_weights(uncond_path)
    uncond, uncond_prefix = _single_branch(uncond_source, str(uncond_path), "unconditional")
    hints = {**_metadata_config(uncond_source), **hints}
    return _Branches(cond, uncond, "pair of single-branch files", [str(path), str(uncond_path)],
                     (cond_prefix, uncond_prefix), str(path), str(uncond_path), hints)


def _branch_prefixes(source, label: str) -> set[str]:
    """Prefixes p such that `p + embed_image_indicator.weight` exists; a clear error when there is none."""
    keys = list(source.keys())
    prefixes = {k[: -len(ARCH_TENSOR)] for k in keys if k.endswith(ARCH_TENSOR)}
    if not prefixes:
        raise ModelFileError(
            f"{label} is not an Ideogram 4 DiT: it has no {ARCH_TENSOR} among its {len(keys)} tensors "
            f"({_what_it_looks_like(source, keys)}). Pick the Ideogram 4 diffusion model file."
        )
    return prefixes


def _single_branch(source, label: str, role: str, prefixes: set[str] | None = None):
    prefixes = prefixes if prefixes is not None else _branch_prefixes(source, label)
    if len(prefixes) == 1 and next(iter(prefixes)) in SINGLE_BRANCH_PREFIXES:
        prefix = next(iter(prefixes))
        return _official_names(source.with_prefix(prefix) if prefix else source), prefix
    found = ", ".join(repr(p) for p in sorted(prefixes))
    accepted = "; ".join(f"{c!r} + {u!r}" for c, u in BRANCH_PREFIX_PAIRS)
    if len(prefixes) == 2 and role == "unconditional":
        raise ModelFileError(f"{label} holds two DiT branches (prefixes {found}); as the unconditional file, pass a "
                             "single-branch file, or pass this file alone.")
    raise ModelFileError(
        f"{label}: found Ideogram 4 DiT tensors under the prefixes {found}, which is not a known layout. Accepted: "
        f"two branches in one file as {accepted}; or one branch per file with bare names or "
        "'model.diffusion_model.'."
    )


def _what_it_looks_like(source, keys: list[str]) -> str:
    arch = getattr(source, "metadata", {}).get("general.architecture")
    guesses = [what for fragment, what in OTHER_MODELS if any(fragment in k for k in keys)]
    parts = [f"e.g. {', '.join(keys[:3])}" if keys else "the file is empty"]
    if arch:
        parts.append(f"general.architecture = {arch!r}")
    if guesses:
        parts.append(f"looks like {guesses[0]}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Name mapping: everything becomes the official fused names


def _official_names(source):
    """diffusers split attention names -> fused official names; other layouts pass through unchanged."""
    keys = source.keys()
    if not any(_SPLIT_QKV.match(k) for k in keys):
        return source
    renamed = source.renamed(lambda n: _SPLIT_OUT.sub(r"\1o.\2", n))
    return FusedAttentionWeights(renamed)


class FusedAttentionWeights(WeightSource):
    """A weight source whose diffusers `to_q/to_k/to_v` triples are seen as one fused `qkv` (rows concatenated).

    The fused weight is a new dense tensor (the only copy the loader makes; split-name files are bf16 releases, so
    this is a plain concatenation). Everything else is delegated to the wrapped `ops` source.
    """

    def __init__(self, base: WeightSource):
        self.base = base
        self.path = base.describe()
        self.metadata = getattr(base, "metadata", {})
        self._parts: dict[str, list[str]] = {}
        names = []
        for name in base.keys():
            if m := _SPLIT_QKV.match(name):
                self._parts.setdefault(m.group(1) + "qkv.weight", []).append(name)
            else:
                names.append(name)
        for fused, parts in self._parts.items():
            parts.sort(key=lambda n: "qkv".index(_SPLIT_QKV.match(n).group(2)))
            if len(parts) != 3:
                raise ModelFileError(f"{self.path}: {fused} needs to_q, to_k and to_v; found only {parts}.")
        self._names = names + list(self._parts)

    def keys(self):
        return list(self._names)

    def shape(self, name):
        if name in self._parts:
            shapes = [self.base.shape(p) for p in self._parts[name]]
            return (sum(s[0] for s in shapes), shapes[0][1])
        return self.base.shape(name)

    def storage(self, name):
        if name not in self._parts:
            return self.base.storage(name)
        storage = self.base.storage(self._parts[name][0])
        return "F32" if storage == FP8_STORAGE else storage  # fused fp8 parts come out scaled, i.e. dense

    def _dense(self, name, dtype, device):
        if name in self._parts:
            return torch.cat([self.base.tensor(p, dtype, device) for p in self._parts[name]], dim=0)
        return self.base._dense(name, dtype, device)

    def packed(self, name):
        return None if name in self._parts else self.base.packed(name)


def fuse_split_attention(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same mapping on an in-memory state dict (diffusers model -> official names)."""
    fused: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if m := _SPLIT_QKV.match(name):
            parts.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:
            fused[_SPLIT_OUT.sub(r"\1o.\2", name)] = tensor
    for prefix, qkv in parts.items():
        fused[prefix + "qkv.weight"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return fused


# An in-memory state dict as a weight source (tests, converted checkpoints).
StateDictWeights = StateDictSource


# ---------------------------------------------------------------------------------------------------------------
# Config


def _metadata_config(source) -> dict:
    """`ideogram4.<field>` keys of our GGUFs (any field of Ideogram4Config)."""
    metadata = getattr(source, "metadata", None) or {}
    return {f: metadata[f"ideogram4.{f}"] for f in Ideogram4Config.field_names() if f"ideogram4.{f}" in metadata}


def _folder_config(folder: Path) -> dict:
    """The RoPE settings of a diffusers `config.json` (official fp8 / bf16 releases ship one per branch)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return {}
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{config_file}: unreadable config.json ({exc}). Download it again.") from exc
    return {ours: raw[theirs] for theirs, ours in DIFFUSERS_CONFIG_KEYS.items() if theirs in raw}


def _config_from_weights(source, hints: dict, overrides: dict | None, label: str, with_text: bool = True):
    """Config from the tensor shapes; metadata / config.json fill in the RoPE settings and are cross-checked."""
    keys = set(source.keys())
    required = ["input_proj.weight", "adaln_proj.weight", "layers.0.attention.norm_q.weight",
                "layers.0.feed_forward.w1.weight"] + (["llm_cond_norm.weight"] if with_text else [])
    missing = [name for name in required if name not in keys]
    if missing:
        raise ModelFileError(f"{label}: the Ideogram 4 DiT tensors {missing} are missing; the file is incomplete or "
                             "not an Ideogram 4 DiT.")
    hidden, in_channels = source.shape("input_proj.weight")
    head_dim = source.shape("layers.0.attention.norm_q.weight")[0]
    from_shapes = dict(
        hidden_size=hidden,
        in_channels=in_channels,
        num_layers=len({int(m.group(1)) for k in keys if (m := _LAYER_INDEX.match(k))}),
        head_dim=head_dim,
        num_heads=hidden // head_dim,
        intermediate_size=source.shape("layers.0.feed_forward.w1.weight")[0],
        adaln_dim=source.shape("adaln_proj.weight")[0],
    )
    if with_text:
        from_shapes["llm_features_dim"] = source.shape("llm_cond_norm.weight")[0]
    for name, value in hints.items():
        if name in from_shapes and int(value) != from_shapes[name]:
            raise ModelFileError(f"{label}: the metadata says {name} = {value} but the tensors have "
                                 f"{from_shapes[name]}; the file is inconsistent.")
    values = {**{k: v for k, v in hints.items() if k not in from_shapes}, **from_shapes, **(overrides or {})}
    if "mrope_section" in values:
        values["mrope_section"] = tuple(int(x) for x in values["mrope_section"])
    if "rope_theta" in values:
        values["rope_theta"] = float(values["rope_theta"])
    try:
        config = Ideogram4Config(**values)
    except ModelFileError as exc:
        raise ModelFileError(f"{label}: {exc} The file does not say its RoPE settings; pass config_overrides "
                             "(e.g. mrope_section) for a non-standard model.") from exc

    expected = Ideogram4DiT.expected_tensor_names(config, with_text)
    absent = [name for name in expected if name not in keys]
    if absent:
        raise ModelFileError(f"{label}: {len(absent)} of the {len(expected)} Ideogram 4 DiT tensors are missing "
                             f"(e.g. {', '.join(absent[:4])}); the file is incomplete or a different model.")
    return config


def _storage_counts(source, with_text: bool, config: Ideogram4Config) -> Counter:
    names = [n for n in Ideogram4DiT.expected_tensor_names(config, with_text) if n.endswith(".weight")]
    return Counter(source.storage(n) for n in names)
