"""Ideogram4 JSON Prompt: build and validate a structured caption; outputs the minified string."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .. import pipeline
from .types import CATEGORY

STYLES = ["none", "photo", "art"]


class IG4JsonPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4JsonPrompt",
            display_name="Ideogram4 JSON Prompt",
            search_aliases=["ideogram", "json prompt", "caption", "prompt builder"],
            category=CATEGORY,
            description="Builds the minified JSON caption Ideogram 4 was trained on (high-level description, style, "
                        "background, elements with optional boxes and palettes) and checks it; problems are shown "
                        "on the node. Connect the output to Qwen3-VL Encode's prompt.",
            inputs=[
                io.String.Input("high_level_description", multiline=True, default="",
                                tooltip="One or two sentences about the whole image (recommended)."),
                io.String.Input("background", multiline=True, default="",
                                tooltip="The background / setting (required)."),
                io.String.Input("elements", multiline=True, default="",
                                tooltip="One element per line: 'text | HELLO | bold red letters | y1,x1,y2,x2 | "
                                        "#FF0000' or 'obj | a red cube | y1,x1,y2,x2'. Boxes on a 0..1000 grid per "
                                        "axis, top-left origin; box and palette optional. A JSON list works too."),
                io.Combo.Input("style", options=STYLES, default="none",
                               tooltip="photo: a photograph (fill 'photo'); art: anything else (fill 'art_style'); "
                                       "none: no style block."),
                io.String.Input("aesthetics", default="", tooltip="Style: overall aesthetics."),
                io.String.Input("lighting", default="", tooltip="Style: lighting."),
                io.String.Input("medium", default="", tooltip="Style: medium (photograph, oil painting, 3D render...)."),
                io.String.Input("photo_or_art_style", default="",
                                tooltip="Style: camera/lens/film for photo, or the art style for art."),
                io.String.Input("color_palette", default="",
                                tooltip="Style palette: up to 16 colours as #RRGGBB, comma separated."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The minified JSON caption.")],
        )

    @classmethod
    def execute(cls, high_level_description, background, elements, style="none", aesthetics="", lighting="",
                medium="", photo_or_art_style="", color_palette=""):
        text, issues = pipeline.caption_from_form(high_level_description, background, elements, style, aesthetics,
                                                  lighting, medium, photo_or_art_style, color_palette)
        report = "\n".join([f"{i.severity}: {i}" for i in issues] or ["caption OK"])
        return io.NodeOutput(text, ui=ui.PreviewText(report + "\n\n" + text))
