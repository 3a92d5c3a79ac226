"""Load the two Ideogram 4 DiT branches from any supported file layout.

- a two-branch GGUF (our quant_tools output, Transformer Lab's file): two tensor-name prefixes, one per branch,
  e.g. `conditional_transformer.` / `unconditional_transformer.`, `transformer.` / `unconditional_transformer.`,
  `cond.` / `uncond.`, in any order or nesting (see "Which prefix is which branch" below);
- a pair of single-branch GGUFs (stable-diffusion.cpp / ComfyUI-GGUF style): bare official names, no metadata;
- the official fp8 folder: `transformer/` + `unconditional_transformer/`, single or sharded safetensors, fp8 with a
  per-row `weight_scale`;
- ComfyUI single files (`ideogram4_fp8_scaled` + `ideogram4_unconditional_fp8_scaled`), optionally prefixed
  `model.diffusion_model.` (any single prefix ending in "." is accepted);
- bf16 diffusers releases with split `attention.to_q/to_k/to_v` and `attention.to_out.0` names.

The model is recognised by its tensors (`embed_image_indicator.weight`), never by metadata alone; the config comes
from the tensor shapes, completed by `ideogram4.*` GGUF metadata or a diffusers `config.json` for the two RoPE
settings that no shape reveals. Every value read from a file is checked (type, range, shape against the model it
describes) before anything is built, and every failure is one `ModelFileError` line naming the file.

Which prefix is which branch (in this order): an explicit `branch_prefixes=(cond_prefix, uncond_prefix)`; the
file's `ideogram4.branches` + `ideogram4.branch_prefixes` metadata (our quant_tools writes them); else, with exactly
two prefixes, the one whose name says unconditional (`uncond`, `unconditional`, `negative`, any case) is the
unconditional branch. The Transformer Lab file's exact spelling is not documented anywhere we can read (docs/dit.md),
hence a rule rather than a list.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError, quote
from ..ops import FP8_STORAGE, StateDictSource, WeightSource, open_weights
from ..quant_tools import layout
from .dit import ARCH_TENSOR, Ideogram4Config, Ideogram4DiT, default_compute_dtype

logger = logging.getLogger(__name__)

# (conditional, unconditional) prefixes of the two-branch files we know of, ours (quant_tools) first; each satisfies
# the naming rule below (tests/models/test_dit_loader.py loads every one).
BRANCH_PREFIX_PAIRS = (
    tuple(layout.BRANCH_PREFIXES[role] for role in layout.BRANCH_ROLES),
    ("transformer.", "unconditional_transformer."),
    ("cond.", "uncond."),
)
# A prefix naming the unconditional branch contains one of these (case-insensitive; "unconditional" contains
# "uncond").
UNCOND_MARKERS = ("uncond", "negative")
# `ideogram4.branches` role names (quant_tools writes them, in file order).
BRANCH_ROLES = layout.BRANCH_ROLES
# Prefixes of a file that holds a single branch: bare names, a ComfyUI checkpoint prefix, or any other single
# prefix ending in "." under which the full tensor set sits.
SINGLE_BRANCH_PREFIXES = ("", "model.diffusion_model.")
# The official diffusers-style release folder.
BRANCH_FOLDERS = tuple(layout.BRANCH_FOLDERS[role] for role in layout.BRANCH_ROLES)

# What a wrong file most likely is, from a tell-tale name fragment (for the error message only).
OTHER_MODELS = (
    ("double_blocks.", "a FLUX transformer"),
    ("language_model.", "a text encoder (Qwen3-VL?)"),
    ("blk.", "a llama.cpp language model (a text encoder?)"),
    ("model.layers.", "a language model (a text encoder?)"),
    ("decoder.up", "a VAE"),
    ("encoder.down", "a VAE"),
)


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
    branch_prefixes: tuple[str, str] | None = None,
) -> tuple[Ideogram4DiT, Ideogram4DiT, DiTLoadInfo]:
    """(cond_branch, uncond_branch, info) from one two-branch file/folder, or from a cond file plus `uncond_path`.

    compute_dtype: default bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on the CPU. Quantized and fp8
    weights stay packed in their Linear layers; load on the CPU and `.to(device)` later moves the packed bytes.
    config_overrides: config fields to force (e.g. `mrope_section` for a non-standard model without metadata).
    kernel: dequant kernel of the quantized Linears ("auto": fused Triton on CUDA where it has one, else torch).
    branch_prefixes: (cond_prefix, uncond_prefix) of the tensor names, for a two-branch file whose prefixes do not
    say which branch is which (for a pair of files: the prefix inside each file).
    """
    device = torch.device(device)
    compute_dtype = compute_dtype or default_compute_dtype(device)
    branches = find_dit_branches(path, uncond_path, config_overrides=config_overrides, branch_prefixes=branch_prefixes)
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


def find_dit_branches(path, uncond_path=None, *, config_overrides: dict | None = None,
                      branch_prefixes: tuple[str, str] | None = None) -> DiTBranches:
    """Find the two branches in one two-branch file/folder, or a cond file plus `uncond_path`, and read their
    config from the tensor shapes (see `load_dit_branches`); a clear ModelFileError for anything else."""
    branch_prefixes = _checked_prefix_option(branch_prefixes)
    overrides = _checked_overrides(config_overrides)
    branches = _find_branches(path, uncond_path, branch_prefixes)
    config = _config_from_weights(branches.cond, branches.hints, overrides, branches.cond_label)
    uncond_config = _config_from_weights(
        branches.uncond, branches.hints, {**overrides, "llm_features_dim": config.llm_features_dim},
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


def _checked_prefix_option(branch_prefixes):
    if branch_prefixes is None:
        return None
    if (not isinstance(branch_prefixes, (tuple, list)) or len(branch_prefixes) != 2
            or not all(isinstance(p, str) for p in branch_prefixes) or branch_prefixes[0] == branch_prefixes[1]):
        raise ModelFileError(f"branch_prefixes must be two different strings (cond_prefix, uncond_prefix), e.g. "
                             f"('transformer.', 'unconditional_transformer.'); got {quote(branch_prefixes)}.")
    return tuple(branch_prefixes)


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


def _find_branches(path, uncond_path, branch_prefixes) -> _Branches:
    path = Path(os.fspath(path))
    given = branch_prefixes or (None, None)
    if path.is_dir() and all((path / name).is_dir() for name in BRANCH_FOLDERS):
        if uncond_path is not None:
            raise ModelFileError(
                f"{path} already holds both branches ({'/ and '.join(BRANCH_FOLDERS)}/); do not pass a separate "
                "unconditional file."
            )
        cond_dir, uncond_dir = (path / name for name in BRANCH_FOLDERS)
        cond, cond_prefix = _single_branch(open_weights(cond_dir), str(cond_dir), "conditional", prefix=given[0])
        uncond, uncond_prefix = _single_branch(open_weights(uncond_dir), str(uncond_dir), "unconditional",
                                               prefix=given[1])
        hints = _folder_config(cond_dir)
        return _Branches(cond, uncond, "official folder", [str(cond_dir), str(uncond_dir)],
                         (cond_prefix, uncond_prefix), str(cond_dir), str(uncond_dir), hints)

    source = open_weights(path)
    hints = {**_metadata_config(source, str(path)), **(_folder_config(path) if path.is_dir() else {})}
    prefixes = _branch_prefixes(source, str(path))
    pair = None if uncond_path is not None and branch_prefixes is not None else \
        _two_branch_prefixes(source, str(path), prefixes, branch_prefixes)
    if pair is not None:
        if uncond_path is not None:
            raise ModelFileError(
                f"{path} already holds both branches ({quote(pair[0])}* and {quote(pair[1])}*); do not pass a "
                "separate unconditional file."
            )
        label = f"{path} [{{}}*]"
        return _Branches(_official_names(source.with_prefix(pair[0])), _official_names(source.with_prefix(pair[1])),
                         "two-branch file", [str(path)], pair, label.format(pair[0]), label.format(pair[1]), hints)

    cond, cond_prefix = _single_branch(source, str(path), "conditional", prefixes, given[0])
    if uncond_path is None:
        raise ModelFileError(
            f"{path} holds a single DiT branch (found {ARCH_TENSOR} once, prefix {quote(cond_prefix or 'none')}). "
            "Ideogram 4 needs both branches: pass the unconditional file as well (e.g. "
            "`ideogram4_unconditional_...`), or use a two-branch GGUF."
        )
    uncond_source = open_weights(uncond_path)
    uncond, uncond_prefix = _single_branch(uncond_source, str(uncond_path), "unconditional", prefix=given[1])
    hints = {**_metadata_config(uncond_source, str(uncond_path)), **hints}
    roles = (_metadata_role(source), _metadata_role(uncond_source))
    if roles == ("unconditional", "conditional"):
        # Our quant_tools names the branch of a single-branch file (`ideogram4.branches`); both files agreeing
        # that they were passed the wrong way round is no accident.
        logger.warning("%s is the unconditional branch and %s the conditional one (their ideogram4.branches "
                       "metadata says so); using them that way round.", path, uncond_path)
        path, uncond_path = Path(os.fspath(uncond_path)), path
        cond, uncond, cond_prefix, uncond_prefix = uncond, cond, uncond_prefix, cond_prefix
    return _Branches(cond, uncond, "pair of single-branch files", [str(path), str(uncond_path)],
                     (cond_prefix, uncond_prefix), str(path), str(uncond_path), hints)


def _branch_prefixes(source, label: str) -> set[str]:
    """Prefixes p ("" or ending in ".") such that `p + embed_image_indicator.weight` exists; a clear error when
    there is none."""
    keys = list(source.keys())
    prefixes = layout.branch_prefixes(keys)
    if not prefixes:
        raise ModelFileError(
            f"{label} is not an Ideogram 4 DiT: it has no {ARCH_TENSOR} among its {len(keys)} tensors "
            f"({_what_it_looks_like(source, keys)}). Pick the Ideogram 4 diffusion model file."
        )
    return prefixes


def _names_uncond(prefix: str) -> bool:
    return any(marker in prefix.lower() for marker in UNCOND_MARKERS)


def _two_branch_prefixes(source, label: str, found: set[str], given) -> tuple[str, str] | None:
    """(cond prefix, uncond prefix) of a two-branch file, or None when the file holds one branch. Logs which prefix
    became which branch and why; a ModelFileError saying what was found when it cannot tell."""
    if given is not None:
        missing = [p for p in given if p not in found]
        if missing:
            raise ModelFileError(
                f"{label}: branch_prefixes {quote(given)} do not match this file: no {ARCH_TENSOR} under "
                f"{', '.join(quote(p) for p in missing)}. It has DiT tensors under {_listed(found)}.")
        pair, how = given, "as given by branch_prefixes"
    else:
        pair, how = _metadata_prefixes(source, label, found), "from its ideogram4.branch_prefixes metadata"
        if pair is None and len(found) == 2:
            marked = [p for p in found if _names_uncond(p)]
            if len(marked) == 1:
                pair, how = (next(p for p in found if p != marked[0]), marked[0]), "from the prefix names"
        if pair is None:
            if len(found) == 1:
                return None
            raise ModelFileError(
                f"{label}: found Ideogram 4 DiT tensors under the prefixes {_listed(found)} and cannot tell which is "
                "the conditional branch. Accepted without help: two prefixes of which exactly one names the "
                "unconditional branch (uncond, unconditional, negative), e.g. 'conditional_transformer.' + "
                "'unconditional_transformer.'. Otherwise say which is which with the branch prefixes option "
                "(branch_prefixes=(cond_prefix, uncond_prefix)).")
    # (%.80r: logging formats the prefixes, quoted and cut like `quote`, only when the line is written)
    logger.info("%s: conditional branch = %.80r*, unconditional branch = %.80r* (%s)", label, pair[0], pair[1], how)
    return pair


def _metadata_prefixes(source, label: str, found: set[str]) -> tuple[str, str] | None:
    """(cond, uncond) prefixes named by `ideogram4.branches` + `ideogram4.branch_prefixes`, when both are present
    and fit the file; metadata that does not fit is logged and ignored (the names still decide)."""
    metadata = getattr(source, "metadata", None) or {}
    roles, prefixes = metadata.get(layout.BRANCHES_KEY), metadata.get(layout.BRANCH_PREFIXES_KEY)
    if prefixes is None:
        return None
    if not (_is_str_list(roles) and _is_str_list(prefixes) and len(roles) == len(prefixes) == 2
            and sorted(roles) == sorted(BRANCH_ROLES)):
        problem = f"ideogram4.branches = {quote(roles)}, ideogram4.branch_prefixes = {quote(prefixes)}"
    elif not set(prefixes) <= found:
        problem = f"no {ARCH_TENSOR} under {', '.join(quote(p) for p in prefixes if p not in found)}"
    else:
        named = dict(zip(roles, prefixes))
        return named["conditional"], named["unconditional"]
    logger.warning("%s: ignoring its branch metadata (%s); telling the branches apart by their prefixes.", label,
                   problem)
    return None


def _metadata_role(source) -> str | None:
    """"conditional" / "unconditional" for a single-branch file whose `ideogram4.branches` says so."""
    roles = (getattr(source, "metadata", None) or {}).get(layout.BRANCHES_KEY)
    return roles[0] if _is_str_list(roles) and len(roles) == 1 and roles[0] in BRANCH_ROLES else None


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _listed(prefixes) -> str:
    shown = sorted(prefixes)
    text = ", ".join(quote(p, 60) for p in shown[:6])
    return text + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")


def _single_branch(source, label: str, role: str, prefixes: set[str] | None = None, prefix: str | None = None):
    prefixes = prefixes if prefixes is not None else _branch_prefixes(source, label)
    if prefix is not None and prefix not in prefixes:
        raise ModelFileError(f"{label}: the {role} branch prefix {quote(prefix)} given in branch_prefixes does not "
                             f"match this file: it has DiT tensors under {_listed(prefixes)}.")
    if prefix is None and len(prefixes) == 1:
        prefix = next(iter(prefixes))
    if prefix is not None:
        if prefix not in SINGLE_BRANCH_PREFIXES:
            logger.info("%s: %s branch under the prefix %s*", label, role, quote(prefix))
        return _official_names(source.with_prefix(prefix) if prefix else source), prefix
    if len(prefixes) == 2 and role == "unconditional":
        raise ModelFileError(f"{label} holds two DiT branches (prefixes {_listed(prefixes)}); as the unconditional "
                             "file, pass a single-branch file, or pass this file alone.")
    raise ModelFileError(
        f"{label}: found Ideogram 4 DiT tensors under the prefixes {_listed(prefixes)}, so it is not one "
        f"{role} branch; say which prefix to use with the branch prefixes option (branch_prefixes), or pick a "
        "file with one branch (bare names or one prefix such as 'model.diffusion_model.')."
    )


def _what_it_looks_like(source, keys: list[str]) -> str:
    arch = (getattr(source, "metadata", None) or {}).get("general.architecture")
    guesses = [what for fragment, what in OTHER_MODELS if any(fragment in k for k in keys)]
    parts = [f"e.g. {', '.join(quote(k, 60) for k in keys[:3])}" if keys else "the file is empty"]
    if arch:
        parts.append(f"general.architecture = {quote(arch)}")
    if guesses:
        parts.append(f"looks like {guesses[0]}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Name mapping: everything becomes the official fused names


def _official_names(source):
    """diffusers split attention names -> fused official names (quant_tools' `layout` rule); other layouts pass
    through unchanged."""
    names = layout.official_names(source.keys(), source.describe(), ModelFileError)
    if not names.split:
        return source
    renames = names.renames()
    renamed = source.renamed(lambda n: renames.get(n, n)) if renames else source
    return FusedAttentionWeights(renamed, names.fused) if names.fused else renamed


class FusedAttentionWeights(WeightSource):
    """A weight source whose diffusers `to_q/to_k/to_v` triples are seen as one fused `qkv`.

    `fused` maps each official qkv name to its stored part names in row order (`layout.official_names`). The fused
    weight is a new dense tensor (the only copy the loader makes; split-name files are bf16 releases, so this is a
    plain concatenation). Everything else is delegated to the wrapped `ops` source.
    """

    def __init__(self, base: WeightSource, fused: dict[str, tuple[str, ...]]):
        self.base = base
        self.path = base.describe()
        self.metadata = getattr(base, "metadata", {})
        self._parts = dict(fused)
        parts = {p for names in self._parts.values() for p in names}
        self._names = [n for n in base.keys() if n not in parts] + list(self._parts)

    def keys(self):
        return list(self._names)

    def shape(self, name):
        if name in self._parts:
            return layout.fused_shape(name, [self.base.shape(p) for p in self._parts[name]], self.path, ModelFileError)
        return self.base.shape(name)

    def storage(self, name):
        if name not in self._parts:
            return self.base.storage(name)
        storage = self.base.storage(self._parts[name][0])
        return "F32" if storage == FP8_STORAGE else storage  # fused fp8 parts come out scaled, i.e. dense

    def _dense(self, name, dtype, device):
        if name in self._parts:
            return torch.cat([self.base.tensor(p, dtype, device) for p in self._parts[name]], dim=layout.FUSED_AXIS)
        return self.base._dense(name, dtype, device)

    def packed(self, name):
        return None if name in self._parts else self.base.packed(name)


def fuse_split_attention(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same mapping on an in-memory state dict (diffusers model -> official names)."""
    names = layout.official_names(tensors, "the state dict", ModelFileError)
    fused = {official: tensors[stored] for official, stored in names.single.items()}
    for name, parts in names.fused.items():
        fused[name] = torch.cat([tensors[p] for p in parts], dim=layout.FUSED_AXIS)
    return fused


# An in-memory state dict as a weight source (tests, converted checkpoints).
StateDictWeights = StateDictSource


# ---------------------------------------------------------------------------------------------------------------
# Config


def _metadata_config(source, label: str) -> dict:
    """`ideogram4.<field>` keys of our GGUFs (any field of Ideogram4Config): field -> (value, where it is from),
    checked by `layout.config_from_shapes` unless config_overrides replaces it."""
    metadata = getattr(source, "metadata", None) or {}
    return {f: (metadata[layout.metadata_key(f)], f"{label}: its metadata {layout.metadata_key(f)}")
            for f in Ideogram4Config.field_names() if layout.metadata_key(f) in metadata}


def _folder_config(folder: Path) -> dict:
    """The settings of a diffusers `config.json` (official fp8 / bf16 releases ship one per branch)."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        return {}
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{config_file}: unreadable config.json ({quote(str(exc), 200)}). Download it "
                             "again.") from exc
    return layout.config_json_hints(raw, str(config_file), ModelFileError)


def _checked_overrides(overrides) -> dict:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ModelFileError(f"config_overrides must be a dict of Ideogram4Config fields, got {quote(overrides)}.")
    unknown = [k for k in overrides if k not in Ideogram4Config.field_names()]
    if unknown:
        raise ModelFileError(f"config_overrides: unknown field(s) {', '.join(quote(k) for k in unknown)}; the "
                             f"fields are {', '.join(Ideogram4Config.field_names())}.")
    return {k: layout.checked_value(k, v, f"config_overrides[{k!r}]", ModelFileError) for k, v in overrides.items()}


def _config_from_weights(source, hints: dict, overrides: dict, label: str, with_text: bool = True):
    """Config from the tensor shapes; metadata / config.json fill in the RoPE settings and are cross-checked
    (`layout.config_from_shapes`). Then every tensor the model reads is checked against the shape this config gives
    it (tensors it does not read, such as an unconditional branch's `llm_cond_*`, may be there)."""
    keys = source.keys()
    config = layout.config_from_shapes(source.shape, keys, label, hints=hints, overrides=overrides,
                                       with_text=with_text, config_class=Ideogram4Config,
                                       override_option="config_overrides")
    absent, _, wrong = layout.compare_tensors(keys, source.shape, config, with_text)
    if absent:
        total = len(config.tensor_shapes(with_text))
        raise ModelFileError(f"{label}: {len(absent)} of the {total} Ideogram 4 DiT tensors are missing "
                             f"(e.g. {', '.join(absent[:4])}); the file is incomplete or a different model.")
    if wrong:
        name, got, want = wrong[0]
        raise ModelFileError(f"{label}: {len(wrong)} tensor(s) do not have the shape this model needs (e.g. {name} is "
                             f"{got}, expected {want}); the file is corrupt or a different model.")
    return config


def _storage_counts(source, with_text: bool, config: Ideogram4Config) -> Counter:
    names = [n for n in config.tensor_shapes(with_text) if n.endswith(".weight")]
    return Counter(source.storage(n) for n in names)
