"""LoRAs through the pipeline, the node and the command line on the tiny demo models: every memory mode, stacking,
strength 0, and the base model left exactly as it was."""

import pytest
import torch

from ideogram4_gguf import pipeline
from ideogram4_gguf.cli import main, parse_lora_spec
from ideogram4_gguf.errors import ModelFileError

from .conftest import write_lora_for

SIZE = 256


@pytest.fixture(scope="module")
def conditioning(demo_models):
    return pipeline.encode_prompt(demo_models.text_encoder, "a red fox", device="cpu")


def sample(model, conditioning, seed=3):
    return pipeline.sample_latents(model, conditioning, width=SIZE, height=SIZE, seed=seed, preset="turbo",
                                   steps=2)["samples"]


@pytest.mark.parametrize("mode", ["gpu", "stream_uncond", "cpu_offload"])
def test_a_lora_in_every_memory_mode(demo_models, demo_lora, conditioning, mode, tmp_path):
    base = pipeline.load_model(demo_models.dit, device="cpu", memory_mode=mode)
    uncond_lora = write_lora_for(base.uncond_branch, tmp_path / "u.safetensors", prefix="unconditional_transformer.",
                                 seed=5)
    plain = sample(base, conditioning)
    lora = base.with_lora(pipeline.read_lora(demo_lora), 0.8).with_lora(pipeline.read_lora(uncond_lora), -0.5)
    assert [a.branch for a in lora.loras] == ["cond", "uncond"]
    with_lora = sample(lora, conditioning)
    assert (with_lora - plain).abs().max() > 1e-3
    assert base.loras == () and torch.equal(sample(base, conditioning), plain)  # the base model is untouched
    # shared placement: the LoRA model and its base are one placement on the device
    assert lora.placement is base.placement


def test_memory_modes_give_the_same_lora_image(demo_models, demo_lora, conditioning):
    results = []
    for mode in ("gpu", "stream_uncond", "cpu_offload"):
        model = pipeline.load_model(demo_models.dit, device="cpu", memory_mode=mode)
        results.append(sample(model.with_lora(pipeline.read_lora(demo_lora), 0.8), conditioning))
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-6)
    assert torch.allclose(results[0], results[2], rtol=0, atol=1e-6)


def test_strength_zero_is_the_plain_image(demo_models, demo_lora, conditioning):
    model = pipeline.load_model(demo_models.dit, device="cpu")
    assert torch.equal(sample(model.with_lora(pipeline.read_lora(demo_lora), 0.0), conditioning),
                       sample(model, conditioning))


def test_both_branches(demo_models, demo_lora):
    model = pipeline.load_model(demo_models.dit, device="cpu")
    both = model.with_lora(pipeline.read_lora(demo_lora), 1.0, "both")
    assert [a.branch for a in both.loras] == ["cond", "uncond"]
    assert "LoRA ideogram4-tiny-demo-lora.safetensors x1 on cond" in both.summary()


@pytest.mark.parametrize("spec, expected", [
    ("a.safetensors", ("a.safetensors", 1.0, "auto")),
    ("a.safetensors:0.5", ("a.safetensors", 0.5, "auto")),
    ("a.safetensors:-1.25:uncond", ("a.safetensors", -1.25, "uncond")),
    ("a.safetensors::both", ("a.safetensors", 1.0, "both")),
    (r"C:\loras\a.safetensors:0.7:cond", (r"C:\loras\a.safetensors", 0.7, "cond")),
    ("dir:with:colons/a.safetensors", ("dir:with:colons/a.safetensors", 1.0, "auto")),
])
def test_lora_spec_parsing(spec, expected):
    assert parse_lora_spec(spec) == expected


@pytest.mark.parametrize("spec", [":0.5", "a.safetensors:nan", "a.safetensors:inf:cond"])
def test_bad_lora_specs(spec):
    with pytest.raises(ModelFileError):
        parse_lora_spec(spec)


def test_generate_with_lora(demo_models, demo_lora, tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["generate", "a red fox", "--dit", str(demo_models.dit), "--text-encoder", str(demo_models.text_encoder),
            "--vae", str(demo_models.vae), "--width", "256", "--height", "256", "--preset", "turbo", "--steps", "2",
            "--device", "cpu", "--out", str(out), "--lora", f"{demo_lora}:0.7"]
    assert main(args) == 0 and out.is_file()
    assert "LoRA ideogram4-tiny-demo-lora.safetensors" in capsys.readouterr().err


def test_generate_refuses_a_bad_lora_before_loading_the_dit(demo_models, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the DiT was loaded first"))
    args = ["generate", "x", "--dit", str(demo_models.dit), "--text-encoder", str(demo_models.text_encoder),
            "--vae", str(demo_models.vae), "--device", "cpu", "--lora", str(tmp_path / "bad.safetensors")]
    assert main(args) == 1
    assert "bad.safetensors" in capsys.readouterr().err

