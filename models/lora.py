"""LoRA files for the Ideogram 4 DiT: every key format in the wild, mapped onto our modules, applied beside them.

Formats (docs/lora.md; facts from diffusers 0.42.1 `_convert_non_diffusers_ideogram4_lora_to_diffusers` and
`Ideogram4LoraLoaderMixin`, docs/spec.md §2.2.1):

| style | prefix | attention names | factors | scale |
|---|---|---|---|---|
| ai-toolkit / kohya | `diffusion_model.`, `conditional_transformer.`, `unconditional_transformer.` or none | fused `attention.qkv` / `attention.o` | `lora_down` / `lora_up` (or `lora_A` / `lora_B`) | `alpha / rank` when `.alpha` is stored, else 1 |
| diffusers / PEFT | `transformer.` (also PEFT's `base_model.model.`) | split `to_q` / `to_k` / `to_v` / `to_out.0` | `lora_A` / `lora_B` | `lora_alpha / r` from the file's `lora_adapter_metadata`, else 1 |
| OneTrainer | `transformer.` | split | `lora_down` / `lora_up` + `.alpha` | `alpha / rank` |
| kohya flattened | `lora_unet_`, `lora_transformer_` | either, dots as underscores | `lora_down` / `lora_up` + `.alpha` | `alpha / rank` |

A split q/k/v LoRA lands on our fused `qkv` Linear as three row slices: no dense qkv weight is ever built.
The low-rank path runs beside the (packed) Linear: `y = W x + strength * scale * B (A x)`, as PEFT computes it, so
packed weights are never touched and removing a LoRA gives back the exact output.

No ComfyUI imports; safetensors only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFileError, quote

logger = logging.getLogger(__name__)

BRANCH_CHOICES = ("auto", "cond", "uncond", "both")

# Key prefixes, longest first; those naming the unconditional branch say so. A `base_model.model.` PEFT prefix may
# wrap `transformer.` too.
_COND_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "conditional_transformer.", "transformer.",
                  "base_model.model.transformer.", "base_model.model.")
_UNCOND_WORDS = re.compile(r"uncond|negative", re.IGNORECASE)
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# Factor suffixes: (down, up) pairs, kohya and PEFT spellings.
_FACTORS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
            ".alpha": "alpha"}
# Tell-tale keys of LoRA variants this reader does not apply.
_UNSUPPORTED = (("lokr_w1", "LyCORIS LoKr"), ("lokr_w2", "LyCORIS LoKr"), ("hada_w1", "LyCORIS LoHa"),
                ("hada_w2", "LyCORIS LoHa"), (".lora_mid.", "LyCORIS LoCon (Tucker)"), (".dora_scale", "DoRA"),
                (".diff", "a full weight difference"), (".lora_up.bias", "a LoRA with bias terms"),
                (".lora_B.bias", "a LoRA with bias terms"), (".w_norm", "a norm-weight patch"))

# Our Linear modules (official names), and the other names a LoRA may use for them: (module, q/k/v part or None).
_LAYER_MODULE = re.compile(r"^layers\.(\d+)\.(attention\.(?:qkv|o|to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]|"
                           r"adaln_modulation)$")
_TOP_MODULES = ("input_proj", "llm_cond_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj",
                "final_layer.linear", "final_layer.adaln_modulation")
_SPLIT_PARTS = {"to_q": 0, "to_k": 1, "to_v": 2}
# Flattened (kohya "lora_unet_layers_0_attention_qkv") module names back to dotted ones.
_FLAT_MODULE = re.compile(r"^layers_(\d+)_(attention_(?:qkv|o|to_q|to_k|to_v|to_out_0)|feed_forward_w[123]|"
                          r"adaln_modulation)$")
_FLAT_TOP = {name.replace(".", "_"): name for name in _TOP_MODULES}
_QUOTE = 120  # characters of a name or key quoted in an error message


def _q(text) -> str:
    return quote(str(text), _QUOTE)


@dataclass
class LoraTerm:
    """One low-rank update: `scale * up @ down` added to `target` (rows of q/k/v part `part` of a fused qkv)."""

    target: str  # our module name, e.g. "layers.0.attention.qkv"
    part: int | None  # 0/1/2: the q/k/v third of a fused qkv; None: the whole output
    down: torch.Tensor  # A (rank, in_features), float32
    up: torch.Tensor  # B (out_rows, rank), float32
    scale: float
    key: str  # the file's module key, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    """A LoRA file read and mapped onto our module names (nothing bound to a model yet)."""

    path: str
    style: str
    branch: str  # "cond" or "uncond": what the file says it was trained for (prefix, name), else "cond"
    branch_reason: str
    terms: list[LoraTerm]
    unmatched: list[str] = field(default_factory=list)  # module keys that name no Ideogram 4 Linear

    def summary(self) -> str:
        ranks = sorted({t.rank for t in self.terms})
        return (f"{Path(self.path).name}: {len(self.terms)} LoRA tensors ({self.style}, rank "
                f"{'/'.join(map(str, ranks))}) for the {self.branch} branch ({self.branch_reason})"
                + (f"; {len(self.unmatched)} keys skipped" if self.unmatched else ""))


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_lora(path, *, branch: str = "auto", tensors: dict | None = None, metadata: dict | None = None) -> LoraFile:
    """Read a LoRA safetensors file (or `tensors` + `metadata` already in memory, labelled `path`).

    branch: "auto" (from the file's prefix or name; the conditional branch when nothing says otherwise), "cond" or
    "uncond". A file with no Ideogram 4 LoRA tensors at all is a ModelFileError listing its first keys; unknown
    keys beside known ones are skipped (counted in `unmatched`).
    """
    label = os.fspath(path)
    if branch not in ("auto", "cond", "uncond"):
        raise ModelFileError(f"LoRA branch must be auto, cond or uncond, got {branch!r}.")
    if tensors is None:
        tensors, metadata = _load_safetensors(label)
    metadata = metadata or {}
    keys = list(tensors)
    for fragment, kind in _UNSUPPORTED:
        hit = next((k for k in keys if fragment in k), None)
        if hit is not None:
            raise ModelFileError(f"{_q(label)}: unsupported LoRA type ({kind}, e.g. key {_q(hit)}). Only plain LoRA "
                                 "(lora_down/lora_up or lora_A/lora_B, with an optional alpha) can be applied.")

    groups: dict[str, dict[str, torch.Tensor]] = {}
    strays = []
    for key in keys:
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is None:
            strays.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[_FACTORS[suffix]] = tensors[key]

    prefixes_seen, terms, unmatched = set(), [], list(strays)
    peft_scale = _peft_scales(metadata, label)
    for module_key, factors in groups.items():
        mapped = _map_module(module_key)
        if mapped is None:
            unmatched.append(module_key)
            continue
        prefix, target, part = mapped
        if "down" not in factors or "up" not in factors:
            missing = "down (lora_down / lora_A)" if "down" not in factors else "up (lora_up / lora_B)"
            raise ModelFileError(f"{_q(label)}: LoRA tensor {_q(module_key)} has no {missing} factor; the file is "
                                 "incomplete.")
        down, up = factors["down"], factors["up"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise ModelFileError(f"{_q(label)}: LoRA tensor {_q(module_key)} has factors of shape "
                                 f"{tuple(down.shape)} (down) and {tuple(up.shape)} (up): not a rank-r pair.")
        rank = down.shape[0]
        if "alpha" in factors:
            alpha = float(factors["alpha"].float().reshape(-1)[0]) if factors["alpha"].numel() else float("nan")
            if not math.isfinite(alpha):
                raise ModelFileError(f"{_q(label)}: {_q(module_key)}.alpha is not a finite number.")
            scale = alpha / rank
        else:
            scale = peft_scale(module_key, rank)
        prefixes_seen.add(prefix)
        terms.append(LoraTerm(target, part, down.float(), up.float(), scale, module_key))

    if not terms:
        shown = ", ".join(_q(k) for k in keys[:5]) or "none"
        raise ModelFileError(f"{_q(label)}: not an Ideogram 4 LoRA: none of its {len(keys)} tensors names an "
                             f"Ideogram 4 DiT layer (first keys: {shown}). Use a LoRA trained for Ideogram 4.")
    style = _style(groups, terms)
    detected, reason = _branch_of(prefixes_seen, label, metadata)
    if branch == "auto":
        branch, reason = detected, reason
    else:
        reason = "chosen" + (f"; the file says {detected}: {reason}" if detected != branch else "")
    lora = LoraFile(label, style, branch, reason, terms, unmatched)
    if unmatched:
        logger.warning("LoRA %s: %d of %d keys name no Ideogram 4 DiT layer and are skipped (e.g. %s)",
                       _q(label), len(unmatched), len(groups) + len(strays), ", ".join(_q(k) for k in unmatched[:3]))
    return lora


def _load_safetensors(label: str):
    from safetensors import SafetensorError, safe_open

    path = Path(label)
    if not path.is_file():
        raise ModelFileError(f"LoRA file {_q(label)} not found. Put LoRA files in ComfyUI's models/loras folder.")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFileError(f"{_q(label)}: LoRAs are read from .safetensors files only (no pickle).")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{_q(label)}: not a readable safetensors file ({_q(exc)}).") from exc
    return tensors, metadata


def _map_module(key: str):
    """(prefix, our module, q/k/v part) for a LoRA module key, or None when it names no Ideogram 4 Linear."""
    for flat in _FLAT_PREFIXES + ("lora_unconditional_transformer_",):
        if key.startswith(flat):
            rest = key[len(flat):]
            dotted = _FLAT_TOP.get(rest)
            if dotted is None and (m := _FLAT_MODULE.match(rest)):
                dotted = f"layers.{m.group(1)}." + (m.group(2).replace("attention_", "attention.", 1)
                                                   .replace("feed_forward_", "feed_forward.", 1)
                                                   .replace("to_out_0", "to_out.0"))
            return None if dotted is None else _canonical(flat, dotted)
    prefix = ""
    for candidate in _COND_PREFIXES:
        if key.startswith(candidate):
            prefix = candidate
            break
    else:
        head, dot, _ = key.partition(".")
        if dot and _UNCOND_WORDS.search(head):
            prefix = head + "."
    return _canonical(prefix, key[len(prefix):])


def _canonical(prefix: str, name: str):
    if name in _TOP_MODULES:
        return prefix, name, None
    m = _LAYER_MODULE.match(name)
    if m is None:
        return None
    layer, module = m.group(1), m.group(2)
    leaf = module.rpartition(".")[2] if module.startswith("attention.") else None
    if leaf in _SPLIT_PARTS:
        return prefix, f"layers.{layer}.attention.qkv", _SPLIT_PARTS[leaf]
    if module in ("attention.to_out.0",):
        return prefix, f"layers.{layer}.attention.o", None
    return prefix, f"layers.{layer}.{module}", None


def _peft_scales(metadata: dict, label: str):
    """PEFT's scale: lora_alpha / r from the adapter config diffusers stores as `lora_adapter_metadata` (keys
    prefixed "transformer." when a pipeline saved it), with PEFT's per-module alpha_pattern / rank_pattern."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda key, rank: 1.0
    try:
        config = json.loads(raw)
        if any(k.startswith("transformer.") for k in config):
            config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
        alpha, default_r = config.get("lora_alpha"), config.get("r")
        alpha_pattern, rank_pattern = dict(config.get("alpha_pattern") or {}), dict(config.get("rank_pattern") or {})
    except (ValueError, AttributeError, TypeError) as exc:
        raise ModelFileError(f"{_q(label)}: its lora_adapter_metadata is not a valid adapter config ({_q(exc)}).") from exc

    def pattern_value(patterns, module, default):
        for pattern, value in patterns.items():  # PEFT: a pattern matches the module name or a dotted suffix of it
            try:
                if re.fullmatch(rf"(.*\.)?(?:{pattern.lstrip('^')})", module):
                    return value
            except re.error:
                continue
        return default

    def scale(key, rank):
        module = key
        for prefix in ("base_model.model.", "transformer."):
            module = module.removeprefix(prefix)
        a = pattern_value(alpha_pattern, module, alpha)
        r = pattern_value(rank_pattern, module, default_r or rank)
        try:
            return 1.0 if a is None else float(a) / float(r)
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ModelFileError(f"{_q(label)}: lora_adapter_metadata gives alpha {_q(a)} / r {_q(r)} for "
                                 f"{_q(module)}, not numbers.") from exc

    return scale


def _style(groups: dict, terms: list[LoraTerm]) -> str:
    keys = list(groups)
    split = any(t.part is not None for t in terms) or any(".to_out.0" in k for k in keys)
    flat = any(k.startswith(_FLAT_PREFIXES + ("lora_unconditional_transformer_",)) for k in keys)
    kohya_factors = any("alpha" in f for f in groups.values())
    if flat:
        return "kohya (flattened names)"
    if split:
        return "OneTrainer (split names)" if kohya_factors else "diffusers / PEFT (split names)"
    return "ai-toolkit / kohya (fused names)"


def _branch_of(prefixes: set[str], label: str, metadata: dict) -> tuple[str, str]:
    uncond = sorted(p for p in prefixes if _UNCOND_WORDS.search(p))
    if uncond and len(uncond) == len(prefixes):
        return "uncond", f"prefix {uncond[0]!r}"
    if uncond:
        return "cond", f"mixed prefixes {sorted(prefixes)}: pick the branch explicitly"
    if _UNCOND_WORDS.search(Path(label).name):
        return "uncond", "file name"
    if _UNCOND_WORDS.search(str(metadata.get("ideogram4.branch", ""))):
        return "uncond", "metadata"
    return "cond", "default: LoRAs train the conditional DiT"


# ---------------------------------------------------------------------------------------------------------------
# Binding to a branch and applying


@dataclass
class BoundTerm:
    module: nn.Module
    rows: tuple[int, int] | None
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # strength x the file's scale


def bind(lora: LoraFile, branch: nn.Module, strength: float, label: str = "") -> tuple[list[BoundTerm], list[str]]:
    """The LoRA's terms on `branch`'s modules (shapes checked, naming the tensor), and the targets it lacks (the
    unconditional branch has no text projection, say)."""
    modules = dict(branch.named_modules())
    bound, absent = [], []
    for term in lora.terms:
        module = modules.get(term.target)
        if module is None:
            absent.append(term.key)
            continue
        in_features, out_features = int(module.in_features), int(module.out_features)
        rows = None
        if term.part is not None:
            third = out_features // 3
            rows = (term.part * third, (term.part + 1) * third)
        expected_out = out_features if rows is None else rows[1] - rows[0]
        if term.down.shape[1] != in_features or term.up.shape[0] != expected_out:
            raise ModelFileError(
                f"{_q(lora.path)}: LoRA tensor {_q(term.key)} is {tuple(term.up.shape)} x {tuple(term.down.shape)} "
                f"(up x down) but {term.target} of this DiT{label} maps {in_features} -> {expected_out}: the LoRA "
                "was trained for a model of another size.")
        if strength:
            bound.append(BoundTerm(module, rows, term.down, term.up, float(strength) * term.scale))
    return bound, absent


class _Factors:
    """One module's LoRA terms, with device copies of the factors (kept when the branch stays on the device)."""

    def __init__(self, terms: list[BoundTerm], keep_on_device: bool):
        self.terms, self.keep = terms, keep_on_device
        self.copies: dict = {}

    def on(self, device, dtype):
        cached = self.copies.get((device, dtype))
        if cached is not None:
            return cached
        moved = [(t.down.to(device, dtype), t.up.to(device, dtype), t.scale, t.rows) for t in self.terms]
        if self.keep:
            self.copies[(device, dtype)] = moved
        return moved

    def hook(self, module, inputs, output):
        x = inputs[0]
        for down, up, scale, rows in self.on(output.device, output.dtype):
            delta = (x.to(output.dtype) @ down.T) @ up.T
            if rows is None:
                output = output + delta * scale
            else:
                output[..., rows[0]:rows[1]] += delta * scale
        return output


class LoraHandles:
    """Installed LoRA hooks; `remove()` restores the exact original modules."""

    def __init__(self):
        self.handles = []

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install(terms: list[BoundTerm], keep_on_device: bool = True, handles: LoraHandles | None = None) -> LoraHandles:
    """Add forward hooks running every term's low-rank path beside its module (stacked in order). keep_on_device:
    cache device copies of the factors (resident branches); False moves them per call (streamed branches carry
    their factors with the layer)."""
    handles = handles or LoraHandles()
    by_module: dict[int, list[BoundTerm]] = {}
    for term in terms:
        by_module.setdefault(id(term.module), []).append(term)
    for grouped in by_module.values():
        factors = _Factors(grouped, keep_on_device)
        handles.handles.append(grouped[0].module.register_forward_hook(factors.hook))
    return handles


# ---------------------------------------------------------------------------------------------------------------
# The same mapping for ComfyUI core's LoRA loader


def core_key_map(module_names: list[str], qkv_rows: int) -> dict:
    """LoRA module keys -> core model keys ("diffusion_model.<module>.weight", or (key, (0, start, rows)) for a q/k/v
    slice of the fused qkv), for every prefix and spelling `read_lora` accepts; core's own map covers the bare
    official names and `lora_unet_`. module_names: the model's Linear module names (official)."""
    prefixes = _COND_PREFIXES + ("conditional_transformer.", "unconditional_transformer.", "")
    out = {}
    for name in module_names:
        weight = f"diffusion_model.{name}.weight"
        spellings = {name: weight}
        m = re.match(r"^(layers\.\d+\.attention\.)(qkv|o)$", name)
        if m and m.group(2) == "qkv":
            for leaf, part in _SPLIT_PARTS.items():
                spellings[m.group(1) + leaf] = (weight, (0, part * qkv_rows, qkv_rows))
        elif m:
            spellings[m.group(1) + "to_out.0"] = weight
        for spelled, target in spellings.items():
            for prefix in prefixes:
                out[prefix + spelled] = target
            flat = spelled.replace(".", "_")
            for prefix in _FLAT_PREFIXES + ("lora_unconditional_transformer_",):
                out[prefix + flat] = target
    return out
