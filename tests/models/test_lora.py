"""LoRA on the DiT (models/lora.py) against diffusers 0.42.1 + PEFT applying the same LoRA to
`Ideogram4Transformer2DModel`, for every key format; dense and Q4_K (Q4_K against the dequantized weights).

diffusers-format files are written by diffusers itself (`save_lora_adapter` of a PEFT adapter); ai-toolkit files are
loaded into diffusers with its own converter (`Ideogram4LoraLoaderMixin.lora_state_dict`); OneTrainer and kohya-
flattened files, which diffusers does not read, are converted for it by the plain renaming they differ by.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dit_files  # noqa: E402
from dit_reference import official_state_dict, our_config, reference_velocity, tiny_diffusers_dit  # noqa: E402

from ideogram4_gguf.errors import ModelFileError  # noqa: E402
from ideogram4_gguf.models.dit import Ideogram4DiT  # noqa: E402
from ideogram4_gguf.models.dit_loader import StateDictWeights, load_dit_branches  # noqa: E402
from ideogram4_gguf.models.lora import bind, core_key_map, install, read_lora  # noqa: E402

peft = pytest.importorskip("peft", reason="peft (the reference's LoRA layers) is installed with the test extra")
from diffusers import Ideogram4Pipeline  # noqa: E402

GRID = (4, 5)
TOLERANCE = 1e-5
LAYER_MODULES = ("attention.qkv", "attention.o", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                 "adaln_modulation")
SPLIT = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"), "attention.o": ("attention.to_out.0",)}
# Q4_K needs rows of whole 256-weight blocks: hidden 256, MLP 256 (tests/models/test_dit_loader.py)
Q4K = dict(attention_head_dim=128, num_attention_heads=2, intermediate_size=256, num_layers=1, adaln_dim=256)


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, GRID[0] * GRID[1], config.in_channels, generator=g)
    features = torch.randn(6, config.llm_features_dim, generator=g) * 3
    return latents, features, torch.tensor([0.37])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def ours_velocity(branch, config, seed=0):
    latents, features, t = inputs(config, seed)
    text = branch.project_text(features) if branch.with_text else None
    return branch(latents, t, text, GRID)


def diffusers_velocity(model, config, with_text, seed=0):
    latents, features, t = inputs(config, seed)
    return reference_velocity(model, latents, t, features if with_text else None, GRID)


# ---------------------------------------------------------------------------------------------------------------
# LoRA files in each format, and the same LoRA in diffusers


def fused_factors(model, rank, seed, modules=LAYER_MODULES):
    """{official module: (down, up)} random rank-r factors for the fused (official) module names."""
    g = torch.Generator().manual_seed(seed)
    state = official_state_dict(model)
    factors = {}
    for layer in range(model.config.num_layers):
        for module in modules:
            rows, cols = state[f"layers.{layer}.{module}.weight"].shape
            factors[f"layers.{layer}.{module}"] = (torch.randn(rank, cols, generator=g) / cols ** 0.5,
                                                  torch.randn(rows, rank, generator=g) * 0.3)
    return factors


def ai_toolkit_file(factors, alpha, prefix="diffusion_model.", names=("lora_down", "lora_up")):
    out = {}
    for module, (down, up) in factors.items():
        out[f"{prefix}{module}.{names[0]}.weight"] = down
        out[f"{prefix}{module}.{names[1]}.weight"] = up
        out[f"{prefix}{module}.alpha"] = torch.tensor(float(alpha))
    return out


def split_file(model, rank, alpha, seed, prefix="transformer.", names=("lora_down", "lora_up")):
    """OneTrainer style: split to_q/to_k/to_v/to_out.0 names, each its own factors, with alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
            out[f"{prefix}{name}.{names[0]}.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            out[f"{prefix}{name}.{names[1]}.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
            out[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return out


def load_into_diffusers(model, state_dict, name, strength=1.0):
    """diffusers' own route: non-diffusers layouts through its Ideogram 4 converter, then PEFT."""
    state_dict = Ideogram4Pipeline.lora_state_dict(dict(state_dict))
    model.load_lora_adapter(state_dict, prefix="transformer", adapter_name=name)
    return name


def onetrainer_for_diffusers(state_dict, rank):
    """What a OneTrainer file means in PEFT terms: lora_down -> lora_A, lora_up x (alpha / rank) -> lora_B."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".lora_down.weight"):
            out[key.replace(".lora_down.", ".lora_A.")] = value
        elif key.endswith(".lora_up.weight"):
            alpha = state_dict[key.replace(".lora_up.weight", ".alpha")].item()
            out[key.replace(".lora_up.", ".lora_B.")] = value * (alpha / rank)
    return out


def peft_model_file(model, rank, alpha, seed, tmp_path, targets):
    """A diffusers-format file written by diffusers: a PEFT adapter with random factors, saved by
    `save_lora_adapter` (which stores lora_alpha / r in `lora_adapter_metadata`)."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model.add_adapter(config, adapter_name="saved")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    model.save_lora_adapter(tmp_path, adapter_name="saved")
    return tmp_path / "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Every format, dense


@pytest.fixture
def reference():
    return tiny_diffusers_dit(seed=71)


def ours_of(reference, with_text=True):
    return Ideogram4DiT.from_weights(our_config(), StateDictWeights(official_state_dict(reference)),
                                     with_text=with_text)


FORMATS = ["ai-toolkit (diffusion_model., lora_down/up, alpha)", "ai-toolkit (conditional_transformer., lora_A/B)",
           "ai-toolkit (no prefix)", "OneTrainer (transformer., split, lora_down/up, alpha)",
           "kohya flattened (lora_unet_)"]


@pytest.mark.parametrize("style", FORMATS)
def test_lora_formats_match_diffusers_dense(reference, tmp_path, style):
    rank, alpha = 8, 5.0
    if style.startswith("OneTrainer"):
        file = split_file(reference, rank, alpha, seed=3)
        reference_sd = onetrainer_for_diffusers(file, rank)
    else:
        factors = fused_factors(reference, rank, seed=3)
        prefix = {"ai-toolkit (diffusion_model., lora_down/up, alpha)": "diffusion_model.",
                  "ai-toolkit (conditional_transformer., lora_A/B)": "conditional_transformer.",
                  "ai-toolkit (no prefix)": "", "kohya flattened (lora_unet_)": "diffusion_model."}[style]
        names = ("lora_A", "lora_B") if "lora_A" in style else ("lora_down", "lora_up")
        reference_sd = ai_toolkit_file(factors, alpha, prefix or "diffusion_model.", names)
        file = ai_toolkit_file(factors, alpha, prefix, names)
        if style.startswith("kohya"):
            file = {("lora_unet_" + k.removeprefix("diffusion_model.").rsplit(".", 2)[0].replace(".", "_") + "."
                     + ".".join(k.rsplit(".", 2)[1:]) if not k.endswith(".alpha") else
                     "lora_unet_" + k.removeprefix("diffusion_model.")[: -len(".alpha")].replace(".", "_") + ".alpha"): v
                    for k, v in file.items()}
    path = tmp_path / "lora.safetensors"
    save_file(file, str(path))

    ours = ours_of(reference)
    base = ours_velocity(ours, our_config())
    load_into_diffusers(reference, reference_sd, "a")
    expected = diffusers_velocity(reference, our_config(), True)
    lora = read_lora(path)
    assert lora.branch == "cond" and not lora.unmatched
    terms, absent = bind(lora, ours, 1.0)
    assert not absent and len(terms) == len(lora.terms) > 0
    with install(terms):
        got = ours_velocity(ours, our_config())
    error = relative(got, expected)
    assert relative(expected, base) > 1e-2  # the LoRA does something
    assert error < TOLERANCE, (style, error)
    assert torch.equal(ours_velocity(ours, our_config()), base)  # removed: bit-identical again


def test_diffusers_saved_peft_file_with_alpha_matches(reference, tmp_path):
    """A file diffusers itself wrote (split names, lora_A/lora_B, lora_alpha / r in its metadata), including the
    non-layer Linears (input projection, time embedding, text projection, final layer)."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaln_modulation", "input_proj",
               "mlp_in", "mlp_out", "llm_cond_proj", "linear"]
    ours = ours_of(reference)
    path = peft_model_file(reference, rank=4, alpha=12.0, seed=5, tmp_path=tmp_path, targets=targets)
    metadata = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
    assert metadata["lora_alpha"] == 12.0 and metadata["r"] == 4
    expected = diffusers_velocity(reference, our_config(), True)
    lora = read_lora(path)
    assert lora.style.startswith("diffusers") and all(t.scale == 3.0 for t in lora.terms)
    terms, _ = bind(lora, ours, 1.0)
    assert {t.target for t in lora.terms} >= {"input_proj", "t_embedding.mlp_in", "llm_cond_proj",
                                              "final_layer.linear", "layers.0.attention.qkv"}
    with install(terms):
        got = ours_velocity(ours, our_config())
    assert relative(got, expected) < TOLERANCE


def test_stacked_loras_and_strengths_match_diffusers(reference, tmp_path):
    one = ai_toolkit_file(fused_factors(reference, 4, seed=11), alpha=2.0)
    two = split_file(reference, 6, 3.0, seed=12)
    save_file(one, str(tmp_path / "one.safetensors"))
    save_file(two, str(tmp_path / "two.safetensors"))
    ours = ours_of(reference)
    load_into_diffusers(reference, one, "one")
    reference.load_lora_adapter(onetrainer_for_diffusers(two, 6), prefix="transformer", adapter_name="two")
    reference.set_adapters(["one", "two"], weights=[0.7, -1.3])
    expected = diffusers_velocity(reference, our_config(), True)
    terms = bind(read_lora(tmp_path / "one.safetensors"), ours, 0.7)[0] + bind(read_lora(tmp_path / "two.safetensors"),
                                                                                ours, -1.3)[0]
    with install(terms):
        got = ours_velocity(ours, our_config())
    assert relative(got, expected) < TOLERANCE


def test_strength_zero_is_exactly_no_lora(reference, tmp_path):
    save_file(ai_toolkit_file(fused_factors(reference, 4, seed=13), alpha=4.0), str(tmp_path / "l.safetensors"))
    ours = ours_of(reference)
    base = ours_velocity(ours, our_config())
    terms, _ = bind(read_lora(tmp_path / "l.safetensors"), ours, 0.0)
    assert terms == []
    with install(terms):
        assert torch.equal(ours_velocity(ours, our_config()), base)


def test_unconditional_lora_goes_to_the_unconditional_branch_only(reference, tmp_path):
    factors = fused_factors(reference, 4, seed=17)
    save_file(ai_toolkit_file(factors, 4.0, prefix="unconditional_transformer."), str(tmp_path / "u.safetensors"))
    lora = read_lora(tmp_path / "u.safetensors")
    assert lora.branch == "uncond" and "prefix" in lora.branch_reason
    uncond_reference = tiny_diffusers_dit(seed=72)
    load_into_diffusers(uncond_reference, ai_toolkit_file(factors, 4.0), "u")
    expected = diffusers_velocity(uncond_reference, our_config(), False)
    uncond = ours_of(tiny_diffusers_dit(seed=72), with_text=False)
    terms, absent = bind(lora, uncond, 1.0)
    with install(terms):
        assert relative(ours_velocity(uncond, our_config()), expected) < TOLERANCE
    # through the model pair: only the unconditional branch changes
    from ideogram4_gguf.pipeline import Ideogram4Model

    cond = ours_of(reference)
    pair = Ideogram4Model(cond, uncond, info=None, device=torch.device("cpu"))
    with_lora = pair.with_lora(lora, 1.0)
    assert [a.branch for a in with_lora.loras] == ["uncond"] and pair.loras == ()
    cond_before, uncond_before = ours_velocity(cond, our_config()), ours_velocity(uncond, our_config())
    with with_lora.lora_hooks():
        assert torch.equal(ours_velocity(cond, our_config()), cond_before)
        assert relative(ours_velocity(uncond, our_config()), uncond_before) > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Q4_K: against the dequantized weights plus the LoRA


@pytest.mark.parametrize("style", ["ai-toolkit", "OneTrainer"])
def test_lora_on_q4_k_matches_diffusers_on_the_dequantized_weights(tmp_path, style):
    cond_ref, uncond_ref = tiny_diffusers_dit(81, **Q4K), tiny_diffusers_dit(82, **Q4K)
    config = our_config(**Q4K)
    decoded = dit_files.write_gguf(tmp_path / "q4k.gguf", {"conditional_transformer.": official_state_dict(cond_ref),
                                                           "unconditional_transformer.": official_state_dict(uncond_ref)},
                                   Q.Q4_K, dit_files.gguf_metadata(config))
    cond, _, _ = load_dit_branches(tmp_path / "q4k.gguf", compute_dtype=torch.float32)
    assert type(cond.layers[0].attention.qkv).__name__ == "QuantLinear"
    dequantized = tiny_diffusers_dit(81, **Q4K)
    split = {}
    for name, value in decoded["conditional_transformer."].items():  # the reference model on the decoded weights
        if name.endswith("attention.qkv.weight"):
            for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                split[name.replace("qkv", part)] = chunk
        else:
            split[name.replace("attention.o.weight", "attention.to_out.0.weight")] = value
    dequantized.load_state_dict(split)
    if style == "ai-toolkit":
        file = ai_toolkit_file(fused_factors(cond_ref, 16, seed=19), alpha=7.0)
        load_into_diffusers(dequantized, file, "q")
    else:
        file = split_file(cond_ref, 16, 7.0, seed=19)
        dequantized.load_lora_adapter(onetrainer_for_diffusers(file, 16), prefix="transformer", adapter_name="q")
    save_file(file, str(tmp_path / "q.safetensors"))
    expected = diffusers_velocity(dequantized, config, True)
    terms, _ = bind(read_lora(tmp_path / "q.safetensors"), cond, 1.0)
    with install(terms):
        got = ours_velocity(cond, config)
    assert relative(got, expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Bad files


def test_a_lora_for_another_model_lists_its_first_keys(tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": torch.randn(4, 8),
               "lora_unet_down_blocks_0_attentions_0.lora_up.weight": torch.randn(8, 4),
               "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 8)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelFileError) as info:
        read_lora(tmp_path / "sdxl.safetensors")
    message = str(info.value)
    assert "not an Ideogram 4 LoRA" in message and "lora_unet_down_blocks_0_attentions_0" in message
    assert "sdxl.safetensors" in message


def test_a_partly_matching_lora_warns_with_a_count(reference, tmp_path, caplog):
    file = ai_toolkit_file(fused_factors(reference, 4, seed=23), alpha=4.0)
    file["diffusion_model.some_other_block.lora_down.weight"] = torch.randn(4, 8)
    file["diffusion_model.some_other_block.lora_up.weight"] = torch.randn(8, 4)
    save_file(file, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level(logging.WARNING):
        lora = read_lora(tmp_path / "mixed.safetensors")
    assert lora.unmatched == ["diffusion_model.some_other_block"]
    assert "1 of" in caplog.text and "some_other_block" in caplog.text


def test_a_shape_mismatch_names_the_tensor(reference, tmp_path):
    file = ai_toolkit_file(fused_factors(tiny_diffusers_dit(5, **Q4K), 4, seed=29), alpha=4.0)
    save_file(file, str(tmp_path / "big.safetensors"))
    with pytest.raises(ModelFileError) as info:
        bind(read_lora(tmp_path / "big.safetensors"), ours_of(reference), 1.0)
    message = str(info.value)
    assert "big.safetensors" in message and "another size" in message
    assert "LoRA tensor 'diffusion_model.layers.0." in message and " of this DiT maps " in message


def test_mismatched_factor_ranks_name_the_tensor(tmp_path):
    save_file({"diffusion_model.layers.0.feed_forward.w1.lora_down.weight": torch.randn(4, 32),
               "diffusion_model.layers.0.feed_forward.w1.lora_up.weight": torch.randn(48, 5)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match=r"layers\.0\.feed_forward\.w1.*not a rank-r pair"):
        read_lora(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("key, kind", [("diffusion_model.layers.0.attention.qkv.lokr_w1", "LoKr"),
                                       ("diffusion_model.layers.0.attention.qkv.hada_w1_a", "LoHa"),
                                       ("diffusion_model.layers.0.attention.qkv.dora_scale", "DoRA")])
def test_unsupported_lora_types_say_so(tmp_path, key, kind):
    save_file({key: torch.randn(4, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelFileError, match=f"unsupported LoRA type.*{kind}"):
        read_lora(tmp_path / "x.safetensors")


def test_pickle_and_missing_files_are_refused(tmp_path):
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ModelFileError, match="safetensors files only"):
        read_lora(tmp_path / "old.ckpt")
    with pytest.raises(ModelFileError, match="not found"):
        read_lora(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# The key map core's LoRA loader gets


def test_core_key_map_covers_every_spelling_with_qkv_slices():
    names = ["layers.0.attention.qkv", "layers.0.attention.o", "layers.0.feed_forward.w1", "input_proj"]
    mapping = core_key_map(names, qkv_rows=4608)
    qkv = "diffusion_model.layers.0.attention.qkv.weight"
    assert mapping["transformer.layers.0.attention.to_k"] == (qkv, (0, 4608, 4608))
    assert mapping["lora_transformer_layers_0_attention_to_v"] == (qkv, (0, 9216, 4608))
    assert mapping["transformer.layers.0.attention.to_out.0"] == "diffusion_model.layers.0.attention.o.weight"
    assert mapping["unconditional_transformer.layers.0.feed_forward.w1"] == \
        "diffusion_model.layers.0.feed_forward.w1.weight"
    assert mapping["conditional_transformer.input_proj"] == "diffusion_model.input_proj.weight"
    # and every key read_lora accepts for these modules maps to the same module as here
    for key, target in mapping.items():
        mapped = __import__("ideogram4_gguf.models.lora", fromlist=["_map_module"])._map_module(key)
        assert mapped is not None, key
        module = target if isinstance(target, str) else target[0]
        assert module == f"diffusion_model.{mapped[1]}.weight", key
