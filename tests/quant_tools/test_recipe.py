"""Recipe decisions on the full-size Ideogram 4 tensor table (docs/spec.md §2.2) and recipe validation.

Reference numbers: the published Transformer Lab builds (docs/spec.md §G9): two-branch Q4_K 10.4 GB,
Q8_0 19.7 GB.
"""

import json
from collections import Counter

import numpy as np
import pytest

from ideogram4_gguf.quant_tools import QuantToolError
from ideogram4_gguf.quant_tools.layout import FULL_SIZE
from ideogram4_gguf.quant_tools.quants import QTYPES
from ideogram4_gguf.quant_tools.recipe import Recipe, shipped_names

SHAPES = FULL_SIZE.tensor_shapes()


def _decide_all(recipe):
    return {name: recipe.decide(name, shape) for name, shape in SHAPES.items()}


def _both_branch_bytes(decisions):
    one = sum(
        int(np.prod(SHAPES[n])) // QTYPES[d.qtype].block_size * QTYPES[d.qtype].type_size
        for n, d in decisions.items()
    )
    return 2 * one


def test_full_size_table_has_458_tensors_per_branch():
    assert len(SHAPES) == 458
    assert SHAPES["layers.33.attention.qkv.weight"] == (13824, 4608)
    assert SHAPES["llm_cond_proj.weight"] == (4608, 53248)


def test_q4_k_reproduces_the_published_build():
    decisions = _decide_all(Recipe.load("q4_k"))
    linears = [n for n, s in SHAPES.items() if len(s) == 2 and n not in ("embed_image_indicator.weight",)]
    assert all(decisions[n].qtype == "Q4_K" for n in linears if n != "input_proj.weight")
    assert decisions["input_proj.weight"].qtype == "F16"
    assert "128 % 256" in decisions["input_proj.weight"].rule
    assert decisions["embed_image_indicator.weight"].qtype == "F16"
    assert decisions["embed_image_indicator.weight"].rule.startswith("fallback name")
    assert all(decisions[n].qtype == "F16" for n, s in SHAPES.items() if len(s) == 1)
    assert Counter(d.qtype for d in decisions.values()) == {"Q4_K": 34 * 6 + 6, "F16": 458 - 34 * 6 - 6}
    # published: ideogram-4-gguf-q4_k, one file with both branches, 10.4 GB
    assert abs(_both_branch_bytes(decisions) / 1e9 - 10.44) < 0.01


def test_q8_0_size_matches_the_published_build():
    decisions = _decide_all(Recipe.load("q8_0"))
    assert decisions["input_proj.weight"].qtype == "Q8_0"  # 128 is a multiple of Q8_0's 32-weight block
    assert abs(_both_branch_bytes(decisions) / 1e9 - 19.7) < 0.05


def test_q4_k_m_mix():
    decisions = _decide_all(Recipe.load("q4_k_m"))
    assert decisions["layers.5.feed_forward.w2.weight"].qtype == "Q6_K"
    assert decisions["layers.5.adaln_modulation.weight"].qtype == "Q6_K"
    assert decisions["layers.5.attention.o.weight"].qtype == "Q5_K"
    assert decisions["llm_cond_proj.weight"].qtype == "Q5_K"
    assert decisions["layers.5.attention.qkv.weight"].qtype == "Q4_K"
    assert decisions["layers.5.feed_forward.w1.weight"].qtype == "Q4_K"
    assert decisions["t_embedding.mlp_in.weight"].qtype == "Q8_0"
    assert decisions["input_proj.weight"].qtype == "Q8_0"
    size = _both_branch_bytes(decisions)
    assert _both_branch_bytes(_decide_all(Recipe.load("q4_k"))) < size < _both_branch_bytes(_decide_all(Recipe.load("q8_0")))


def test_shipped_recipes_are_listed():
    assert {"q4_k", "q4_k_m", "q8_0"} <= set(shipped_names())


def _write(tmp_path, **changes):
    data = json.loads(Recipe.load("q4_k").to_json())
    data.update(changes)
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(data))
    return path


def test_custom_recipe_file_first_match_wins(tmp_path):
    rules = [{"pattern": r"attention\.qkv", "type": "Q6_K"}, {"pattern": r"\.weight$", "type": "Q8_0"}]
    recipe = Recipe.load(_write(tmp_path, rules=rules, name="mine"))
    assert recipe.name == "mine"
    assert recipe.decide("layers.0.attention.qkv.weight", (13824, 4608)).qtype == "Q6_K"
    assert recipe.decide("layers.0.attention.o.weight", (4608, 4608)).rule == r"rule 2 /\.weight$/"


def test_unknown_format_version_is_refused(tmp_path):
    with pytest.raises(QuantToolError, match="format_version 2"):
        Recipe.load(_write(tmp_path, format_version=2))


def test_unknown_type_is_refused(tmp_path):
    with pytest.raises(QuantToolError, match="rules\\[0\\].type"):
        Recipe.load(_write(tmp_path, rules=[{"pattern": "x", "type": "Q3_K"}]))


def test_bad_regex_is_refused(tmp_path):
    with pytest.raises(QuantToolError, match="rules\\[0\\] pattern"):
        Recipe.load(_write(tmp_path, rules=[{"pattern": "(", "type": "Q4_K"}]))


def test_strict_block_check_names_the_tensor(tmp_path):
    data = json.loads(Recipe.load("q4_k").to_json())
    data["fallbacks"]["row_not_multiple_of_block"] = False
    path = tmp_path / "strict.json"
    path.write_text(json.dumps(data))
    with pytest.raises(QuantToolError, match="input_proj.weight.*row length 128"):
        Recipe.load(path).decide("input_proj.weight", (4608, 128))


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(QuantToolError, match="q4_k_m"):
        Recipe.load("q3_k_s")
