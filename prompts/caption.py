"""The JSON caption Ideogram 4 was trained on: builder, validator, canonical key order, minifier, repair.

Schema (docs/spec.md §4.4):

    {"high_level_description": str,                                  optional, recommended
     "style_description": {                                           optional
         "aesthetics": str, "lighting": str,
         "photo": str, "medium": str                                  photo style, in this order
           | "medium": str, "art_style": str,                         or non-photo style
         "color_palette": ["#RRGGBB", ...]},                          optional, at most 16
     "compositional_deconstruction": {                                required
         "background": str,                                           required
         "elements": [                                                required (may be empty)
             {"type": "obj", "bbox": [y0, x0, y1, x1], "desc": str, "color_palette": [...]}
             {"type": "text", "bbox": [...], "text": str, "desc": str, "color_palette": [...]}]}}

bbox: ints on a 0..1000 grid per axis, top-left origin, y0 < y1 and x0 < x1; element palettes hold at most 5
colours; colours are upper-case `#RRGGBB`. The model reads the caption minified (separators "," and ":",
literal non-ASCII characters).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import PromptError

logger = logging.getLogger(__name__)

TOP_KEYS = ("high_level_description", "style_description", "compositional_deconstruction")
PHOTO_STYLE_KEYS = ("aesthetics", "lighting", "photo", "medium", "color_palette")
ART_STYLE_KEYS = ("aesthetics", "lighting", "medium", "art_style", "color_palette")
COMPOSITION_KEYS = ("background", "elements")
ELEMENT_KEYS = {
    "obj": ("type", "bbox", "desc", "color_palette"),
    "text": ("type", "bbox", "text", "desc", "color_palette"),
}
REQUIRED_ELEMENT_KEYS = {"obj": ("desc",), "text": ("text", "desc")}
MAX_STYLE_COLORS = 16
MAX_ELEMENT_COLORS = 5
BBOX_GRID = 1000

_COLOR = re.compile(r"#[0-9A-F]{6}")
_ANY_CASE_COLOR = re.compile(r"#?([0-9A-Fa-f]{6}|[0-9A-Fa-f]{3})")


@dataclass(frozen=True)
class Issue:
    """One problem found in a caption: where (a JSON path) and what to do about it."""

    path: str
    message: str
    severity: str = "error"  # "error": the model was not trained on this; "warning": allowed but worse

    def __str__(self) -> str:
        return f"{self.path or '<caption>'}: {self.message}"


# ---------------------------------------------------------------------------------------------------------
# Builder


def style_description(
    aesthetics: str,
    lighting: str,
    medium: str,
    photo: str | None = None,
    art_style: str | None = None,
    color_palette: list[str] | None = None,
) -> dict:
    """A style block: give `photo` (camera, lens, film...) for photographs or `art_style` for anything else."""
    style = {"aesthetics": aesthetics, "lighting": lighting, "photo": photo, "medium": medium, "art_style": art_style,
             "color_palette": color_palette}
    return {k: v for k, v in style.items() if v is not None}


def obj_element(desc: str, bbox: list[int] | None = None, color_palette: list[str] | None = None) -> dict:
    element = {"type": "obj", "bbox": bbox, "desc": desc, "color_palette": color_palette}
    return {k: v for k, v in element.items() if v is not None}


def text_element(text: str, desc: str, bbox: list[int] | None = None, color_palette: list[str] | None = None) -> dict:
    """A text element: `text` is rendered literally (use "\\n" for a line break), `desc` says how it looks."""
    element = {"type": "text", "bbox": bbox, "text": text, "desc": desc, "color_palette": color_palette}
    return {k: v for k, v in element.items() if v is not None}


def build_caption(
    background: str,
    elements: list[dict] = (),
    high_level_description: str | None = None,
    style: dict | None = None,
) -> dict:
    """A canonical caption dict; raises `PromptError` listing every error if the parts break the schema."""
    caption: dict[str, Any] = {}
    if high_level_description is not None:
        caption["high_level_description"] = high_level_description
    if style is not None:
        caption["style_description"] = style
    caption["compositional_deconstruction"] = {"background": background, "elements": list(elements)}
    errors = [i for i in validate_caption(caption) if i.severity == "error"]
    if errors:
        raise PromptError("Invalid caption: " + "; ".join(str(i) for i in errors))
    return canonicalize(caption)


# ---------------------------------------------------------------------------------------------------------
# Validator


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_string(obj: dict, key: str, path: str, issues: list, required: bool) -> None:
    if key not in obj:
        if required:
            issues.append(Issue(path, f'missing required key "{key}"'))
        return
    if not isinstance(obj[key], str):
        issues.append(Issue(f"{path}.{key}".lstrip("."), f"must be a string, got {type(obj[key]).__name__}"))


def _check_unknown(obj: dict, allowed, path: str, issues: list) -> None:
    for key in obj:
        if key not in allowed:
            issues.append(Issue(path, f'unknown key "{key}" (allowed: {", ".join(allowed)})'))


def _check_palette(value, path: str, limit: int, issues: list) -> None:
    if not isinstance(value, list):
        issues.append(Issue(path, f"must be a list of up to {limit} colours like \"#1A2B3C\""))
        return
    if len(value) > limit:
        issues.append(Issue(path, f"has {len(value)} colours; at most {limit} are allowed"))
    for i, color in enumerate(value):
        if not isinstance(color, str) or not _COLOR.fullmatch(color):
            hint = " (use upper-case hex)" if isinstance(color, str) and _COLOR.fullmatch(color.upper()) else ""
            issues.append(Issue(f"{path}[{i}]", f"{color!r} is not a colour of the form \"#RRGGBB\"{hint}"))


def _check_bbox(value, path: str, issues: list) -> None:
    if not (isinstance(value, list) and len(value) == 4 and all(_is_int(v) for v in value)):
        issues.append(Issue(path, f"must be 4 integers [y_min, x_min, y_max, x_max] on a 0..{BBOX_GRID} grid, "
                                  f"got {value!r}"))
        return
    if any(v < 0 or v > BBOX_GRID for v in value):
        issues.append(Issue(path, f"values must lie in 0..{BBOX_GRID}, got {value}"))
    y0, x0, y1, x1 = value
    if not (y0 < y1 and x0 < x1):
        issues.append(Issue(path, f"needs y_min < y_max and x_min < x_max (order [y_min, x_min, y_max, x_max]), "
                                  f"got {value}"))


def _check_style(style, issues: list) -> None:
    path = "style_description"
    if not isinstance(style, dict):
        issues.append(Issue(path, "must be an object"))
        return
    has_photo, has_art = "photo" in style, "art_style" in style
    if has_photo == has_art:
        issues.append(Issue(path, 'needs exactly one of "photo" (photographs) or "art_style" (everything else)'))
    if has_photo != has_art:
        allowed = PHOTO_STYLE_KEYS if has_photo else ART_STYLE_KEYS
    else:
        allowed = tuple(dict.fromkeys(PHOTO_STYLE_KEYS + ART_STYLE_KEYS))
    _check_unknown(style, allowed, path, issues)
    for key in ("aesthetics", "lighting", "medium", "photo", "art_style"):
        if key in style:
            _check_string(style, key, path, issues, required=False)
    for key in ("aesthetics", "lighting", "medium"):
        if key not in style:
            issues.append(Issue(path, f'"{key}" is missing; the training captions always describe it', "warning"))
    if "color_palette" in style:
        _check_palette(style["color_palette"], f"{path}.color_palette", MAX_STYLE_COLORS, issues)


def _check_element(element, path: str, issues: list) -> None:
    if not isinstance(element, dict):
        issues.append(Issue(path, "each element must be an object"))
        return
    kind = element.get("type")
    if kind not in ELEMENT_KEYS:
        issues.append(Issue(f"{path}.type", f'must be "obj" or "text", got {kind!r}'))
        return
    _check_unknown(element, ELEMENT_KEYS[kind], path, issues)
    for key in REQUIRED_ELEMENT_KEYS[kind]:
        _check_string(element, key, path, issues, required=True)
    if "bbox" in element:
        _check_bbox(element["bbox"], f"{path}.bbox", issues)
    if "color_palette" in element:
        _check_palette(element["color_palette"], f"{path}.color_palette", MAX_ELEMENT_COLORS, issues)


def validate_caption(caption) -> list[Issue]:
    """Every way `caption` (a dict or a JSON string) departs from the training schema; empty when valid.

    Key order is not checked: `canonicalize` / `minify` put keys in the canonical order.
    """
    if isinstance(caption, str):
        try:
            caption = json.loads(caption)
        except ValueError as exc:
            return [Issue("", f"not valid JSON: {exc}")]
    if not isinstance(caption, dict):
        return [Issue("", f"a caption is a JSON object, got {type(caption).__name__}")]
    issues: list[Issue] = []
    _check_unknown(caption, TOP_KEYS, "", issues)
    _check_string(caption, "high_level_description", "", issues, required=False)
    if "high_level_description" not in caption:
        issues.append(Issue("", '"high_level_description" is missing; a one-sentence summary helps', "warning"))
    if "style_description" in caption:
        _check_style(caption["style_description"], issues)
    path = "compositional_deconstruction"
    comp = caption.get(path)
    if comp is None:
        issues.append(Issue("", f'missing required key "{path}"'))
        return issues
    if not isinstance(comp, dict):
        issues.append(Issue(path, "must be an object with \"background\" and \"elements\""))
        return issues
    _check_unknown(comp, COMPOSITION_KEYS, path, issues)
    _check_string(comp, "background", path, issues, required=True)
    if "elements" not in comp:
        issues.append(Issue(path, 'missing required key "elements" (a list, may be empty)'))
    elif not isinstance(comp["elements"], list):
        issues.append(Issue(f"{path}.elements", "must be a list"))
    else:
        for i, element in enumerate(comp["elements"]):
            _check_element(element, f"{path}.elements[{i}]", issues)
    return issues


# ---------------------------------------------------------------------------------------------------------
# Canonical order and minified text


def _ordered(obj: dict, order) -> dict:
    """`obj` with the keys of `order` first, in that order; other keys keep their relative order after."""
    out = {k: obj[k] for k in order if k in obj}
    out.update((k, v) for k, v in obj.items() if k not in out)
    return out


def canonicalize(caption: dict) -> dict:
    """A copy with every object's keys in the training order (values untouched, unknown keys kept last)."""
    out = _ordered(caption, TOP_KEYS)
    style = out.get("style_description")
    if isinstance(style, dict):
        out["style_description"] = _ordered(style, ART_STYLE_KEYS if "art_style" in style and "photo" not in style
                                            else PHOTO_STYLE_KEYS)
    comp = out.get("compositional_deconstruction")
    if isinstance(comp, dict):
        comp = _ordered(comp, COMPOSITION_KEYS)
        if isinstance(comp.get("elements"), list):
            comp["elements"] = [
                _ordered(e, ELEMENT_KEYS.get(e.get("type"), ELEMENT_KEYS["text"])) if isinstance(e, dict) else e
                for e in comp["elements"]
            ]
        out["compositional_deconstruction"] = comp
    return out


def minify(caption: dict) -> str:
    """The caption as the model saw it in training: canonical key order, no spaces, literal non-ASCII."""
    return json.dumps(canonicalize(caption), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------------
# Prompt entry point


def prepare_prompt(text: str, strict: bool = False) -> tuple[str, list[str]]:
    """The string to encode for a user prompt, plus warnings to show the user.

    A valid JSON caption comes back canonical and minified. Plain text is accepted with a warning (the model
    was trained on JSON captions). A JSON caption with schema problems is passed on (minified) with one
    warning per problem. `strict=True` turns plain text, broken JSON and schema errors into `PromptError`,
    like the official pipeline's default.
    """
    if not isinstance(text, str):
        raise PromptError(f"The prompt must be a string, got {type(text).__name__}.")
    stripped = text.strip()
    if not stripped.startswith("{"):
        message = ("Plain-text prompt: Ideogram 4 was trained on JSON captions and follows them better "
                   "(layout, text rendering, fewer false safety blocks). Consider a JSON caption or prompt upsampling.")
        if not stripped:
            message = "Empty prompt: the image follows no description."
        if strict:
            raise PromptError("Strict JSON captions are on and the prompt is plain text, not a JSON caption; write a "
                              "JSON caption (docs/prompts.md) or turn strict off.")
        return text, [message]
    try:
        caption = json.loads(stripped)
    except ValueError as exc:
        if strict:
            raise PromptError(f"Strict JSON captions are on and the prompt looks like JSON but does not parse "
                              f"({exc}); fix the JSON, or turn strict off to encode it as plain text.") from exc
        message = f"The prompt looks like JSON but does not parse ({exc}); it is passed on as plain text."
        return text, [message]
    issues = validate_caption(caption)
    errors = [i for i in issues if i.severity == "error"]
    if strict and errors:
        raise PromptError("The JSON caption breaks the schema: " + "; ".join(str(i) for i in errors))
    warnings = [f"Caption {i.severity}: {i}" for i in issues]
    if isinstance(caption, dict):
        return minify(caption), warnings
    return text, warnings


# ---------------------------------------------------------------------------------------------------------
# Repair (used on upsampler output, also offered to users)


def _as_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _repair_palette(value, limit: int, path: str, fixes: list) -> list[str] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        fixes.append(f"{path}: dropped (not a list of colours)")
        return None
    colors = []
    for color in value:
        match = _ANY_CASE_COLOR.fullmatch(color.strip()) if isinstance(color, str) else None
        if match is None:
            fixes.append(f"{path}: dropped {color!r} (not a #RRGGBB colour)")
            continue
        digits = match.group(1).upper()
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        fixed = "#" + digits
        if fixed != color:
            fixes.append(f"{path}: {color!r} -> {fixed!r}")
        colors.append(fixed)
    if len(colors) > limit:
        fixes.append(f"{path}: kept the first {limit} of {len(colors)} colours")
        colors = colors[:limit]
    return colors or None


def _repair_bbox(value, path: str, fixes: list) -> list[int] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        fixes.append(f"{path}: dropped {value!r} (not 4 numbers)")
        return None
    # A grid of 0..1 fractions is a common slip of language models; scale it to the 0..1000 grid.
    if all(0.0 <= n <= 1.0 for n in numbers) and any(0.0 < n < 1.0 for n in numbers):
        numbers = [n * BBOX_GRID for n in numbers]
        fixes.append(f"{path}: scaled 0..1 fractions to the 0..{BBOX_GRID} grid")
    y0, x0, y1, x1 = (min(BBOX_GRID, max(0, round(n))) for n in numbers)
    y0, y1 = min(y0, y1), max(y0, y1)
    x0, x1 = min(x0, x1), max(x0, x1)
    if y0 == y1 or x0 == x1:
        fixes.append(f"{path}: dropped {value!r} (empty box)")
        return None
    fixed = [y0, x0, y1, x1]
    if fixed != value:
        fixes.append(f"{path}: {value!r} -> {fixed}")
    return fixed


def _repair_element(element, path: str, fixes: list) -> dict | None:
    if not isinstance(element, dict):
        fixes.append(f"{path}: dropped (not an object)")
        return None
    kind = element.get("type")
    if kind not in ELEMENT_KEYS:
        guessed = "text" if "text" in element else "obj"
        fixes.append(f"{path}.type: {kind!r} -> {guessed!r}")
        kind = guessed
    out: dict[str, Any] = {"type": kind}
    if "bbox" in element:
        bbox = _repair_bbox(element["bbox"], f"{path}.bbox", fixes)
        if bbox is not None:
            out["bbox"] = bbox
    if kind == "text":
        text = _as_text(element.get("text"))
        if text is None:
            fixes.append(f"{path}: dropped (text element without a text string)")
            return None
        out["text"] = text
    desc = _as_text(element.get("desc"))
    if desc is None:
        desc = f'the text "{out["text"]}"' if kind == "text" else None
        if desc is None:
            fixes.append(f"{path}: dropped (object without a desc string)")
            return None
        fixes.append(f"{path}.desc: missing, filled from the text")
    out["desc"] = desc
    if "color_palette" in element:
        palette = _repair_palette(element["color_palette"], MAX_ELEMENT_COLORS, f"{path}.color_palette", fixes)
        if palette is not None:
            out["color_palette"] = palette
    for key in element:
        if key not in ELEMENT_KEYS[kind]:
            fixes.append(f'{path}: dropped unknown key "{key}"')
    return out


def _repair_style(style, fixes: list) -> dict | None:
    path = "style_description"
    if not isinstance(style, dict):
        fixes.append(f"{path}: dropped (not an object)")
        return None
    out: dict[str, Any] = {}
    for key in ("aesthetics", "lighting", "photo", "medium", "art_style"):
        if key in style:
            value = _as_text(style[key])
            if value is None:
                fixes.append(f"{path}.{key}: dropped (not a string)")
            else:
                out[key] = value
    if "photo" in out and "art_style" in out:
        del out["art_style"]
        fixes.append(f'{path}: had both "photo" and "art_style"; kept "photo"')
    if "photo" not in out and "art_style" not in out:
        fixes.append(f"{path}: dropped (neither \"photo\" nor \"art_style\")")
        return None
    if "color_palette" in style:
        palette = _repair_palette(style["color_palette"], MAX_STYLE_COLORS, f"{path}.color_palette", fixes)
        if palette is not None:
            out["color_palette"] = palette
    for key in style:
        if key not in PHOTO_STYLE_KEYS and key not in ART_STYLE_KEYS:
            fixes.append(f'{path}: dropped unknown key "{key}"')
    return out


def repair_caption(caption, fallback_background: str = "a simple background") -> tuple[dict, list[str]]:
    """A schema-valid, canonical caption made from `caption` as far as possible, and the list of fixes.

    Drops unknown keys and unusable parts, coerces types, clamps / sorts / rounds bboxes, upper-cases and
    truncates palettes. A missing background becomes the high-level description or `fallback_background`.
    """
    fixes: list[str] = []
    if isinstance(caption, str):
        caption = json.loads(caption)
    if not isinstance(caption, dict):
        raise PromptError(f"Cannot repair a caption that is a {type(caption).__name__}, not a JSON object.")
    out: dict[str, Any] = {}
    summary = _as_text(caption.get("high_level_description"))
    if summary is not None:
        out["high_level_description"] = summary
    elif "high_level_description" in caption:
        fixes.append("high_level_description: dropped (not a string)")
    if "style_description" in caption:
        style = _repair_style(caption["style_description"], fixes)
        if style is not None:
            out["style_description"] = style
    comp = caption.get("compositional_deconstruction")
    if not isinstance(comp, dict):
        fixes.append("compositional_deconstruction: missing or not an object, rebuilt")
        comp = {}
    background = _as_text(comp.get("background"))
    if background is None:
        background = summary or fallback_background
        fixes.append(f"compositional_deconstruction.background: missing, set to {background!r}")
    elements_in = comp.get("elements", [])
    if not isinstance(elements_in, list):
        fixes.append("compositional_deconstruction.elements: not a list, emptied")
        elements_in = []
    elements = []
    for i, element in enumerate(elements_in):
        repaired = _repair_element(element, f"compositional_deconstruction.elements[{i}]", fixes)
        if repaired is not None:
            elements.append(repaired)
    out["compositional_deconstruction"] = {"background": background, "elements": elements}
    for key in comp:
        if key not in COMPOSITION_KEYS:
            fixes.append(f'compositional_deconstruction: dropped unknown key "{key}"')
    for key in caption:
        if key not in TOP_KEYS:
            fixes.append(f'dropped unknown key "{key}"')
    return canonicalize(out), fixes


# ---------------------------------------------------------------------------------------------------------
# Text forms used by the ComfyUI JSON Prompt node


def parse_palette(text: str) -> list[str] | None:
    """"#ff0000, #00FF00" -> ["#FF0000", "#00FF00"]; empty -> None (validation reports malformed colours)."""
    colours = [part.strip().upper() for part in (text or "").replace(";", ",").split(",") if part.strip()]
    return colours or None


def parse_elements(text: str) -> list[dict]:
    """Elements from a JSON list, or one element per line as `type | fields`:

        text | HELLO | bold black letters | 380,200,620,800 | #000000,#FFFFFF
        obj  | a red cube on a table | 500,100,900,600

    A text element takes the literal text then its description; an obj element its description. Then, both
    optional: the bbox `y_min,x_min,y_max,x_max` on the 0..1000 grid, and a palette of #RRGGBB colours.
    """
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            elements = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"elements: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from exc
        if not isinstance(elements, list):
            raise PromptError("elements: a JSON value must be a list of element objects.")
        return elements
    elements = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("|")]
        kind = fields[0].lower()
        if kind not in ("obj", "text"):
            raise PromptError(f"elements line {number}: starts with {fields[0]!r}; write 'obj | description | ...' "
                              "or 'text | literal text | description | ...'.")
        needed = 3 if kind == "text" else 2
        if len(fields) < needed:
            raise PromptError(f"elements line {number}: a {kind} element needs "
                              f"{'the text and a description' if kind == 'text' else 'a description'}.")
        rest = fields[needed:]
        bbox = palette = None
        for extra in rest:
            if extra.startswith("#"):
                palette = parse_palette(extra)
            elif extra:
                try:
                    bbox = [int(round(float(v))) for v in extra.replace(" ", "").split(",")]
                except ValueError:
                    raise PromptError(f"elements line {number}: {extra!r} is neither a bbox "
                                      "(y_min,x_min,y_max,x_max) nor a palette (#RRGGBB,...).") from None
        if kind == "text":
            elements.append(text_element(fields[1].replace("\\n", "\n"), fields[2], bbox, palette))
        else:
            elements.append(obj_element(fields[1], bbox, palette))
    return elements


def caption_from_form(high_level_description: str, background: str, elements: str, style: str = "none",
                      aesthetics: str = "", lighting: str = "", medium: str = "", photo_or_art_style: str = "",
                      color_palette: str = "") -> tuple[str, list[Issue]]:
    """The JSON Prompt node's fields -> (minified canonical caption, every issue found); PromptError for a missing
    background or an invalid caption. style: "none" | "photo" | "art" (photo_or_art_style fills photo or art_style)."""
    if not background.strip():
        raise PromptError("Ideogram4 JSON Prompt: the background is required (e.g. 'a plain white wall').")
    caption = {}
    if high_level_description.strip():
        caption["high_level_description"] = high_level_description.strip()
    if style != "none":
        detail = photo_or_art_style.strip()
        caption["style_description"] = style_description(
            aesthetics.strip(), lighting.strip(), medium.strip(),
            photo=detail if style == "photo" else None, art_style=detail if style == "art" else None,
            color_palette=parse_palette(color_palette))
    caption["compositional_deconstruction"] = {"background": background.strip(), "elements": parse_elements(elements)}
    issues = validate_caption(caption)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise PromptError("The caption is not valid: " + "; ".join(str(i) for i in errors))
    return minify(canonicalize(caption)), issues
