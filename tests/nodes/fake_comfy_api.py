"""A small stand-in for ComfyUI's `comfy_api.latest` (V3 node API), so the node modules import and execute
without ComfyUI. It records schemas in the shape ComfyUI's /object_info reports them (checked against a real
ComfyUI 0.29 by tests/comfyui/test_real_comfyui.py), so workflow JSONs can be validated against it.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field


@dataclass
class _Input:
    id: str
    io_type: str
    options: dict = field(default_factory=dict)
    optional: bool = False

    def __getattr__(self, name):  # min / max of number inputs, as attributes like the real io.Int / io.Float
        if name in ("min", "max") and self.io_type in ("INT", "FLOAT") and name in self.options:
            return self.options[name]
        raise AttributeError(name)

    @property
    def is_widget(self):
        return self.io_type in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class _Type:
    io_type = ""

    @classmethod
    def Input(cls, id, display_name=None, optional=False, tooltip=None, **options):
        if cls.io_type == "COMBO" and "options" not in options:
            raise TypeError("Combo.Input needs options")
        options = {k: v for k, v in dict(tooltip=tooltip, **options).items() if v is not None}
        return _Input(id, cls.io_type, options, optional)

    @classmethod
    def Output(cls, id=None, display_name=None, tooltip=None, is_output_list=False):
        return types.SimpleNamespace(io_type=cls.io_type, display_name=display_name, tooltip=tooltip)


def _socket(name):
    return type(name, (_Type,), {"io_type": name})


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    search_aliases: list = field(default_factory=list)
    is_deprecated: bool = False

    def object_info(self):
        """The node's entry as /object_info reports it (input sections, input_order, outputs)."""
        sections = {"required": {}, "optional": {}}
        for item in self.inputs:
            sections["optional" if item.optional else "required"][item.id] = [item.io_type, dict(item.options)]
        info = {"input": {k: v for k, v in sections.items() if v},
                "input_order": {k: list(v) for k, v in sections.items() if v},
                "output": [o.io_type for o in self.outputs],
                "output_name": [o.display_name for o in self.outputs],
                "name": self.node_id, "display_name": self.display_name, "category": self.category,
                "description": self.description, "output_node": self.is_output_node}
        return info


class _Hidden:
    unique_id = "UNIQUE_ID"


class ComfyNode:
    hidden = types.SimpleNamespace(unique_id="fake-node")

    @classmethod
    def GET_SCHEMA(cls):
        return cls.define_schema()


class NodeOutput:
    def __init__(self, *values, ui=None, **kwargs):
        self.args = values
        self.ui = ui


class PreviewText:
    def __init__(self, text):
        self.text = text

    def as_dict(self):
        return {"text": (self.text,)}


class ComfyExtension:
    async def on_load(self):
        pass


def install():
    """Register the fake as `comfy_api.latest` unless a real ComfyUI is importable."""
    try:
        import comfy_api.latest  # noqa: F401
        return False
    except ImportError:
        pass
    io = types.ModuleType("comfy_api.latest.io")
    io.Schema, io.ComfyNode, io.NodeOutput, io.Hidden = Schema, ComfyNode, NodeOutput, _Hidden
    for name, io_type in (("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"),
                          ("Combo", "COMBO"), ("Latent", "LATENT"), ("Image", "IMAGE"), ("Model", "MODEL"),
                          ("Conditioning", "CONDITIONING"), ("Sigmas", "SIGMAS"), ("Guider", "GUIDER"),
                          ("Noise", "NOISE")):
        setattr(io, name, _socket(io_type))
    io.Custom = _socket
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewText = PreviewText
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    package = types.ModuleType("comfy_api")
    package.latest = latest
    sys.modules.update({"comfy_api": package, "comfy_api.latest": latest})
    return True
