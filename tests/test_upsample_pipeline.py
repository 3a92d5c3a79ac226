"""Local prompt upsampling through the pipeline, the node and the command line, on the tiny demo set (its text
encoder GGUF carries an lm_head like a llama.cpp Qwen3-VL GGUF). The generation itself is checked against
transformers' `generate` (greedy tokens equal) in tests/prompts/test_upsample.py."""

import pytest
import torch
from safetensors.torch import save_file

from ideogram4_gguf import pipeline
from ideogram4_gguf.cli import main
from ideogram4_gguf.errors import ModelFileError, PromptError
from ideogram4_gguf.prompts.caption import validate_caption

from .nodes.fake_comfy_api import install

install()


def headless_text_encoder(path, vocab=400, hidden=32, layers=36):
    """A Qwen3 text model (`model.*` names) without lm_head: it encodes, it cannot write."""
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (32, hidden)), ("self_attn.k_proj", (16, hidden)),
                            ("self_attn.v_proj", (16, hidden)), ("self_attn.o_proj", (hidden, 32)),
                            ("mlp.gate_proj", (64, hidden)), ("mlp.up_proj", (64, hidden)),
                            ("mlp.down_proj", (hidden, 64))):
            t[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.1
        for name, size in (("self_attn.q_norm", 16), ("self_attn.k_norm", 16), ("input_layernorm", hidden),
                           ("post_attention_layernorm", hidden)):
            t[p + name + ".weight"] = torch.ones(size)
    save_file(t, str(path))
    return path


def test_upsample_gives_a_valid_caption_and_is_seeded(demo_models):
    first = pipeline.upsample(demo_models.text_encoder, 'a poster that says "HELLO"', width=512, height=256,
                              seed=5, max_new_tokens=24, temperature=0.9, device="cpu")
    again = pipeline.upsample(demo_models.text_encoder, 'a poster that says "HELLO"', width=512, height=256,
                              seed=5, max_new_tokens=24, temperature=0.9, device="cpu")
    assert first.reply == again.reply and first.prompt == again.prompt
    assert validate_caption(first.caption) == [] and "HELLO" in first.prompt


@pytest.mark.parametrize("kwargs, message", [({"temperature": float("nan")}, "temperature"),
                                             ({"max_new_tokens": 5}, "max_new_tokens"),
                                             ({"seed": -1}, "seed")])
def test_upsample_refuses_bad_settings(demo_models, kwargs, message):
    with pytest.raises((PromptError, ValueError), match=message):
        pipeline.upsample(demo_models.text_encoder, "a fox", device="cpu", **kwargs)


def test_a_text_encoder_without_lm_head_is_a_clear_error(tmp_path):
    path = headless_text_encoder(tmp_path / "qwen3-encoder-only.safetensors")
    with pytest.raises(ModelFileError, match="has no language-model head") as info:
        pipeline.upsample(path, "a fox", device="cpu")
    assert "qwen3-encoder-only.safetensors" in str(info.value) and "lm_head" in str(info.value)


def test_upsample_node(demo_models):
    from ideogram4_gguf.nodes.upsample import IG4PromptUpsample

    out = IG4PromptUpsample.execute(text_encoder=str(demo_models.text_encoder), idea="a red fox", width=1024,
                                    height=1024, seed=3, temperature=0.0, max_tokens=32)
    [prompt] = out.args
    assert prompt.startswith("{") and prompt in out.ui.text
    assert "temperature" in IG4PromptUpsample.validate_inputs(temperature=float("inf"), max_tokens=64)


def test_generate_with_upsample(demo_models, tmp_path, capsys):
    out = tmp_path / "up.png"
    args = ["generate", "a fox poster that says HELLO", "--upsample", "--upsample-temperature", "0",
            "--dit", str(demo_models.dit), "--text-encoder", str(demo_models.text_encoder), "--vae",
            str(demo_models.vae), "--width", "256", "--height", "256", "--preset", "turbo", "--steps", "1",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0 and out.is_file()
    err = capsys.readouterr().err
    assert "caption: {" in err and "HELLO" in err  # the idea's quoted word survives (fallback caption or not)
