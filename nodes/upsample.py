"""Ideogram4 Prompt Upsample: a plain idea -> a JSON caption, written locally by the text encoder's Qwen3-VL weights
with a language-model head (no paid API); docs/prompts.md."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .. import pipeline
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY

FROM_ENCODER = "(from the text encoder)"


class IG4PromptUpsample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = comfy.model_files(comfy.TEXT_ENCODER_FOLDER)
        return io.Schema(
            node_id="IG4PromptUpsample",
            display_name="Ideogram4 Prompt Upsample",
            category=CATEGORY,
            search_aliases=["ideogram", "magic prompt", "prompt enhance", "upsample", "expand prompt"],
            description="Turns a short idea into the JSON caption Ideogram 4 follows best, locally: the Qwen3-VL text "
                        "encoder writes it with its language-model head (a llama.cpp Qwen3-VL GGUF or the Instruct "
                        "checkpoint carries one). The caption is repaired and validated; boxes are dropped, as the "
                        "official upsampler does. Connect the output to Qwen3-VL Encode's prompt.",
            inputs=[
                io.Combo.Input("text_encoder", display_name="encoder", options=files,
                               tooltip="A Qwen3-VL-8B text encoder with an lm_head (GGUF: output.weight), or any "
                                       "encoder plus the head below."),
                io.String.Input("idea", multiline=True, default="",
                                tooltip="A few words about the picture; quoted words become text in the image."),
                io.Int.Input("width", default=1024, min=pipeline.MIN_SIDE, max=pipeline.MAX_SIDE,
                             step=pipeline.PIXELS_PER_TOKEN,
                             tooltip="The image's width: the caption is written for this aspect ratio."),
                io.Int.Input("height", default=1024, min=pipeline.MIN_SIDE, max=pipeline.MAX_SIDE,
                             step=pipeline.PIXELS_PER_TOKEN,
                             tooltip="The image's height."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The sampling seed (another seed, another caption)."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="0: always the most likely words (the seed does nothing); higher: more varied."),
                io.Int.Input("max_tokens", default=1024, min=16, max=4096,
                             tooltip="At most this many tokens of reply (a caption takes 200-600)."),
                io.Combo.Input("lm_head", options=[FROM_ENCODER] + files, default=FROM_ENCODER,
                               tooltip="Where the language-model head comes from: the text encoder file itself, or "
                                       "a separate file (e.g. diffusers/qwen3-vl-8b-instruct-lm-head)."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The minified JSON caption.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, temperature=None, max_tokens=None):
        return validation.numbers(cls, temperature=temperature, max_tokens=max_tokens)

    @classmethod
    def execute(cls, text_encoder, idea, width=1024, height=1024, seed=0, temperature=0.7, max_tokens=1024,
                lm_head=FROM_ENCODER):
        path = comfy.model_path(comfy.TEXT_ENCODER_FOLDER, text_encoder)
        head = None if lm_head in (None, "", FROM_ENCODER) else comfy.model_path(comfy.TEXT_ENCODER_FOLDER, lm_head)
        progress = comfy.node_progress(cls.hidden.unique_id)
        result = pipeline.upsample(path, idea, width=width, height=height, seed=seed, max_new_tokens=max_tokens,
                                   temperature=temperature, lm_head_path=head,
                                   extra_search_dirs=comfy.comfy_tokenizer_dirs(), device=comfy.torch_device(),
                                   on_token=progress)
        lines = [result.prompt] + [f"warning: {w}" for w in result.warnings]
        return io.NodeOutput(result.prompt, ui=ui.PreviewText("\n".join(lines)))
