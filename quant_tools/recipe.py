"""Quantization recipes: which storage type each tensor gets, and which rule decided it.

A recipe is a versioned JSON file (shipped ones in quant_tools/recipes/, or any path):

    {
      "format": "ideogram4-quant-recipe", "format_version": 1,
      "name": "q4_k", "description": "...",
      "default_type": "F16",                      # tensors no rule matches
      "rules": [{"pattern": "<regex on the official name>", "type": "Q4_K", "why": "..."}, ...],   # first match wins
      "fallbacks": {
        "type": "F16",                            # what the fallbacks below store
        "one_dimensional": true,                  # every 1-D tensor (norm weights, biases)
        "names": [{"pattern": "...", "why": "..."}],   # kept whatever the rules say (embed_image_indicator, ...)
        "row_not_multiple_of_block": true         # a block type whose block does not divide the row length
      }
    }

Decision order for each tensor: fallback names, then 1-D, then the first matching rule (else default_type), then
the block-size check on the chosen type. Patterns match the official name without the branch prefix
(`layers.3.attention.qkv.weight`) with `re.search`.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import QuantToolError
from .quants import QTYPES

FORMAT = "ideogram4-quant-recipe"
FORMAT_VERSION = 1
RECIPES_DIR = Path(__file__).with_name("recipes")


@dataclass(frozen=True)
class Decision:
    qtype: str
    rule: str  # human-readable: which rule or fallback decided it


@dataclass(frozen=True)
class Rule:
    pattern: str
    qtype: str
    why: str
    regex: object


class Recipe:
    def __init__(self, data, origin):
        self.origin = origin
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise QuantToolError(f"{origin}: not a quant_tools recipe (expected \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise QuantToolError(
                f"{origin}: recipe format_version {version!r}; this quant_tools reads version {FORMAT_VERSION}"
            )
        self.data = data
        self.name = str(data.get("name") or Path(origin).stem)
        self.description = str(data.get("description", ""))
        self.default_type = self._qtype(data.get("default_type", "F16"), "default_type")
        fallbacks = data.get("fallbacks", {})
        self.fallback_type = self._qtype(fallbacks.get("type", "F16"), "fallbacks.type")
        if QTYPES[self.fallback_type].block_size != 1:
            raise QuantToolError(f"{origin}: fallbacks.type must be a float type (F16, BF16, F32)")
        self.fallback_1d = bool(fallbacks.get("one_dimensional", True))
        self.fallback_block = bool(fallbacks.get("row_not_multiple_of_block", True))
        self.keep = [self._rule(item, i, self.fallback_type, "fallbacks.names") for i, item in
                     enumerate(fallbacks.get("names", []))]
        self.rules = [self._rule(item, i, None, "rules") for i, item in enumerate(data.get("rules", []))]

    def _qtype(self, name, where):
        if str(name).upper() not in QTYPES:
            raise QuantToolError(f"{self.origin}: {where} = {name!r}; choose one of {', '.join(QTYPES)}")
        return str(name).upper()

    def _rule(self, item, index, qtype, where):
        if not isinstance(item, dict) or "pattern" not in item:
            raise QuantToolError(f"{self.origin}: {where}[{index}] needs a \"pattern\"")
        try:
            regex = re.compile(item["pattern"])
        except re.error as exc:
            raise QuantToolError(f"{self.origin}: {where}[{index}] pattern {item['pattern']!r}: {exc}") from None
        qtype = qtype or self._qtype(item.get("type"), f"{where}[{index}].type")
        return Rule(item["pattern"], qtype, str(item.get("why", "")), regex)

    @classmethod
    def load(cls, name_or_path):
        """A shipped recipe by name (`q4_k`) or a JSON file path."""
        path = Path(name_or_path)
        if not path.is_file():
            shipped = RECIPES_DIR / f"{name_or_path}.json"
            if not shipped.is_file():
                raise QuantToolError(
                    f"recipe {name_or_path!r}: no such file, and not a shipped recipe ({', '.join(shipped_names())})"
                )
            path = shipped
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantToolError(f"recipe {path}: cannot read JSON ({exc})") from None
        return cls(data, str(path))

    @classmethod
    def from_json(cls, text, origin="recipe stored in the GGUF file"):
        try:
            return cls(json.loads(text), origin)
        except json.JSONDecodeError as exc:
            raise QuantToolError(f"{origin}: not JSON ({exc})") from None

    def to_json(self):
        return json.dumps(self.data, separators=(",", ":"))

    def decide(self, name, shape):
        """Decision for the official tensor `name` (no branch prefix) of torch shape `shape`."""
        for i, rule in enumerate(self.keep):
            if rule.regex.search(name):
                return Decision(self.fallback_type, f"fallback name /{rule.pattern}/")
        if len(shape) <= 1 and self.fallback_1d:
            return Decision(self.fallback_type, "fallback 1-D")
        for i, rule in enumerate(self.rules):
            if rule.regex.search(name):
                qtype, why = rule.qtype, f"rule {i + 1} /{rule.pattern}/"
                break
        else:
            qtype, why = self.default_type, "default_type"
        block = QTYPES[qtype].block_size
        if not shape or shape[-1] % block:
            row = shape[-1] if shape else "()"  # a 0-D tensor (a damaged file's) has no rows of blocks
            if not self.fallback_block:
                raise QuantToolError(
                    f"{self.origin}: {why} wants {qtype} for {name}, but its row length {row} is not a "
                    f"multiple of {block}; enable fallbacks.row_not_multiple_of_block or change the rule"
                )
            return Decision(self.fallback_type, f"fallback: row {row} % {block} != 0 ({why} wanted {qtype})")
        return Decision(qtype, why)


def shipped_names():
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
