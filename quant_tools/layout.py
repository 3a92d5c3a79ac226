"""The Ideogram 4 DiT layout, torch-free and in one place: the configuration and its checks, the tensor table it
implies, the names other releases use, the QKV fusion rule, and the configuration read back from tensor shapes
(docs/spec.md §2.1-§2.2.1).

quant_tools uses it with numpy; the runtime imports it (models/dit.py re-exports `Ideogram4Config`,
models/dit_loader.py reads its files through it) and applies the fusion rule with torch. quant_tools may not import
the rest of the pack, so everything here raises `config_class.Error(message)`: `QuantToolError` for this module's
`Ideogram4Config`, the pack's `ModelFileError` for the runtime's subclass in models/dit.py.
"""

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from .errors import QuantToolError, quote

ARCH = "ideogram4"  # `general.architecture` of our files, and the prefix of our metadata keys
# The tensor whose presence identifies an Ideogram 4 DiT: no other model has it (docs/spec.md §2.2).
ARCH_TENSOR = "embed_image_indicator.weight"
# The text-conditioning tensors: the unconditional branch never reads them (docs/spec.md §2.2, §2.7).
TEXT_TENSOR_PREFIX = "llm_cond_"

# The two CFG branches: the role names our metadata uses (conditional first, the file order quant_tools writes),
# the official repos' folder per branch (docs/spec.md §6.1) and the tensor-name prefixes of our two-branch files
# (docs/spec.md §6.4).
BRANCH_ROLES = ("conditional", "unconditional")
BRANCH_FOLDERS = {"conditional": "transformer", "unconditional": "unconditional_transformer"}
BRANCH_PREFIXES = {"conditional": "conditional_transformer.", "unconditional": "unconditional_transformer."}


def branch_prefixes(names) -> set[str]:
    """The tensor-name prefixes of the DiT branches a file holds: every p ("" or ending in ".") such that p +
    ARCH_TENSOR is one of `names`. Other tools' files use other prefixes (`transformer.`, `cond.`,
    `model.diffusion_model.`, none), so the prefixes are found, never listed."""
    found = {name[: -len(ARCH_TENSOR)] for name in names if name.endswith(ARCH_TENSOR)}
    return {p for p in found if p == "" or p.endswith(".")}


@dataclass(frozen=True)
class Ideogram4Config:
    """Shape of one branch. The defaults are the published model (docs/spec.md §2.1); tests build tiny ones."""

    hidden_size: int = 4608
    num_layers: int = 34
    num_heads: int = 18
    head_dim: int = 256
    intermediate_size: int = 12288
    adaln_dim: int = 512
    in_channels: int = 128
    llm_features_dim: int = 53248
    # No tensor shape shows rope_theta or mrope_section: a file that does not state them gets these.
    rope_theta: float = 5_000_000.0
    # mrope_section[0] is never read: the T axis takes every frequency the H and W axes do not (docs/spec.md §2.5).
    mrope_section: tuple = (24, 20, 20)
    norm_eps: float = 1e-5
    origin: str = field(default="", compare=False, repr=False)  # where the values came from, for messages

    # What a config that cannot work (or a file that cannot give one) raises; models/dit.py's subclass says
    # ModelFileError.
    Error: ClassVar[type] = QuantToolError

    def __post_init__(self):
        problems = []
        if self.num_heads * self.head_dim != self.hidden_size:
            problems.append(f"num_heads {self.num_heads} x head_dim {self.head_dim} != hidden_size {self.hidden_size}")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} is odd")
        if len(self.mrope_section) != 3 or 3 * max(self.mrope_section[1:]) > self.head_dim // 2:
            problems.append(
                f"mrope_section {tuple(self.mrope_section)} does not fit head_dim {self.head_dim} "
                f"(3 x sections[1:] must be <= head_dim/2)"
            )
        if problems:
            raise self.Error("Inconsistent Ideogram 4 DiT config: " + "; ".join(problems) + ".")

    @classmethod
    def field_names(cls) -> tuple:
        """The model's settings (`origin` is bookkeeping, not a setting)."""
        return tuple(f.name for f in fields(cls) if f.name != "origin")

    def tensor_shapes(self, with_text: bool = True) -> dict:
        """Official fused name -> torch shape of one branch, in the order of docs/spec.md §2.2 (the order
        quant_tools writes). `with_text=False`: without the `llm_cond_*` tensors, which the unconditional branch
        never reads (files hold them in both branches)."""
        h, a, m = self.hidden_size, self.adaln_dim, self.intermediate_size
        shapes = {
            "input_proj.weight": (h, self.in_channels),
            "input_proj.bias": (h,),
            "llm_cond_norm.weight": (self.llm_features_dim,),
            "llm_cond_proj.weight": (h, self.llm_features_dim),
            "llm_cond_proj.bias": (h,),
            "t_embedding.mlp_in.weight": (h, h),
            "t_embedding.mlp_in.bias": (h,),
            "t_embedding.mlp_out.weight": (h, h),
            "t_embedding.mlp_out.bias": (h,),
            "adaln_proj.weight": (a, h),
            "adaln_proj.bias": (a,),
            ARCH_TENSOR: (2, h),
        }
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "attention_norm1.weight": (h,),
                p + "attention_norm2.weight": (h,),
                p + "ffn_norm1.weight": (h,),
                p + "ffn_norm2.weight": (h,),
                p + "attention.norm_q.weight": (self.head_dim,),
                p + "attention.norm_k.weight": (self.head_dim,),
                p + "attention.qkv.weight": (3 * h, h),  # q, k, v rows (docs/spec.md §2.2.1)
                p + "attention.o.weight": (h, h),
                p + "feed_forward.w1.weight": (m, h),
                p + "feed_forward.w3.weight": (m, h),
                p + "feed_forward.w2.weight": (h, m),
                p + "adaln_modulation.weight": (4 * h, a),
                p + "adaln_modulation.bias": (4 * h,),
            })
        shapes.update({
            "final_layer.linear.weight": (self.in_channels, h),
            "final_layer.linear.bias": (self.in_channels,),
            "final_layer.adaln_modulation.weight": (h, a),
            "final_layer.adaln_modulation.bias": (h,),
        })
        if not with_text:
            shapes = {name: shape for name, shape in shapes.items() if not name.startswith(TEXT_TENSOR_PREFIX)}
        return shapes

    def describe(self) -> str:
        return (
            f"hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads x {self.head_dim}, "
            f"MLP {self.intermediate_size}, AdaLN {self.adaln_dim}, in_channels {self.in_channels}, "
            f"text features {self.llm_features_dim}, rope_theta {self.rope_theta:g}, "
            f"mrope_section {list(self.mrope_section)}"
        )

    def differences(self, other) -> list:
        """"field: mine vs theirs" for every setting that differs (any two configs, whichever class)."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in self.field_names() if mine[k] != theirs[k]]


FULL_SIZE = Ideogram4Config(origin="Ideogram 4 release")


# ---------------------------------------------------------------------------------------------------------------
# Tensor table checks


def compare_tensors(names, shape_of, config, with_text: bool = True):
    """(missing, unexpected, wrong) of a branch whose official tensor names are `names` against the config's
    table; `wrong` lists (name, shape, expected shape). Each caller words its own message from these."""
    expected = config.tensor_shapes(with_text)
    present = set(names)
    missing = [name for name in expected if name not in present]
    unexpected = [name for name in names if name not in expected]
    wrong = [(name, tuple(shape_of(name)), shape) for name, shape in expected.items()
             if name in present and tuple(shape_of(name)) != shape]
    return missing, unexpected, wrong


# ---------------------------------------------------------------------------------------------------------------
# Names: diffusers' split attention -> the official fused names (docs/spec.md §2.2.1)

# The fused qkv weight is to_q, to_k and to_v stacked along FUSED_AXIS (rows), in this order; to_out.0 is o.
QKV_PARTS = ("to_q", "to_k", "to_v")
FUSED_AXIS = 0
_SPLIT_ATTENTION = re.compile(r"^(layers\.\d+\.attention\.)(to_q|to_k|to_v|to_out\.0)\.weight$")


@dataclass(frozen=True)
class OfficialNames:
    """Where each official tensor of a branch is stored: `single` maps an official name to the one stored name it
    is read from (itself, or `...to_out.0.weight` for `...o.weight`); `fused` maps each `...attention.qkv.weight`
    kept split to its stored (to_q, to_k, to_v) names, in row order."""

    single: dict
    fused: dict

    @property
    def split(self) -> bool:
        """Whether the branch uses diffusers' split attention names."""
        return bool(self.fused) or any(official != stored for official, stored in self.single.items())

    def renames(self) -> dict:
        """stored name -> official name for the tensors stored under another single name (to_out.0 -> o)."""
        return {stored: official for official, stored in self.single.items() if official != stored}


def official_names(names, where, error=QuantToolError) -> OfficialNames:
    """Map one branch's stored tensor names (any prefix already stripped) to the official fused names; an
    incomplete to_q/to_k/to_v triple, or an attention stored both ways, is an error naming `where`."""
    single, parts = {}, {}
    for name in names:
        m = _SPLIT_ATTENTION.match(name)
        if m is None:
            official = name
        elif m.group(2) == "to_out.0":
            official = m.group(1) + "o.weight"
        else:
            parts.setdefault(m.group(1) + "qkv.weight", {})[m.group(2)] = name
            continue
        if official in single:
            raise error(f"{where}: {quote(official)} is stored twice ({quote(single[official])} and {quote(name)}); "
                        "the file mixes the fused and the split attention names.")
        single[official] = name
    fused = {}
    for qkv, found in parts.items():
        if len(found) != len(QKV_PARTS):
            raise error(f"{where}: {qkv} needs to_q, to_k and to_v; found only "
                        f"{', '.join(quote(found[p]) for p in QKV_PARTS if p in found)}.")
        if qkv in single:
            raise error(f"{where}: {qkv[:-len('.qkv.weight')]} is stored both fused (qkv) and split "
                        "(to_q/to_k/to_v); the file mixes the two namings.")
        fused[qkv] = tuple(found[p] for p in QKV_PARTS)
    return OfficialNames(single, fused)


def fused_shape(name, part_shapes, where, error=QuantToolError) -> tuple:
    """The shape of fused `name` from its to_q/to_k/to_v shapes: 2-D parts of one width, rows added up."""
    part_shapes = [tuple(s) for s in part_shapes]
    if any(len(s) != 2 for s in part_shapes) or len({s[1] for s in part_shapes}) != 1:
        raise error(f"{where}: the to_q/to_k/to_v parts of {name} have shapes {part_shapes}; they must be 2-D "
                    "weights of one width.")
    return (sum(s[FUSED_AXIS] for s in part_shapes), part_shapes[0][1])


# ---------------------------------------------------------------------------------------------------------------
# Settings from files: our GGUF metadata, a config.json

# Our GGUF metadata (docs/quant_tools.md): `ideogram4.<field>` for every config field, with its GGUF value type,
# and the branch keys (roles in file order; their name prefixes, absent from single-branch files).
CONFIG_METADATA = {
    "hidden_size": "uint32", "num_layers": "uint32", "num_heads": "uint32", "head_dim": "uint32",
    "intermediate_size": "uint32", "adaln_dim": "uint32", "in_channels": "uint32", "llm_features_dim": "uint32",
    "rope_theta": "float32", "mrope_section": "uint32_array", "norm_eps": "float32",
}
BRANCHES_KEY = f"{ARCH}.branches"
BRANCH_PREFIXES_KEY = f"{ARCH}.branch_prefixes"


def metadata_key(name: str) -> str:
    return f"{ARCH}.{name}"


# config.json key -> config field, in the official `Ideogram4Config` and the diffusers `Ideogram4Transformer2DModel`
# spellings (docs/spec.md §2.1). The hidden size (diffusers) and the head width (official) are products that the
# tensor shapes give.
CONFIG_JSON_KEYS = {
    "emb_dim": "hidden_size", "num_heads": "num_heads", "adanln_dim": "adaln_dim",
    "attention_head_dim": "head_dim", "num_attention_heads": "num_heads", "adaln_dim": "adaln_dim",
    "num_layers": "num_layers", "intermediate_size": "intermediate_size", "in_channels": "in_channels",
    "llm_features_dim": "llm_features_dim", "rope_theta": "rope_theta", "mrope_section": "mrope_section",
    "norm_eps": "norm_eps",
}


def config_json_hints(data, where, error=QuantToolError) -> dict:
    """{field: (value, where it is from)} of a transformer `config.json` (already parsed), for `config_from_shapes`;
    {} for a JSON that is not an Ideogram 4 transformer config at all."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a JSON object, found {type(data).__name__}. Download it again.")
    class_name = data.get("_class_name", "")
    if not (isinstance(class_name, str) and "Ideogram4" in class_name) and "llm_features_dim" not in data:
        return {}
    if class_name and not (isinstance(class_name, str) and "Ideogram4" in class_name):
        raise error(f"{where} describes a {quote(class_name)}, not an Ideogram 4 transformer; put the config.json "
                    "that came with these weights beside them.")
    return {ours: (data[theirs], f"{where}: {theirs}") for theirs, ours in CONFIG_JSON_KEYS.items() if theirs in data}


# Config fields that are sizes, and their bound: no DiT dimension comes near it (the largest published one is the
# 53248 text features, docs/spec.md §2.1), and nothing bigger can be built.
SIZE_FIELDS = ("hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size", "adaln_dim", "in_channels",
               "llm_features_dim")
MAX_SIZE = 1 << 20


def checked_value(name, value, where, error=QuantToolError, advice=""):
    """A config value from metadata, a config.json or a caller, in its Python type; an error saying `where` it came
    from, what it is and what it should be otherwise (then `advice`)."""
    def bad(expected):
        return error(f"{where} is {quote(value)}; expected {expected}.{advice}")

    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def is_real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if name in SIZE_FIELDS:
        if not is_int(value) or not 1 <= value <= MAX_SIZE:
            raise bad(f"an integer from 1 to {MAX_SIZE}")
        return int(value)
    if name == "rope_theta":
        if not is_real(value) or not value > 1:
            raise bad("a finite number above 1 (the published model uses 5e6)")
        return float(value)
    if name == "norm_eps":
        if not is_real(value) or not 0 < value < 1:
            raise bad("a number between 0 and 1 (the published model uses 1e-5)")
        return float(value)
    if name == "mrope_section":
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(is_int(v) and 0 <= v <= MAX_SIZE for v in value)):
            raise bad("three non-negative integers (the published model uses (24, 20, 20))")
        return tuple(int(v) for v in value)
    raise error(f"{where}: {quote(name)} is not an Ideogram 4 DiT setting.")


# ---------------------------------------------------------------------------------------------------------------
# The configuration of a branch from its tensor shapes

# The tensors the sizes are read from, with their rank: (name, rank, read only when the branch has text modules).
SHAPE_TENSORS = (("input_proj.weight", 2, False), ("adaln_proj.weight", 2, False),
                 ("layers.0.attention.norm_q.weight", 1, False), ("layers.0.feed_forward.w1.weight", 2, False),
                 ("llm_cond_norm.weight", 1, True))
_LAYER_INDEX = re.compile(r"^layers\.(\d{1,6})\.")  # a longer index is no layer (int() refuses 4300+ digits)


def config_from_shapes(shape_of, names, where, *, hints=None, overrides=None, with_text=True,
                       config_class=Ideogram4Config, override_option=None, origin="tensor shapes"):
    """The configuration of one branch from its tensor shapes (official names; `shape_of(name)` gives a shape).

    hints: {field: (value, where it is from)} read from the file (GGUF metadata, a config.json): each is checked,
    fills in what no shape shows (the RoPE settings, norm_eps) and must agree with what the shapes show.
    overrides: {field: value}, already checked (`checked_value`), win over both. with_text=False: the branch has no
    `llm_cond_*` tensors to read the text width from (pass it in overrides). override_option: the name of the
    caller's override option, for the advice in messages. The tensor table itself is checked by `compare_tensors`.
    """
    error, hints, overrides = config_class.Error, hints or {}, overrides or {}
    names = set(names)
    required = [name for name, _, text_only in SHAPE_TENSORS if with_text or not text_only]
    missing = [name for name in required if name not in names]
    if missing:
        raise error(f"{where}: the Ideogram 4 DiT tensors {missing} are missing; the file is incomplete or not an "
                    "Ideogram 4 DiT.")
    shapes = {name: tuple(shape_of(name)) for name in required}
    for name, rank, _ in SHAPE_TENSORS:
        if name in shapes and (len(shapes[name]) != rank or 0 in shapes[name]):
            raise error(f"{where}: {name} has shape {shapes[name]}, expected {rank} non-zero dimension(s); the file "
                        "is corrupt or not an Ideogram 4 DiT.")
    hidden, in_channels = shapes["input_proj.weight"]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0]
    if hidden % head_dim:
        raise error(f"{where}: the attention norm width {head_dim} does not divide the hidden size {hidden}; the "
                    "file is corrupt or not an Ideogram 4 DiT.")
    from_shapes = dict(
        hidden_size=hidden,
        in_channels=in_channels,
        num_layers=len({int(m.group(1)) for name in names if (m := _LAYER_INDEX.match(name))}),
        head_dim=head_dim,
        num_heads=hidden // head_dim,
        intermediate_size=shapes["layers.0.feed_forward.w1.weight"][0],
        adaln_dim=shapes["adaln_proj.weight"][0],
    )
    if with_text:
        from_shapes["llm_features_dim"] = shapes["llm_cond_norm.weight"][0]
    for name, value in from_shapes.items():
        if value > MAX_SIZE:
            raise error(f"{where}: the tensors give {name} = {value}, beyond any Ideogram 4 DiT (at most {MAX_SIZE}); "
                        "the file is corrupt.")

    damaged = " The file's settings are damaged: download it again" + (
        f", or pass {override_option} with the right value." if override_option else ".")
    checked = {name: (checked_value(name, value, hint_where, error, damaged), hint_where)
               for name, (value, hint_where) in hints.items() if name not in overrides}
    disagree = [(name, value, hint_where) for name, (value, hint_where) in checked.items()
                if name in from_shapes and value != from_shapes[name]]
    if disagree:
        name, value, hint_where = disagree[0]
        every = "; ".join(f"{n}: {v} vs {from_shapes[n]}" for n, v, _ in disagree)
        raise error(f"{hint_where} disagrees with the tensor shapes ({every}): it says {name} = {value} but the "
                    f"tensors have {from_shapes[name]}; the settings do not belong to these weights.")
    values = {**{k: v for k, (v, _) in checked.items() if k not in from_shapes}, **from_shapes, **overrides}
    try:
        return config_class(**values, origin=origin)
    except error as exc:
        fix = (f"pass {override_option} (e.g. mrope_section) for a non-standard model" if override_option else
               "put the model's config.json (with its mrope_section) beside the weights")
        raise error(f"{where}: {exc} The file does not say its RoPE settings; {fix}.") from exc
