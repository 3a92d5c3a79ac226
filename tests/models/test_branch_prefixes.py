"""Which prefix of a two-branch DiT file is which branch: every spelling the rule accepts, the metadata our
quant_tools writes, the explicit `branch_prefixes` option, and clear errors when none of them decides.

Reference: the tiny official-layout DiT pair of tests/models/dit_reference.py, stored as F32 (lossless), so the
branch that comes out as `cond` must hold exactly the conditional weights.
"""

import logging
import pathlib
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dit_files  # noqa: E402
from dit_reference import official_state_dict, our_config, tiny_diffusers_dit  # noqa: E402

from ideogram4_gguf.errors import ModelFileError  # noqa: E402
from ideogram4_gguf.models.dit_loader import BRANCH_PREFIX_PAIRS, find_dit_branches, load_dit_branches  # noqa: E402
from ideogram4_gguf.pipeline import load_model  # noqa: E402

TINY_ROPE = {"mrope_section": tuple(our_config().mrope_section)}


@pytest.fixture(scope="module")
def pair():
    return (official_state_dict(tiny_diffusers_dit(71)), official_state_dict(tiny_diffusers_dit(72)))


def _write(path, branches: dict, metadata=None):
    dit_files.write_gguf(path, branches, Q.F32, {**dit_files.gguf_metadata(our_config()), **(metadata or {})})
    return path


def _is_cond(module, state) -> bool:
    return torch.equal(module.input_proj.weight, state["input_proj.weight"])


def _assert_roles(loaded, pair):
    cond, uncond, info = loaded
    assert _is_cond(cond, pair[0]) and _is_cond(uncond, pair[1])
    assert not hasattr(uncond, "llm_cond_proj")
    return info


# (cond prefix, uncond prefix, order in the file): every spelling the naming rule decides
SPELLINGS = [
    *((c, u, "cond first") for c, u in BRANCH_PREFIX_PAIRS),
    ("transformer.", "unconditional_transformer.", "uncond first"),
    ("model.transformer.", "model.unconditional_transformer.", "cond first"),
    ("model.transformer.", "model.unconditional_transformer.", "uncond first"),
    ("Positive.", "Negative.", "uncond first"),
    ("pos_model.", "negative_model.", "cond first"),
    ("COND.", "UNCOND.", "cond first"),
    ("", "uncond.", "cond first"),  # a bare-named conditional branch beside a prefixed unconditional one
    ("diffusion.cond.", "diffusion.uncond.", "uncond first"),
]


@pytest.mark.parametrize("cond_prefix, uncond_prefix, order", SPELLINGS)
def test_prefix_names_decide_in_any_order_and_nesting(tmp_path, pair, caplog, cond_prefix, uncond_prefix, order):
    branches = {cond_prefix: pair[0], uncond_prefix: pair[1]}
    if order == "uncond first":
        branches = dict(reversed(branches.items()))
    path = _write(tmp_path / "two.gguf", branches)
    with caplog.at_level(logging.INFO, logger="ideogram4_gguf.models.dit_loader"):
        info = _assert_roles(load_dit_branches(path, compute_dtype=torch.float32), pair)
    assert info.prefixes == (cond_prefix, uncond_prefix) and info.layout == "two-branch file"
    assert f"conditional branch = {cond_prefix!r}*, unconditional branch = {uncond_prefix!r}* (from the prefix " \
           "names)" in caplog.text


def test_quant_tools_metadata_names_the_branches(tmp_path, pair, caplog):
    # prefixes that say nothing: the metadata decides (in file order: the second branch is the conditional one)
    path = _write(tmp_path / "meta.gguf", {"b.": pair[1], "a.": pair[0]},
                  {"ideogram4.branches": ["unconditional", "conditional"], "ideogram4.branch_prefixes": ["b.", "a."]})
    with caplog.at_level(logging.INFO, logger="ideogram4_gguf.models.dit_loader"):
        info = _assert_roles(load_dit_branches(path, compute_dtype=torch.float32), pair)
    assert info.prefixes == ("a.", "b.") and "ideogram4.branch_prefixes metadata" in caplog.text


def test_metadata_wins_over_the_names(tmp_path, pair):
    # a file whose metadata says the prefix named "uncond." holds the conditional branch
    path = _write(tmp_path / "odd.gguf", {"uncond.": pair[0], "cond.": pair[1]},
                  {"ideogram4.branches": ["conditional", "unconditional"],
                   "ideogram4.branch_prefixes": ["uncond.", "cond."]})
    assert _assert_roles(load_dit_branches(path, compute_dtype=torch.float32), pair).prefixes == ("uncond.", "cond.")


def test_metadata_that_does_not_fit_is_ignored_with_a_warning(tmp_path, pair, caplog):
    path = _write(tmp_path / "stale.gguf", {"conditional_transformer.": pair[0], "unconditional_transformer.": pair[1]},
                  {"ideogram4.branches": ["conditional", "unconditional"], "ideogram4.branch_prefixes": ["x.", "y."]})
    with caplog.at_level(logging.WARNING, logger="ideogram4_gguf.models.dit_loader"):
        _assert_roles(load_dit_branches(path, compute_dtype=torch.float32), pair)
    assert "ignoring its branch metadata" in caplog.text and "'x.'" in caplog.text


@pytest.mark.parametrize("given", [("pos.", "neg."), ["pos.", "neg."]], ids=["tuple", "list"])
def test_explicit_branch_prefixes(tmp_path, pair, given):
    path = _write(tmp_path / "posneg.gguf", {"neg.": pair[1], "pos.": pair[0]})
    assert _assert_roles(load_dit_branches(path, compute_dtype=torch.float32, branch_prefixes=given),
                         pair).prefixes == ("pos.", "neg.")
    assert find_dit_branches(path, branch_prefixes=given).prefixes == ("pos.", "neg.")
    model = load_model(path, compute_dtype="fp32", device="cpu", branch_prefixes=given)
    assert _is_cond(model.cond_branch, pair[0])


def test_explicit_branch_prefixes_override_the_names(tmp_path, pair):
    path = _write(tmp_path / "swapped.gguf", {"uncond.": pair[0], "cond.": pair[1]})
    assert _assert_roles(load_dit_branches(path, compute_dtype=torch.float32, branch_prefixes=("uncond.", "cond.")),
                         pair).prefixes == ("uncond.", "cond.")


@pytest.mark.parametrize("prefixes", [("pos.", "neg."), ("uncond_a.", "negative_b."), ("a.", "b.", "uncond.")],
                         ids=["neither named", "both named", "three"])
def test_undecidable_prefixes_say_what_was_found_and_how_to_tell(tmp_path, pair, prefixes):
    path = _write(tmp_path / "undecided.gguf", {p: pair[i % 2] for i, p in enumerate(prefixes)})
    with pytest.raises(ModelFileError) as info:
        load_dit_branches(path)
    message = str(info.value)
    assert str(path) in message and "branch_prefixes=(cond_prefix, uncond_prefix)" in message
    assert all(repr(p) in message for p in prefixes) and "\n" not in message


@pytest.mark.parametrize("given, match", [
    (("pos.", "nope."), r"branch_prefixes \('pos\.', 'nope\.'\) do not match this file: no .* under 'nope\.'"),
    (("pos.", "pos."), "two different strings"),
    ("pos.", "two different strings"),
    ((1, 2), "two different strings"),
])
def test_bad_branch_prefixes_option(tmp_path, pair, given, match):
    path = _write(tmp_path / "posneg.gguf", {"pos.": pair[0], "neg.": pair[1]})
    with pytest.raises(ModelFileError, match=match):
        load_dit_branches(path, branch_prefixes=given)


def test_single_branch_files_with_any_checkpoint_prefix(tmp_path, pair):
    cond = _write(tmp_path / "c.gguf", {"checkpoint.model.": pair[0]})
    uncond = _write(tmp_path / "u.gguf", {"first_stage.": pair[1]})
    info = _assert_roles(load_dit_branches(cond, uncond, compute_dtype=torch.float32), pair)
    assert info.prefixes == ("checkpoint.model.", "first_stage.") and info.layout == "pair of single-branch files"


def test_a_name_ending_in_the_arch_tensor_without_a_dot_is_no_branch(tmp_path, pair):
    state = {**pair[0], "xembed_image_indicator.weight": pair[0]["embed_image_indicator.weight"]}
    cond, uncond = _write(tmp_path / "c.gguf", {"": state}), _write(tmp_path / "u.gguf", {"": pair[1]})
    assert load_dit_branches(cond, uncond, compute_dtype=torch.float32)[2].prefixes == ("", "")


def test_branch_prefixes_pick_the_prefix_inside_each_file_of_a_pair(tmp_path, pair):
    # a conditional file that also holds a stray copy under another prefix
    cond = _write(tmp_path / "c.gguf", {"model.": pair[0], "ema.": pair[1]})
    uncond = _write(tmp_path / "u.gguf", {"": pair[1]})
    with pytest.raises(ModelFileError, match="cannot tell which is the conditional branch"):
        load_dit_branches(cond, uncond)
    info = _assert_roles(load_dit_branches(cond, uncond, compute_dtype=torch.float32, branch_prefixes=("model.", "")),
                         pair)
    assert info.prefixes == ("model.", "")


def test_a_pair_passed_the_wrong_way_round_is_swapped_when_both_files_say_so(tmp_path, pair, caplog):
    cond = _write(tmp_path / "c.gguf", {"": pair[0]}, {"ideogram4.branches": ["conditional"]})
    uncond = _write(tmp_path / "u.gguf", {"": pair[1]}, {"ideogram4.branches": ["unconditional"]})
    with caplog.at_level(logging.WARNING, logger="ideogram4_gguf.models.dit_loader"):
        loaded = load_dit_branches(uncond, cond, compute_dtype=torch.float32)
    assert _assert_roles(loaded, pair).files == [str(cond), str(uncond)]
    assert "using them that way round" in caplog.text
    # one file's word alone changes nothing
    only_one = _write(tmp_path / "plain.gguf", {"": pair[0]})
    _assert_roles(load_dit_branches(only_one, uncond, compute_dtype=torch.float32), pair)
