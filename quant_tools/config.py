"""The Ideogram 4 DiT configuration: from config.json or tensor shapes, the tensor table it implies, GGUF keys.

Tensor names and shapes: docs/spec.md §2.2 (official fused names, 458 tensors per branch at full size).
The configuration is never assumed to be full size: tests use tiny random models with the same structure.
"""

import re
from dataclasses import asdict, dataclass, field

from .errors import QuantToolError

# Values of the released model (docs/spec.md §2.1); rope_theta and mrope_section cannot be read from tensor
# shapes, so a source without config.json gets these.
DEFAULT_ROPE_THETA = 5_000_000.0
DEFAULT_MROPE_SECTION = (24, 20, 20)
DEFAULT_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Ideogram4Config:
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    adaln_dim: int
    in_channels: int
    llm_features_dim: int
    rope_theta: float = DEFAULT_ROPE_THETA
    mrope_section: tuple = DEFAULT_MROPE_SECTION
    norm_eps: float = DEFAULT_NORM_EPS
    origin: str = field(default="", compare=False)  # where the values came from, for messages

    def tensor_shapes(self):
        """Official fused name -> torch shape, in the order the GGUF file lists them."""
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
            "embed_image_indicator.weight": (2, h),
        }
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update(
                {
                    p + "attention_norm1.weight": (h,),
                    p + "attention_norm2.weight": (h,),
                    p + "ffn_norm1.weight": (h,),
                    p + "ffn_norm2.weight": (h,),
                    p + "attention.norm_q.weight": (self.head_dim,),
                    p + "attention.norm_k.weight": (self.head_dim,),
                    p + "attention.qkv.weight": (3 * h, h),
                    p + "attention.o.weight": (h, h),
                    p + "feed_forward.w1.weight": (m, h),
                    p + "feed_forward.w3.weight": (m, h),
                    p + "feed_forward.w2.weight": (h, m),
                    p + "adaln_modulation.weight": (4 * h, a),
                    p + "adaln_modulation.bias": (4 * h,),
                }
            )
        shapes.update(
            {
                "final_layer.linear.weight": (self.in_channels, h),
                "final_layer.linear.bias": (self.in_channels,),
                "final_layer.adaln_modulation.weight": (h, a),
                "final_layer.adaln_modulation.bias": (h,),
            }
        )
        return shapes

    def describe(self):
        return (
            f"hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads x {self.head_dim}, "
            f"MLP {self.intermediate_size}, AdaLN {self.adaln_dim}, in_channels {self.in_channels}, "
            f"text features {self.llm_features_dim}, rope_theta {self.rope_theta:g}, "
            f"mrope_section {list(self.mrope_section)}"
        )

    def differences(self, other):
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if k != "origin" and mine[k] != theirs[k]]


FULL_SIZE = Ideogram4Config(4608, 34, 18, 256, 12288, 512, 128, 53248, origin="Ideogram 4 release")

# GGUF metadata: key suffix under "ideogram4." -> config field, gguf value kind
METADATA_KEYS = {
    "hidden_size": ("hidden_size", "uint32"),
    "num_layers": ("num_layers", "uint32"),
    "num_heads": ("num_heads", "uint32"),
    "head_dim": ("head_dim", "uint32"),
    "intermediate_size": ("intermediate_size", "uint32"),
    "adaln_dim": ("adaln_dim", "uint32"),
    "in_channels": ("in_channels", "uint32"),
    "llm_features_dim": ("llm_features_dim", "uint32"),
    "rope_theta": ("rope_theta", "float32"),
    "mrope_section": ("mrope_section", "uint32_array"),
    "norm_eps": ("norm_eps", "float32"),
}


def config_from_json(data, origin):
    """From a diffusers `transformer/config.json` (the official repos use diffusers keys) or official keys."""
    class_name = data.get("_class_name", "")
    if class_name and "Ideogram4" not in class_name:
        raise QuantToolError(f"{origin} describes a {class_name}, not an Ideogram 4 transformer")
    try:
        if "attention_head_dim" in data:  # diffusers Ideogram4Transformer2DModel
            head_dim, heads = int(data["attention_head_dim"]), int(data["num_attention_heads"])
            hidden, adaln = head_dim * heads, int(data["adaln_dim"])
        else:  # official Ideogram4Config
            hidden, heads = int(data["emb_dim"]), int(data["num_heads"])
            head_dim, adaln = hidden // heads, int(data["adanln_dim"])
        return Ideogram4Config(
            hidden_size=hidden,
            num_layers=int(data["num_layers"]),
            num_heads=heads,
            head_dim=head_dim,
            intermediate_size=int(data["intermediate_size"]),
            adaln_dim=adaln,
            in_channels=int(data["in_channels"]),
            llm_features_dim=int(data["llm_features_dim"]),
            rope_theta=float(data.get("rope_theta", DEFAULT_ROPE_THETA)),
            mrope_section=tuple(int(v) for v in data.get("mrope_section", DEFAULT_MROPE_SECTION)),
            norm_eps=float(data.get("norm_eps", DEFAULT_NORM_EPS)),
            origin=origin,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantToolError(f"{origin}: not a usable Ideogram 4 transformer config ({exc!r} missing or bad)") from None


_LAYER = re.compile(r"^layers\.(\d+)\.")


def config_from_shapes(shapes, origin):
    """Derive the configuration from tensor shapes (official fused names). rope values get the release defaults."""
    needed = ["input_proj.weight", "llm_cond_norm.weight", "adaln_proj.weight", "layers.0.attention.norm_q.weight",
              "layers.0.feed_forward.w1.weight"]
    missing = [name for name in needed if name not in shapes]
    if missing:
        raise QuantToolError(f"{origin}: cannot derive the Ideogram 4 config, missing {', '.join(missing)}")
    hidden, in_channels = shapes["input_proj.weight"]
    head_dim = shapes["layers.0.attention.norm_q.weight"][0]
    if head_dim <= 0 or hidden % head_dim:
        raise QuantToolError(f"{origin}: hidden size {hidden} is not a multiple of the head dim {head_dim}")
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    return Ideogram4Config(
        hidden_size=hidden,
        num_layers=max(layers) + 1,
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        intermediate_size=shapes["layers.0.feed_forward.w1.weight"][0],
        adaln_dim=shapes["adaln_proj.weight"][0],
        in_channels=in_channels,
        llm_features_dim=shapes["llm_cond_norm.weight"][0],
        origin=origin,
    )


def check_tensors(shapes, config, where):
    """Raise QuantToolError unless `shapes` (official name -> shape) is exactly the config's tensor table."""
    expected = config.tensor_shapes()
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    wrong = [f"{name}: {tuple(shapes[name])} (expected {expected[name]})"
             for name in expected if name in shapes and tuple(shapes[name]) != expected[name]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_some(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape(s) disagree with the config: {_some(wrong)}")
    if problems:
        raise QuantToolError(
            f"{where} is not a complete Ideogram 4 transformer with config ({config.describe()}; from "
            f"{config.origin}): " + "; ".join(problems)
        )


def _some(items, limit=6):
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
