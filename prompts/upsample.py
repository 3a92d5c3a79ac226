"""Local prompt upsampling: a short idea -> a JSON caption, written by the text encoder's own Qwen3-VL weights.

The head-less text encoder becomes a language model again with an lm_head the user supplies (the stock
Qwen3-VL-8B-Instruct head, diffusers' `qwen3-vl-8b-instruct-lm-head`, or the `output.weight` of a llama.cpp
Qwen3-VL GGUF). Generation is KV-cached, greedy or seeded nucleus sampling, and stops at `<|im_end|>`. The
reply is parsed (first JSON object), repaired and validated against the caption schema; if nothing usable
comes out, a minimal caption built from the idea is returned with a warning.

The instruction prompt below is this pack's own.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import ModelFileError, PromptError
from . import caption as captions

logger = logging.getLogger(__name__)

UPSAMPLE_INSTRUCTION = """You write image captions for a text-to-image model. The user gives a short idea; you answer with one JSON object that describes the finished picture, on a single line, with no markdown fences and no words before or after it.

Keys, in this order:
1. "high_level_description": one sentence (at most 40 words) that names the main subject first and then the medium, e.g. "A red vintage bicycle leaning on a canal railing, a daylight street photograph."
2. "style_description" (optional): {"aesthetics": "...", "lighting": "...", "photo": "..." or "art_style": "...", "medium": "...", "color_palette": ["#RRGGBB", ...]}. Use "photo" (camera, lens, film) only for photographs and "art_style" for everything else, never both. At most 16 colours, upper-case hex.
3. "compositional_deconstruction": {"background": "...", "elements": [...]}.
   - "background": everything behind the subjects: place, ground, sky or walls, weather, light; for flat designs just the backdrop colour or texture.
   - "elements": the things in the picture, most important first. An object is {"type": "obj", "bbox": [y_min, x_min, y_max, x_max], "desc": "..."}; a piece of visible writing is {"type": "text", "bbox": [...], "text": "exact characters", "desc": "font, size, colour, placement"}. An element may end with "color_palette" (at most 5 colours).
   - "bbox" uses a 0 to 1000 grid on each axis, origin at the top left, y before x.

Rules:
- Keep every subject, name and quoted phrase of the idea. Quoted words become "text" elements, copied character for character, in the original language.
- One subject is one element; describe its parts inside its "desc" (20 to 50 words: what it is, colour, material, shape, pose, where it sits in the frame).
- Choose concrete values: one colour, one count, one style. Do not hedge with "or", "various" or "such as".
- Add nothing the idea did not ask for beyond what the scene naturally needs.
- Output valid JSON: double quotes, no trailing commas, no comments.

Example.
Idea: a lighthouse poster that says "NORTH COAST"
{"high_level_description":"A lighthouse on a rocky headland, a flat screen-printed travel poster.","style_description":{"aesthetics":"clean, graphic, calm","lighting":"flat even colour with no shading","medium":"screen print","art_style":"mid-century travel poster","color_palette":["#1D3557","#F1FAEE","#E63946","#A8DADC"]},"compositional_deconstruction":{"background":"A pale aqua sky over a navy sea with three simple wave bands, filling the whole poster.","elements":[{"type":"obj","bbox":[180,380,760,620],"desc":"A white lighthouse with two red horizontal stripes and a black lantern room, standing upright on a dark navy rocky headland in the centre of the poster, drawn as flat shapes."},{"type":"text","bbox":[800,120,930,880],"text":"NORTH COAST","desc":"Bold condensed sans-serif capitals in off-white, centred along the bottom of the poster with wide letter spacing."}]}}"""

USER_TEMPLATE = "Image aspect ratio (width:height): {aspect_ratio}\nIdea: {idea}"

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def upsample_chat(idea: str, width: int = 1024, height: int = 1024) -> str:
    """The full chat text the language model continues (system instruction, user idea, open reply)."""
    divisor = math.gcd(width, height) or 1
    user = USER_TEMPLATE.format(aspect_ratio=f"{width // divisor}:{height // divisor}", idea=idea.strip())
    return (f"<|im_start|>system\n{UPSAMPLE_INSTRUCTION}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------
# Generation


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from one row of logits; sampling runs on the CPU in fp32
    so that a seed gives the same draws on any device."""
    if temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate_ids(
    encoder,
    lm_head: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: set[int] = frozenset(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (stop token excluded). `encoder` must be built with its final norm
    and all its layers. `on_token(step, max_new_tokens)` is called after each token (progress, interrupts)."""
    from ..models.text_encoder import KVCache

    generator = torch.Generator().manual_seed(seed)
    cache = KVCache()
    hidden = encoder.decode(prompt_ids, cache)[-1:]
    out: list[int] = []
    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = lm_head(hidden.to(encoder.compute_dtype))[-1]
        token = next_token(logits, temperature, top_p, generator)
        if token in stop_ids:
            break
        out.append(token)
        if on_token is not None:
            on_token(step + 1, max_new_tokens)
        if step + 1 < max_new_tokens:
            hidden = encoder.decode([token], cache)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reply -> caption


def first_json_object(text: str) -> str | None:
    """The first balanced {...} in `text` (braces inside JSON strings ignored), or None."""
    start = text.find("{")
    while start != -1:
        depth, in_string, escaped = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i + 1]
        start = text.find("{", start + 1)
    return None


def fallback_caption(idea: str) -> dict:
    """The minimal caption used when the language model gave nothing usable: the idea itself, as summary and
    as the one element."""
    idea = idea.strip() or "an image"
    return captions.build_caption(background="a setting that suits the subject",
                                  elements=[captions.obj_element(idea)], high_level_description=idea)


def caption_from_reply(reply: str, idea: str, keep_bboxes: bool = False) -> tuple[dict, list[str]]:
    """Parse, repair and validate the language model's reply; fall back to `fallback_caption` on failure."""
    warnings: list[str] = []
    raw = first_json_object(reply)
    parsed = None
    if raw is not None:
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            warnings.append(f"Upsampler reply is not valid JSON ({exc}).")
    else:
        warnings.append("Upsampler reply holds no JSON object.")
    if isinstance(parsed, dict) and isinstance(parsed.get("caption"), dict):
        parsed = parsed["caption"]  # a wrapper object some models add
    if isinstance(parsed, dict):
        fixed, fixes = captions.repair_caption(parsed)
        if fixes:
            warnings.append("Upsampler caption repaired: " + "; ".join(fixes))
        usable = bool(fixed["compositional_deconstruction"]["elements"]) or "high_level_description" in fixed
        if usable and not [i for i in captions.validate_caption(fixed) if i.severity == "error"]:
            if not keep_bboxes:
                for element in fixed["compositional_deconstruction"]["elements"]:
                    element.pop("bbox", None)
            return fixed, warnings
        warnings.append("Upsampler caption has no usable content.")
    warnings.append("Using a minimal caption built from the idea instead.")
    return fallback_caption(idea), warnings


# ---------------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class UpsampleResult:
    caption: dict
    prompt: str  # the minified caption, ready to encode
    reply: str  # the language model's raw text
    warnings: list[str] = field(default_factory=list)


def upsample_prompt(
    idea: str,
    encoder,
    lm_head: torch.nn.Module,
    tokenizer,
    width: int = 1024,
    height: int = 1024,
    max_new_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 0.9,
    seed: int = 0,
    keep_bboxes: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> UpsampleResult:
    """Turn `idea` into a JSON caption. Greedy when `temperature` is 0, else seeded nucleus sampling.

    Bounding boxes are dropped by default (`keep_bboxes=False`), as the official upsampler does: a language
    model's boxes are rough and the image model places things well on its own.
    """
    if not isinstance(idea, str) or not idea.strip():
        raise PromptError("Prompt upsampling needs a non-empty idea.")
    if encoder.norm is None:
        raise ModelFileError("The text encoder was loaded for encoding only; load it for generation "
                             "(all layers and the final norm) to upsample prompts.")
    prompt_ids = tokenizer.encode(upsample_chat(idea, width, height), add_special_tokens=False).ids
    stop_ids = {tokenizer.token_to_id(t) for t in STOP_TOKENS} - {None}
    new_ids = generate_ids(encoder, lm_head, prompt_ids, max_new_tokens, stop_ids, temperature, top_p, seed,
                           on_token)
    reply = tokenizer.decode(new_ids, skip_special_tokens=True)
    warnings = []
    if len(new_ids) >= max_new_tokens:
        warnings.append(f"Upsampler stopped at max_new_tokens={max_new_tokens}; the reply may be cut short.")
    caption, more = caption_from_reply(reply, idea, keep_bboxes)
    warnings += more
    for message in warnings:
        logger.warning(message)
    return UpsampleResult(caption=caption, prompt=captions.minify(caption), reply=reply, warnings=warnings)
