"""Ideogram4 LoRA: a LoRA file on our DiT pair (beside the packed weights, nothing merged); chainable."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from .. import pipeline
from ..errors import ModelFileError
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY, Ideogram4Model

# Read LoRA files by (path, mtime): chaining or re-running a graph does not read a file twice.
_read: dict = {}


class IG4LoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4LoraLoader",
            display_name="Ideogram4 LoRA",
            category=CATEGORY,
            search_aliases=["ideogram", "lora", "load lora"],
            description="Applies a LoRA to the Ideogram 4 DiT pair from Ideogram4 Q4_K Loader: ai-toolkit / kohya, "
                        "diffusers / PEFT and OneTrainer files, fused or split attention names. The low-rank update "
                        "runs beside the quantized weights (nothing is re-quantized or merged) in every memory mode. "
                        "Chain several; a negative strength subtracts.",
            inputs=[
                Ideogram4Model.Input("model", tooltip="From Ideogram4 Q4_K Loader or another Ideogram4 LoRA."),
                io.Combo.Input("lora_name", display_name="lora", options=comfy.model_files(comfy.LORA_FOLDER),
                               tooltip="A LoRA for Ideogram 4 in models/loras (.safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How much of the LoRA: 1 = as trained, 0 = off, negative = the opposite."),
                io.Combo.Input("branch", options=list(pipeline.BRANCH_CHOICES), default="auto",
                               tooltip="Which DiT it patches. auto: the branch the file was trained for (its key "
                                       "prefix or file name says 'uncond'; else the conditional one, as most LoRAs); "
                                       "cond / uncond: that branch; both: both branches."),
            ],
            outputs=[Ideogram4Model.Output(display_name="model", tooltip="The DiT pair with the LoRA, for Ideogram4 "
                                                                         "Sampler or another Ideogram4 LoRA.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        return comfy.file_fingerprint(comfy.LORA_FOLDER, lora_name)

    @classmethod
    def validate_inputs(cls, strength=None, branch=None):
        if branch is not None and branch not in pipeline.BRANCH_CHOICES:
            return f"branch must be one of {', '.join(pipeline.BRANCH_CHOICES)}, got {branch!r}"
        return validation.numbers(cls, strength=strength)

    @classmethod
    def execute(cls, model, lora_name, strength=1.0, branch="auto"):
        if not isinstance(model, pipeline.Ideogram4Model):
            raise ModelFileError("Ideogram4 LoRA takes the model of Ideogram4 Q4_K Loader (for core MODELs use "
                                 "ComfyUI's Load LoRA, which reads the same formats on them).")
        path = comfy.model_path(comfy.LORA_FOLDER, lora_name)
        file_branch = branch if branch in ("cond", "uncond") else "auto"
        key = (path, os.path.getmtime(path), file_branch)
        lora = _read.get(key)
        if lora is None:
            lora = pipeline.read_lora(path, branch=file_branch)
            _read.clear()  # one file at a time: LoRA factors can be hundreds of MB
            _read[key] = lora
        result = model.with_lora(lora, float(strength), "both" if branch == "both" else "auto")
        applied = result.loras[len(model.loras):]
        lines = [f"{len(lora.terms)} LoRA tensors matched ({lora.style}); strength {strength:g} on "
                 f"{' + '.join(a.branch for a in applied)} ({lora.branch_reason})"]
        if lora.unmatched:
            lines.append(f"warning: {len(lora.unmatched)} keys name no Ideogram 4 layer and were skipped, e.g. "
                         f"{lora.unmatched[0][:80]}")
        return io.NodeOutput(result, ui=ui.PreviewText("\n".join(lines)))
