"""Each node's execute on the tiny demo models, without ComfyUI (a recording stand-in for comfy_api)."""

import json

import pytest
import torch

from ideogram4_gguf import pipeline
from ideogram4_gguf.demo import DEMO_PROMPT
from ideogram4_gguf.errors import LatentFormatError, ModelFileError, PromptError, SamplingError
from ideogram4_gguf.nodes import NODES, comfy_adapter
from ideogram4_gguf.nodes.decode import IG4VAEDecode
from ideogram4_gguf.nodes.encode import IG4TextEncode, _kept
from ideogram4_gguf.nodes.json_prompt import IG4JsonPrompt
from ideogram4_gguf.nodes.loader import IG4ModelLoader
from ideogram4_gguf.nodes.sampler import IG4Sampler
from ideogram4_gguf.prompts.caption import minify, validate_caption

CORE_NODE_IDS = {"Ideogram4Scheduler", "DualModelGuider", "CFGOverride", "BuildJsonPromptIdeogram",
                 "CreateBoundingBoxes", "IdeogramV4", "VAEDecode", "UNETLoader", "CLIPLoader"}


def test_schemas_are_complete():
    ids = set()
    for node in NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("IG4") and schema.node_id not in CORE_NODE_IDS
        assert schema.category.split("/")[0] == "Ideogram4" and schema.description and schema.display_name
        for item in schema.inputs:
            assert item.options.get("tooltip"), f"{schema.node_id}.{item.id} has no tooltip"
        ids.add(schema.node_id)
    assert len(ids) == len(NODES)
    names = {n.define_schema().display_name for n in NODES}
    assert {"Ideogram4 Q4_K Loader", "Qwen3-VL Encode", "Ideogram4 Sampler", "Ideogram4 JSON Prompt"} <= names
    seed = next(i for i in IG4Sampler.define_schema().inputs if i.id == "seed")
    assert seed.options["control_after_generate"] is True


def run(node, **inputs):
    return node.execute(**inputs)


@pytest.fixture
def model(demo_models):
    return run(IG4ModelLoader, dit_name=str(demo_models.dit)).args[0]


@pytest.fixture
def conditioning(demo_models):
    return run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt=minify(DEMO_PROMPT)).args[0]


def test_loader(demo_models, model):
    assert isinstance(model, pipeline.Ideogram4Model)
    assert model.cond_branch.with_text and not model.uncond_branch.with_text
    assert run(IG4ModelLoader, dit_name=str(demo_models.dit)).args[0] is model  # shared while in use
    with pytest.raises(ModelFileError, match="already holds both branches"):
        run(IG4ModelLoader, dit_name=str(demo_models.dit), uncond_name=str(demo_models.dit))
    with pytest.raises(ModelFileError, match="not found"):
        run(IG4ModelLoader, dit_name=str(demo_models.root / "missing.gguf"))
    with pytest.raises(ModelFileError, match="not an Ideogram 4 DiT"):
        run(IG4ModelLoader, dit_name=str(demo_models.vae))


def test_encode(demo_models, conditioning):
    output = run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt=minify(DEMO_PROMPT))
    again = output.args[0]
    assert torch.equal(again.text_taps, conditioning.text_taps)  # deterministic
    assert conditioning.text_taps.shape == (conditioning.token_count, 13 * 64)
    assert f"{conditioning.token_count} tokens" in output.ui.text and len(_kept) == 1  # kept by default
    plain = run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt="a poster that says HELLO")
    assert "JSON" in plain.ui.text  # the plain-text warning is shown on the node
    with pytest.raises(PromptError):
        run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt="plain", strict_json=True)
    with pytest.raises(PromptError, match="empty"):
        run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt="   ")
    with pytest.raises(ModelFileError, match="not a Qwen3-VL-8B text encoder"):
        run(IG4TextEncode, text_encoder=str(demo_models.dit), prompt="x")
    kept = run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt="hello", keep_loaded=True)
    assert len(_kept) == 1 and kept.args[0].token_count > 0
    run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt="hello", keep_loaded=False)
    assert not _kept


def test_sampler_and_decode_match_the_pipeline(demo_models, model, conditioning):
    inputs = dict(model=model, conditioning=conditioning, width=256, height=320, batch_size=2, seed=11,
                  preset="turbo")
    latent = run(IG4Sampler, **inputs).args[0]
    assert latent["samples"].shape == (2, 128, 20, 16) and latent["ideogram4_latent"]
    reference = pipeline.sample_latents(model, conditioning, width=256, height=320, seed=11, batch_size=2,
                                        preset="turbo")
    assert torch.equal(latent["samples"], reference["samples"])
    image = run(IG4VAEDecode, latent=latent, vae_name=str(demo_models.vae)).args[0]
    assert image.shape == (2, 320, 256, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
    overridden = run(IG4Sampler, **inputs, steps=3, guidance=5.0, polish_steps=0, custom_schedule=True, mu=0.2,
                     std=1.0, terminal="one").args[0]
    assert not torch.equal(overridden["samples"], latent["samples"])
    with pytest.raises(SamplingError, match="multiple of 16"):
        run(IG4Sampler, **{**inputs, "width": 250})


def test_sampler_interruption(monkeypatch, model, conditioning):
    class Interrupted(BaseException):  # ComfyUI's InterruptProcessingException is a BaseException too
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    monkeypatch.setattr(comfy_adapter, "throw_if_interrupted", interrupt)
    with pytest.raises(Interrupted):
        run(IG4Sampler, model=model, conditioning=conditioning, width=256, height=256, batch_size=1, seed=0,
            preset="default")
    assert len(calls) == 3  # stopped at step 3 of 20


def test_decode_refuses_a_core_latent_without_statistics(demo_models):
    core = {"samples": torch.randn(1, 128, 16, 16)}
    with pytest.raises(LatentFormatError, match="not from Ideogram4 Sampler"):
        run(IG4VAEDecode, latent=core, vae_name=str(demo_models.vae))


def test_json_prompt():
    output = run(IG4JsonPrompt, high_level_description="A poster", background="plain beige",
                 elements="text | HELLO | bold black letters | 380,200,620,800 | #000000\n"
                          "obj | a red cube | 600,100,900,400",
                 style="art", aesthetics="minimal", lighting="flat", medium="poster", photo_or_art_style="swiss",
                 color_palette="#ffffff, #000000")
    caption = json.loads(output.args[0])
    assert validate_caption(caption) == []
    assert list(caption) == ["high_level_description", "style_description", "compositional_deconstruction"]
    assert caption["style_description"]["color_palette"] == ["#FFFFFF", "#000000"]
    elements = caption["compositional_deconstruction"]["elements"]
    assert elements[0] == {"type": "text", "bbox": [380, 200, 620, 800], "text": "HELLO",
                           "desc": "bold black letters", "color_palette": ["#000000"]}
    assert elements[1]["type"] == "obj" and "caption OK" in output.ui.text
    assert output.args[0] == minify(caption)  # minified, canonical
    with pytest.raises(PromptError, match="background"):
        run(IG4JsonPrompt, high_level_description="x", background="", elements="")
    with pytest.raises(PromptError, match="line 1"):
        run(IG4JsonPrompt, high_level_description="x", background="y", elements="picture | a cat")
    with pytest.raises(PromptError, match="bbox"):
        run(IG4JsonPrompt, high_level_description="x", background="y", elements="obj | cat | 10,20,5,900")


def test_latent_to_core_flux2_round_trip(demo_models, model, conditioning, tmp_path):
    """Our latent -> core FLUX.2 latent (with a VAE file's bn statistics) -> our decode node (which converts core
    latents back with the same statistics) gives the image of decoding our latent directly."""
    from safetensors.torch import load_file, save_file

    from ideogram4_gguf.nodes.latent_convert import IG4LatentToFlux2

    state = load_file(demo_models.vae)
    generator = torch.Generator().manual_seed(3)
    state["bn.running_mean"] = torch.randn(128, generator=generator) * 0.3
    state["bn.running_var"] = 2.0 + 1.5 * torch.rand(128, generator=generator)
    vae_with_stats = tmp_path / "flux2-vae-with-bn.safetensors"
    save_file(state, vae_with_stats)

    latent = run(IG4Sampler, model=model, conditioning=conditioning, width=256, height=256, batch_size=1, seed=2,
                 preset="turbo", steps=2).args[0]
    core = run(IG4LatentToFlux2, latent=latent, vae_name=str(vae_with_stats)).args[0]
    assert "ideogram4_latent" not in core and core["samples"].shape == latent["samples"].shape
    assert not torch.allclose(core["samples"], latent["samples"])  # really renormalised and reordered
    direct = run(IG4VAEDecode, latent=latent, vae_name=str(vae_with_stats)).args[0]
    via_core = run(IG4VAEDecode, latent=core, vae_name=str(vae_with_stats)).args[0]
    assert (direct - via_core).abs().max() < 1e-5
    with pytest.raises(LatentFormatError, match="no latent statistics"):
        run(IG4LatentToFlux2, latent=latent, vae_name=str(demo_models.vae))
    with pytest.raises(LatentFormatError, match="not from Ideogram4 Sampler"):
        run(IG4LatentToFlux2, latent=core, vae_name=str(vae_with_stats))


def test_lora_node_chains_and_reports(demo_models, demo_lora, model, tmp_path):
    from ideogram4_gguf.nodes.lora import IG4LoraLoader

    from ..conftest import write_lora_for

    first = run(IG4LoraLoader, model=model, lora_name=str(demo_lora), strength=0.8, branch="auto")
    with_lora = first.args[0]
    assert "LoRA tensors matched" in first.ui.text and "on cond" in first.ui.text
    assert model.loras == () and [(a.branch, a.strength) for a in with_lora.loras] == [("cond", 0.8)]
    uncond_file = write_lora_for(model.uncond_branch, tmp_path / "uncond_style.safetensors", seed=3)
    second = run(IG4LoraLoader, model=with_lora, lora_name=str(uncond_file), strength=-0.5, branch="auto")
    assert [a.branch for a in second.args[0].loras] == ["cond", "uncond"]  # "uncond" in the file name
    assert "file name" in second.ui.text
    both = run(IG4LoraLoader, model=model, lora_name=str(demo_lora), strength=1.0, branch="both")
    assert [a.branch for a in both.args[0].loras] == ["cond", "uncond"]
    assert IG4LoraLoader.validate_inputs(strength=float("nan")) != True  # noqa: E712
    with pytest.raises(ModelFileError, match="not found"):
        run(IG4LoraLoader, model=model, lora_name=str(tmp_path / "missing.safetensors"))


def test_core_conditioning_output(demo_models):
    output = run(IG4TextEncode, text_encoder=str(demo_models.text_encoder), prompt=minify(DEMO_PROMPT))
    ours, core = output.args
    [[taps, extra]] = core
    assert taps.shape == (1, ours.token_count, 13 * 64) and torch.equal(taps[0], ours.text_taps) and extra == {}


def test_basic_and_advanced_nodes_run_what_the_legacy_ones_ran(demo_models, model, conditioning):
    """The redesigned nodes show real values; the same settings give bit-identical latents to the deprecated nodes
    that older workflows still use."""
    from ideogram4_gguf.nodes.loader import IG4Loader, IG4LoaderAdvanced
    from ideogram4_gguf.nodes.sampler import IG4PresetSampler, IG4SamplerAdvanced
    from ideogram4_gguf.sampler.presets import PRESETS

    assert run(IG4Loader, dit_name=str(demo_models.dit)).args[0] is model  # one load shared with the legacy node
    assert run(IG4LoaderAdvanced, dit_name=str(demo_models.dit), branch_prefixes="").args[0] is model
    with pytest.raises(ModelFileError, match="branch_prefixes"):
        run(IG4LoaderAdvanced, dit_name=str(demo_models.dit), branch_prefixes="only-one")
    base = dict(model=model, conditioning=conditioning, width=256, height=256, batch_size=1, seed=11)
    for preset in ("turbo", "default"):
        p = PRESETS[preset]
        legacy = run(IG4Sampler, **base, preset=preset).args[0]["samples"]
        basic = run(IG4PresetSampler, **base, preset=preset).args[0]["samples"]
        advanced = run(IG4SamplerAdvanced, **base, steps=p.steps, cfg=p.guidance, polish_steps=p.polish_steps,
                       polish_cfg=p.polish_guidance, mu=p.mu, std=p.std).args[0]["samples"]
        assert torch.equal(legacy, basic) and torch.equal(basic, advanced)
    assert "polish_steps" in IG4SamplerAdvanced.validate_inputs(steps=4, polish_steps=5)
    assert IG4SamplerAdvanced.validate_inputs(steps=20, cfg=7.0, polish_steps=2, polish_cfg=3.0, mu=0.0,
                                              std=1.75) is True
    defaults = {i.id: i.options.get("default") for i in IG4SamplerAdvanced.define_schema().inputs}
    assert (defaults["steps"], defaults["cfg"], defaults["polish_steps"]) == (20, 7.0, 2)  # real values, no 0 / -1
