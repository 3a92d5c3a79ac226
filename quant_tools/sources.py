"""Find the two Ideogram 4 transformers in whatever release layout the user has, as float32 row readers.

Layouts (docs/spec.md §6):

| layout | how to pass it |
|---|---|
| official repo folder (`ideogram-ai/ideogram-4-fp8`, its mirrors, bf16 diffusers conversions): `transformer/` and `unconditional_transformer/`, each one file or shards + `*.safetensors.index.json`, plus config.json | `--source REPO_FOLDER` |
| one branch folder or file per branch (diffusers sub-folder, index.json, single .safetensors) | `--source COND --source-uncond UNCOND` |
| ComfyUI single files (`ideogram4_fp8_scaled.safetensors` + `ideogram4_unconditional_fp8_scaled.safetensors`), with or without the `model.diffusion_model.` prefix | `--source COND --source-uncond UNCOND` |

Tensor storage: float8 e4m3fn weights with a `weight_scale` (per output row in the official release, a scalar in
ComfyUI's scaled fp8), bf16, fp16 or fp32. fp8 weights are dequantized as `fp8 * weight_scale[:, None]` in float32
(the official runtime multiplies in bf16; the fp32 product is the most precise value the release defines).
Names: official fused `attention.qkv` / `attention.o`, or diffusers' `to_q/to_k/to_v/to_out.0`, fused here by
the rule of `layout` (rows of q, then k, then v, read part by part), which is exact.
"""

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QuantToolError
from .layout import (
    ARCH_TENSOR,
    BRANCH_FOLDERS,
    BRANCH_ROLES,
    compare_tensors,
    config_from_shapes,
    config_json_hints,
    fused_shape,
    official_names,
)
from .safetensors_io import DTYPES, open_many

BRANCH_ALIASES = {"cond": "conditional", "conditional": "conditional", "uncond": "unconditional",
                  "unconditional": "unconditional"}

_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # official fp8 / ComfyUI scaled fp8 (new, old)
_IGNORED_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant")  # activation scales, ComfyUI quant tags
_IGNORED_NAMES = {"scaled_fp8", "rotary_emb.inv_freq"}


@dataclass
class Part:
    """Rows of one stored tensor (optionally times its fp8 weight_scale)."""

    file: object  # SafetensorsFile
    key: str
    rows: int
    scale_key: str = None
    scale_file: object = None  # the shard holding the scale (may differ from the weight's)

    def read(self, row_start, row_stop):
        values = self.file.read_f32(self.key, row_start, row_stop)
        if self.scale_key is None:
            return values
        scale = self.scale_file.read_f32(self.scale_key).reshape(-1)
        if scale.size != 1:
            scale = scale[row_start:row_stop].reshape((-1,) + (1,) * (values.ndim - 1))
        return np.multiply(values, scale, out=values if values.flags.writeable else None)

    @property
    def storage(self):
        dtype = self.file.entries[self.key].dtype
        if self.scale_key is None:
            return dtype
        scale_shape = self.scale_file.entries[self.scale_key].shape
        return f"{dtype} x {'per-row' if int(np.prod(scale_shape)) > 1 else 'per-tensor'} scale"


@dataclass
class TensorSource:
    """One official tensor of one branch: its shape and a float32 reader over row ranges."""

    name: str
    shape: tuple
    parts: list

    def read(self, row_start=0, row_stop=None):
        """float32 rows [row_start, row_stop) along the first axis (the whole tensor by default)."""
        row_stop = self.shape[0] if row_stop is None else row_stop
        pieces, offset = [], 0
        for part in self.parts:
            lo, hi = max(row_start, offset), min(row_stop, offset + part.rows)
            if lo < hi:
                pieces.append(part.read(lo - offset, hi - offset))
            offset += part.rows
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)

    @property
    def storage(self):
        kinds = sorted({part.storage for part in self.parts})
        return kinds[0] if len(self.parts) == 1 else f"{len(self.parts)} x {'/'.join(kinds)} (fused)"


@dataclass
class BranchSource:
    role: str  # "conditional" | "unconditional"
    location: Path
    layout: str
    files: list
    tensors: dict
    config: object = None
    prefix: str = ""
    naming: str = "official fused names"
    ignored: list = field(default_factory=list)

    def shapes(self):
        return {name: t.shape for name, t in self.tensors.items()}

    def describe(self):
        storage = Counter(t.storage for t in self.tensors.values())
        lines = [
            f"{self.role}: {self.location} ({self.layout})",
            f"  {len(self.tensors)} tensors, {self.naming}"
            + (f", prefix '{self.prefix}' stripped" if self.prefix else "")
            + (f", {len(self.ignored)} bookkeeping tensors ignored" if self.ignored else ""),
            "  storage: " + ", ".join(f"{n} {kind}" for kind, n in storage.most_common()),
            f"  config: {self.config.describe()} (from {self.config.origin})",
        ]
        return lines

    def close(self):
        for f in self.files:
            f.close()


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantToolError(f"{path}: cannot read JSON ({exc})") from None


def _branch_files(path):
    """(safetensors paths, config.json path or None, layout words) for one branch given as a file or folder."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise QuantToolError(f"{path}: several *.safetensors.index.json files; pass the one to use")
        if indexes:
            return _branch_files(indexes[0])
        singles = sorted(path.glob("*.safetensors"))
        if not singles:
            raise QuantToolError(f"{path}: no .safetensors file in this folder")
        if len(singles) > 1:
            raise QuantToolError(
                f"{path}: {len(singles)} .safetensors files and no *.safetensors.index.json; pass one file "
                "per branch (--source COND --source-uncond UNCOND)"
            )
        path = singles[0]
    if not path.exists():
        raise QuantToolError(f"{path}: no such file or folder")
    config = path.parent / "config.json"
    config = config if config.is_file() else None
    if path.name.endswith(".index.json"):
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QuantToolError(f"{path}: not a safetensors index (no weight_map)")
        shards = sorted({path.parent / shard for shard in weight_map.values()})
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise QuantToolError(f"{path}: shard(s) missing: {', '.join(missing)}")
        return shards, config, f"{len(shards)} shard(s) + index"
    if path.suffix != ".safetensors":
        raise QuantToolError(f"{path}: expected a .safetensors file, a *.safetensors.index.json or a folder")
    return [path], config, "single file"


def _collect(files, where):
    """Map stored keys to official tensors; returns (tensors, prefix, naming, ignored)."""
    owner = {}
    for f in files:
        for key in f.keys():
            if key in owner:
                raise QuantToolError(f"{where}: tensor {key!r} is stored twice ({owner[key].path}, {f.path})")
            owner[key] = f

    indicators = [key for key in owner if key == ARCH_TENSOR or key.endswith("." + ARCH_TENSOR)]
    if not indicators:
        sample = ", ".join(list(owner)[:5])
        raise QuantToolError(
            f"{where} is not an Ideogram 4 transformer: it has no {ARCH_TENSOR} (found {len(owner)} tensors, e.g. "
            f"{sample}). Pass the transformer weights (transformer/ or unconditional_transformer/), not the text "
            "encoder or VAE"
        )
    if len(indicators) > 1:
        raise QuantToolError(f"{where} holds {len(indicators)} transformers ({', '.join(indicators)}); pass one per branch")
    prefix = indicators[0][: -len(ARCH_TENSOR)]
    nf4 = [key for key in owner if key.endswith((".absmax", ".quant_map")) or ".quant_state." in key]
    if nf4:
        raise QuantToolError(f"{where} is a bitsandbytes NF4 checkpoint ({nf4[0]}, ...); quant_tools reads the fp8, "
                             "bf16, fp16 or fp32 releases (e.g. ideogram-ai/ideogram-4-fp8)")

    weights, scales, ignored, foreign = {}, {}, [], []
    for key in owner:
        if not key.startswith(prefix):
            foreign.append(key)
            continue
        local = key[len(prefix):]
        if local.endswith(_SCALE_SUFFIXES):
            scales[local.rsplit(".", 1)[0] + ".weight"] = key
        elif local.endswith(_IGNORED_SUFFIXES) or local in _IGNORED_NAMES:
            ignored.append(key)
        else:
            weights[local] = key
    if foreign:
        raise QuantToolError(f"{where}: {len(foreign)} tensor(s) outside the transformer prefix '{prefix}', "
                             f"e.g. {', '.join(foreign[:4])}; pass a file that holds one transformer only")

    def part(local):
        key = weights[local]
        entry = owner[key].entries[key]
        scale_key = scales.pop(local, None)
        if scale_key is not None:
            n_scale = owner[scale_key].entries[scale_key].numel
            if n_scale not in (1, entry.shape[0] if entry.shape else 1):
                raise QuantToolError(f"{where}: {scale_key} has {n_scale} values for {entry.shape[0]} rows of {key}")
        return Part(owner[key], key, entry.shape[0] if entry.shape else 1, scale_key, owner.get(scale_key))

    def stored_shape(local):
        key = weights[local]
        return tuple(owner[key].entries[key].shape)

    names = official_names(weights, where)
    tensors = {official: TensorSource(official, stored_shape(local), [part(local)])
               for official, local in names.single.items()}
    for qkv, locals_ in names.fused.items():
        # the fused tensor reads its parts one after the other: rows of to_q, then to_k, then to_v
        shape = fused_shape(qkv, [stored_shape(local) for local in locals_], where)
        tensors[qkv] = TensorSource(qkv, shape, [part(local) for local in locals_])
    if scales:
        raise QuantToolError(f"{where}: weight scale(s) without a weight: {', '.join(list(scales.values())[:4])}")
    unreadable = [f"{p.key} ({p.file.entries[p.key].dtype})" for t in tensors.values() for p in t.parts
                  if p.file.entries[p.key].dtype not in DTYPES]
    if unreadable:
        raise QuantToolError(
            f"{where}: {len(unreadable)} tensor(s) in a storage format quant_tools does not read, e.g. "
            f"{', '.join(unreadable[:3])}; it reads float8 e4m3fn/e5m2 (+ weight_scale), bf16, fp16 and fp32 "
            "(int8, nvfp4 and other quantized releases cannot be re-quantized)"
        )
    naming = "diffusers split attention names (fused to qkv / o)" if names.split else "official fused names"
    return tensors, prefix, naming, ignored


def open_branch(path, role, layout_words=None):
    """BranchSource for one branch (file, index or folder), checked against its config."""
    files_paths, config_path, layout = _branch_files(path)
    files = open_many(files_paths)
    where = f"{role} transformer {path}"
    try:
        tensors, prefix, naming, ignored = _collect(files, where)
        hints, origin = {}, "tensor shapes"
        if config_path is not None:
            hints = config_json_hints(_read_json(config_path), str(config_path))
            origin += f" + {config_path}" if hints else ""
        config = config_from_shapes(lambda name: tensors[name].shape, tensors, where, hints=hints, origin=origin)
        _check_tensors(tensors, config, where)
        ordered = {name: tensors[name] for name in config.tensor_shapes()}
    except BaseException:
        for f in files:
            f.close()
        raise
    return BranchSource(role, Path(path), layout_words or layout, files, ordered, config, prefix, naming, ignored)


def _check_tensors(tensors, config, where):
    """QuantToolError unless the branch holds exactly the config's tensor table (both branches keep llm_cond_*)."""
    missing, unexpected, wrong = compare_tensors(tensors, lambda name: tensors[name].shape, config)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape(s) disagree with the config: "
                        + _some([f"{name}: {got} (expected {want})" for name, got, want in wrong]))
    if problems:
        raise QuantToolError(
            f"{where} is not a complete Ideogram 4 transformer with config ({config.describe()}; from "
            f"{config.origin}): " + "; ".join(problems)
        )


def _some(items, limit=6):
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _is_repo_root(path):
    return Path(path).is_dir() and any((Path(path) / sub).is_dir() for sub in BRANCH_FOLDERS.values())


def open_branches(source, source_uncond=None, single_branch=None):
    """The branches to write, in file order. Two-branch mode unless `single_branch` names one branch.

    Raises QuantToolError with the fix when a branch is missing, a path does not exist, a file is not Ideogram
    4, or the two branches disagree on the config.
    """
    source = Path(source)
    if not source.exists():
        raise QuantToolError(f"--source {source}: no such file or folder")
    if source_uncond is not None and not Path(source_uncond).exists():
        raise QuantToolError(f"--source-uncond {source_uncond}: no such file or folder")
    roles = BRANCH_ROLES if single_branch is None else (BRANCH_ALIASES[single_branch],)

    paths = {}
    if _is_repo_root(source):
        for role in roles:
            sub = source / BRANCH_FOLDERS[role]
            if not sub.is_dir():
                raise QuantToolError(
                    f"{source} has no {BRANCH_FOLDERS[role]}/ folder: the {role} transformer is missing from this "
                    "download (the official repos ship transformer/ and unconditional_transformer/)"
                )
            paths[role] = (sub, "repo folder " + BRANCH_FOLDERS[role] + "/")
        if source_uncond is not None and single_branch is None:
            raise QuantToolError(f"--source {source} is a full repo folder with both branches; drop --source-uncond")
    elif single_branch is None:
        if source_uncond is None:
            raise QuantToolError(
                f"--source {source} holds one transformer, but a two-branch file needs both. Pass the "
                "unconditional transformer too: --source-uncond PATH (e.g. unconditional_transformer/ of the "
                "official repo, or ideogram4_unconditional_fp8_scaled.safetensors), or write one branch with "
                "--single-branch cond"
            )
        if os.path.realpath(source) == os.path.realpath(source_uncond):
            raise QuantToolError("--source and --source-uncond are the same file; the branches have different weights")
        paths = {"conditional": (source, None), "unconditional": (Path(source_uncond), None)}
    else:
        role = roles[0]
        chosen = Path(source_uncond) if role == "unconditional" and source_uncond is not None else source
        paths = {role: (chosen, None)}

    branches = []
    try:
        for role in roles:
            path, words = paths[role]
            branch = open_branch(path, role)
            if words:
                branch.layout = words + ", " + branch.layout
            branches.append(branch)
        if len(branches) == 2 and branches[0].config.differences(branches[1].config):
            raise QuantToolError(
                "the conditional and unconditional transformers have different configs: "
                + "; ".join(branches[0].config.differences(branches[1].config))
            )
    except BaseException:
        for branch in branches:
            branch.close()
        raise
    return branches


def swapped_hint(branches):
    """A warning when file names suggest the branches were passed the wrong way round (they look identical)."""
    by_role = {b.role: b.location.name.lower() for b in branches}
    cond = by_role.get("conditional", "")
    if "uncond" in cond and "uncond" not in by_role.get("unconditional", "uncond"):
        return (f"warning: the conditional source is named '{cond}'; check that --source is the conditional and "
                "--source-uncond the unconditional transformer (their tensors look alike)")
    return None
