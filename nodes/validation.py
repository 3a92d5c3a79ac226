"""Cheap checks for the nodes' `validate_inputs`: ComfyUI runs them when a prompt is queued, before any node
executes, so a bad number or a wrong file is refused in seconds instead of after minutes of loading.

A `validate_inputs` that names an input takes over ComfyUI's own min / max / list checks for it, so these
helpers repeat them (`numbers` reads the bounds from the node's own schema). They return True or the message
ComfyUI shows on the node.
"""

from __future__ import annotations

import math
import os

from ..errors import Ideogram4Error
from . import comfy_adapter as comfy

# (folder key, name, mtime, extra) -> True or the error message: a file is checked once, not on every queue.
_checked: dict = {}


def number(name: str, value, low: float, high: float):
    """None when `value` is a finite number in [low, high], else the message."""
    if value is None:  # linked from another node: checked when it runs
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if not low <= value <= high:
        return f"{name} {value} is outside {low} .. {high}"
    return None


def numbers(node_class, **values):
    """True, or the first problem among `values` (input name -> value) of `node_class`'s number widgets: each must be
    a finite number within the min / max its schema declares, the bounds the widget itself shows."""
    bounds = {i.id: (i.min, i.max) for i in node_class.define_schema().inputs if hasattr(i, "min")}
    return first_problem(*(number(name, value, *bounds[name]) for name, value in values.items()))


def first_problem(*problems):
    """True, or the first message among `problems` (None entries are fine)."""
    return next((p for p in problems if p), True)


def model_file(key: str, name, check, *extra, optional: bool = False):
    """True when `name` (a dropdown choice) is in the model folders and `check(path, *extra)` accepts its header;
    else the message. optional: "(none)" is accepted."""
    if name is None or (optional and name in ("", comfy.NONE_CHOICE)):
        return True
    try:
        path = comfy.model_path(key, name)
        cache_key = (key, path, os.path.getmtime(path), extra)
    except (Ideogram4Error, OSError) as exc:
        return str(exc)
    if cache_key not in _checked:
        try:
            check(path, *extra)
            _checked[cache_key] = True
        except (Ideogram4Error, OSError) as exc:
            _checked[cache_key] = str(exc)
    return _checked[cache_key]
