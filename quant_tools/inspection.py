"""`inspect FILE.gguf`: metadata, branches, tensor count, type histogram, size, and the rule behind each type."""

import re
from collections import Counter

from .errors import QuantToolError
from .gguf_file import GGUFFile
from .layout import ARCH_TENSOR, CONFIG_METADATA, metadata_key
from .recipe import Recipe

_LAYER_INDEX = re.compile(r"(^|\.)layers\.\d+\.")


def _gb(n):
    return f"{n / 1e9:.3f} GB"


def _show(value, limit=200):
    """A metadata value for the report, on one line and cut to `limit` characters (a damaged file can hold
    megabytes in one string). None: a value gguf-py could not decode."""
    text = value if isinstance(value, str) else "<unreadable>" if value is None else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _lines(value):
    """The strings of a metadata list (our writer stores lists of strings); anything else is not listed."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _file_recipe(gf, recipe_override):
    if recipe_override is not None:
        return Recipe.load(recipe_override)
    text = gf.metadata.get("ideogram4.recipe")
    return Recipe.from_json(text) if isinstance(text, str) else None


def inspect_file(path, show_all=False, recipe=None, out=print):
    """Print the report; returns the GGUFFile for callers that want more."""
    gf = GGUFFile(path)
    md = gf.metadata
    weights = sum(t.numel for t in gf.tensors)
    out(f"file: {gf.path} ({_gb(gf.size)}, {len(gf.tensors)} tensors, {weights / 1e9:.3f} B weights, "
        f"{8 * gf.size / max(weights, 1):.2f} bits/weight, alignment {gf.alignment})")
    arch = md.get("general.architecture", "(none: sd.cpp-style file)")
    out(f"architecture: {_show(arch)}" + (f"   name: {_show(md['general.name'])}" if "general.name" in md else ""))
    if "ideogram4.quant_tools_version" in md:
        out(f"written by quant_tools {_show(md['ideogram4.quant_tools_version'])}, recipe "
            f"{_show(md.get('ideogram4.recipe_name', '?'))}")
    config = [f"{k} {_show(md[metadata_key(k)])}" for k in CONFIG_METADATA if metadata_key(k) in md]
    if config:
        out("config: " + ", ".join(config))
    for line in _lines(md.get("ideogram4.source_format")):
        out(f"source: {_show(line)}")
    for entry in _lines(md.get("ideogram4.source_sha256")):
        label, _, digest = entry.rpartition(":")
        out(f"sha256: {_show(digest)}  {_show(label)}")

    groups = gf.branches()
    if not any(t.name.endswith(ARCH_TENSOR) for t in gf.tensors):
        out(f"warning: no {ARCH_TENSOR}: this does not look like an Ideogram 4 transformer")
    out("branches: " + ", ".join(f"{prefix or '(bare names)'} {len(ts)} tensors" for prefix, ts in groups.items()))

    counts, sizes = Counter(), Counter()
    for t in gf.tensors:
        counts[t.qtype] += 1
        sizes[t.qtype] += t.nbytes
    out("types: " + ", ".join(f"{q} {counts[q]} ({_gb(sizes[q])})" for q, _ in sizes.most_common()))

    rec = _file_recipe(gf, recipe)
    out("recipe rules: " + (f"{rec.name} ({rec.origin})" if rec else "none recorded (pass --recipe to compare)"))
    _tensor_table(gf, rec, show_all, out)
    return gf


def _tensor_table(gf, rec, show_all, out):
    """One line per tensor kind (layer indices collapsed unless show_all) with type and deciding rule."""
    rows = {}
    for t in gf.tensors:
        prefix, name = gf.split_prefix(t.name)
        key = t.name if show_all else prefix + _LAYER_INDEX.sub(r"\1layers.*.", name)
        if rec is not None:
            decision = rec.decide(name, t.shape)
            rule = decision.rule if decision.qtype == t.qtype else f"MISMATCH: recipe says {decision.qtype} ({decision.rule})"
        else:
            rule = "-"
        entry = rows.setdefault(key, {"count": 0, "shapes": set(), "types": set(), "rules": set(), "bytes": 0})
        entry["count"] += 1
        entry["shapes"].add(" x ".join(str(d) for d in t.shape))
        entry["types"].add(t.qtype)
        entry["rules"].add(rule)
        entry["bytes"] += t.nbytes
    width = max((len(k) for k in rows), default=10)
    out(f"  {'tensor':<{width}}  {'n':>4}  {'shape':<14} {'type':<5} {'size':>10}  rule")
    for key, e in rows.items():
        out(f"  {key:<{width}}  {e['count']:>4}  {'/'.join(sorted(e['shapes'])):<14} "
            f"{'/'.join(sorted(e['types'])):<5} {e['bytes'] / 1e6:>8.2f}MB  {'; '.join(sorted(e['rules']))}")


def expect_ideogram4(gf):
    if not any(t.name.endswith(ARCH_TENSOR) for t in gf.tensors):
        raise QuantToolError(f"{gf.path} is not an Ideogram 4 GGUF (no {ARCH_TENSOR})")
