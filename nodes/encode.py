"""Qwen3-VL Encode: prompt -> the text encoder's taps (IDEOGRAM4_CONDITIONING)."""

from __future__ import annotations

import os

from comfy_api.latest import io, ui

from .. import pipeline
from ..errors import Ideogram4Error, ModelFileError
from . import comfy_adapter as comfy
from . import validation
from .types import CATEGORY, DTYPES, Ideogram4Conditioning

TOKENIZER_SOURCES = ["auto", "comfyui"]
# Encoders asked to stay loaded, by (file, mtime, dtype, device); ComfyUI's "Unload models" empties it.
_kept: dict = {}


class IG4TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IG4TextEncode",
            display_name="Qwen3-VL Encode",
            search_aliases=["ideogram", "clip text encode", "text encode", "prompt", "qwen"],
            category=CATEGORY,
            description="Encodes the prompt with the Qwen3-VL-8B text encoder Ideogram 4 uses (13 hidden-state taps). "
                        "Best with a JSON caption (see Ideogram4 JSON Prompt); plain text works with a warning. The "
                        "encoder is loaded, run and freed unless keep_loaded is on.",
            inputs=[
                io.Combo.Input("text_encoder", display_name="encoder",
                               options=comfy.model_files(comfy.TEXT_ENCODER_FOLDER),
                               tooltip="From models/text_encoders (or models/clip): a Qwen3-VL-8B GGUF (Q4_K_M "
                                       "needs ~4.5 GB), ComfyUI's qwen3vl_8b_fp8_scaled.safetensors, or the base "
                                       "repo's text_encoder (pick any shard)."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="A minified JSON caption (recommended) or plain text; at most 2048 tokens "
                                        "with the chat template."),
                io.Combo.Input("tokenizer", options=TOKENIZER_SOURCES, default="auto",
                               tooltip="auto: the vocabulary inside a GGUF, else a tokenizer.json / tokenizer/ "
                                       "folder beside the encoder, else ComfyUI's bundled Qwen tokenizer. comfyui: "
                                       "always ComfyUI's bundled one."),
                io.Combo.Input("compute_dtype", options=DTYPES, default="auto",
                               tooltip="auto: bf16 on recent GPUs, fp16 on older ones, fp32 on the CPU."),
                io.Boolean.Input("keep_loaded", default=True,
                                 tooltip="On: the encoder stays loaded for the next prompt while memory allows: "
                                         "ComfyUI releases it when another model (the DiT) needs the room, and Unload "
                                         "Models frees it. Editing the prompt then does not reload 8 GB. Off: freed "
                                         "right after encoding (the lowest memory, a reload every time)."),
                io.Boolean.Input("strict_json", default=False,
                                 tooltip="Refuse prompts that are not a valid Ideogram 4 JSON caption instead of "
                                         "warning."),
                io.Boolean.Input("truncate", default=False,
                                 tooltip="Cut prompts longer than 2048 tokens (with a warning) instead of failing."),
            ],
            outputs=[Ideogram4Conditioning.Output(display_name="conditioning",
                                                  tooltip="The encoded prompt, for Ideogram4 Sampler."),
                     io.Conditioning.Output(display_name="core_conditioning",
                                            tooltip="The same prompt as a core CONDITIONING (13 taps interleaved, "
                                                    "53248 features per token), for core graphs: Ideogram4 Guider, "
                                                    "Dual Model CFG Guider, ...")],
        )

    @classmethod
    def validate_inputs(cls, text_encoder=None, prompt=None, tokenizer=None, strict_json=None, truncate=None):
        """The encoder file's header, and (when the prompt is typed in, not linked) its length and, in strict mode,
        that it is a caption: refused at queue time, before the 8 GB encoder loads."""
        if tokenizer is not None and tokenizer not in TOKENIZER_SOURCES:
            return f"tokenizer must be one of {', '.join(TOKENIZER_SOURCES)}, got {tokenizer!r}"
        checked = validation.model_file(comfy.TEXT_ENCODER_FOLDER, text_encoder, pipeline.check_text_encoder_file)
        if checked is not True or not isinstance(prompt, str):
            return checked
        if not prompt.strip():
            return "The prompt is empty. Write a description, ideally a JSON caption (see Ideogram4 JSON Prompt)."
        try:
            tok = _queue_tokenizer(text_encoder, tokenizer or "auto")
            pipeline.check_prompt_length(tok, prompt, strict=bool(strict_json), truncate=bool(truncate))
        except Ideogram4Error as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, text_encoder, **_):
        return comfy.file_fingerprint(comfy.TEXT_ENCODER_FOLDER, text_encoder)

    @classmethod
    def execute(cls, text_encoder, prompt, tokenizer="auto", compute_dtype="auto", keep_loaded=True,
                strict_json=False, truncate=False):
        path = comfy.model_path(comfy.TEXT_ENCODER_FOLDER, text_encoder)
        device = comfy.torch_device()
        key = (path, os.path.getmtime(path), compute_dtype, str(device))
        encoder = _kept.get(key)
        if encoder is None:
            encoder = pipeline.load_encoder(path, compute_dtype=compute_dtype, device=device)
        try:
            comfy_dirs = comfy.comfy_tokenizer_dirs()
            if tokenizer == "comfyui":
                if not comfy_dirs:
                    raise ModelFileError("ComfyUI's bundled Qwen tokenizer (comfy/text_encoders/qwen25_tokenizer) "
                                         "was not found; use tokenizer 'auto'.")
                tok = pipeline.load_tokenizer(tokenizer_source=comfy_dirs[0])
            else:
                tok = pipeline.load_tokenizer(path, encoder=encoder, extra_search_dirs=comfy_dirs)
            conditioning = pipeline.encode_text(encoder, tok, prompt, strict=strict_json, truncate=truncate)
        finally:
            if keep_loaded and key not in _kept:
                _kept[key] = encoder
                comfy.keep_loaded(encoder, device, on_unload=lambda: _forget(key))
            elif not keep_loaded:
                _kept.pop(key, None)
                pipeline.unload_text_encoder(encoder)
        lines = [f"{conditioning.token_count} tokens"] + [f"warning: {w}" for w in conditioning.warnings]
        return io.NodeOutput(conditioning, core_conditioning(conditioning), ui=ui.PreviewText("\n".join(lines)))


def core_conditioning(conditioning) -> list:
    """Our TextConditioning as core's CONDITIONING: [[(1, tokens, 13 * hidden) float32 taps, {}]]. One prompt, no
    padding, so no attention mask (core's model passes one on only when something is padded)."""
    return [[conditioning.text_taps.unsqueeze(0), {}]]


_tokenizers: dict = {}


def _queue_tokenizer(text_encoder, source):
    """The tokenizer `execute` will use, cached by file: the length check at queue time costs one read."""
    path = comfy.model_path(comfy.TEXT_ENCODER_FOLDER, text_encoder)
    key = (path, os.path.getmtime(path), source)
    if key not in _tokenizers:
        _tokenizers.clear()
        comfy_dirs = comfy.comfy_tokenizer_dirs()
        if source == "comfyui":
            if not comfy_dirs:
                raise ModelFileError("ComfyUI's bundled Qwen tokenizer (comfy/text_encoders/qwen25_tokenizer) was not "
                                     "found; use tokenizer 'auto'.")
            _tokenizers[key] = pipeline.load_tokenizer(tokenizer_source=comfy_dirs[0])
        else:
            _tokenizers[key] = pipeline.load_tokenizer(path, extra_search_dirs=comfy_dirs)
    return _tokenizers[key]


def _forget(key):
    encoder = _kept.pop(key, None)
    if encoder is not None:
        pipeline.unload_text_encoder(encoder)
