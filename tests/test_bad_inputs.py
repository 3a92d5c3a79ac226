"""The bad inputs a person really makes, on the command line and in the nodes: one clear error each, found by the
cheap checks before anything heavy loads (the loaders are replaced by tripwires to prove it)."""

import math

import pytest

from ideogram4_gguf import pipeline
from ideogram4_gguf.cli import main

from .nodes.fake_comfy_api import install

install()  # the node modules import without ComfyUI

LONG_PROMPT = "a red fox " * 700  # far over 2048 tokens with any Qwen vocabulary


@pytest.fixture
def tripwires(monkeypatch):
    """Fail the test if the DiT, the text encoder or the VAE starts loading."""
    for name in ("load_model", "load_encoder", "load_vae"):
        monkeypatch.setattr(pipeline, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran before the check"))


def generate(demo_models, tmp_path, *extra, prompt="a red fox"):
    return ["generate", prompt, "--dit", str(demo_models.dit), "--text-encoder", str(demo_models.text_encoder),
            "--vae", str(demo_models.vae), "--width", "256", "--height", "256", "--device", "cpu",
            "--out", str(tmp_path / "out.png"), *extra]


@pytest.mark.parametrize("extra, expected", [
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--polish-guidance", "inf"], "polish_guidance must be a finite number"),
    (["--mu=-inf"], "mu must be a finite number"),
    (["--seed=-1"], "seed -1 is out of range"),
    (["--seed", str(2**64)], "out of range"),
    (["--width", "250"], "width 250 is not supported"),
    (["--steps", "0"], "steps must be"),
    (["--batch", "17"], "batch_size must be"),
    (["--device", "cuda"], "not available on this machine"),
    (["--device", "banana"], "Unknown device"),
    (["--branch-prefixes", "only-one"], "give two prefixes"),
])
def test_cli_refuses_bad_numbers_and_devices_first(demo_models, tmp_path, capsys, tripwires, extra, expected):
    if extra[:2] == ["--device", "cuda"] and pipeline.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(generate(demo_models, tmp_path, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and err.startswith("error: ") and len(err.splitlines()) == 1


def test_cli_unavailable_device_names_what_is_there(demo_models, tmp_path, capsys, tripwires):
    if pipeline.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    main(generate(demo_models, tmp_path, "--device", "cuda:0"))
    assert "this torch build sees: cpu" in capsys.readouterr().err


def test_cli_checks_the_output_folder_first(demo_models, tmp_path, capsys, tripwires):
    args = generate(demo_models, tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "missing" / "out.png")
    assert main(args) == 1
    assert "output folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag, wrong", [("--dit", "vae"), ("--text-encoder", "dit"), ("--vae", "text_encoder")])
def test_cli_checks_every_file_header_first(demo_models, tmp_path, capsys, tripwires, flag, wrong):
    args = generate(demo_models, tmp_path)
    args[args.index(flag) + 1] = str(getattr(demo_models, wrong))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert getattr(demo_models, wrong).name in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_too_long_prompt_before_loading_and_names_the_switch(demo_models, tmp_path, capsys, tripwires):
    assert main(generate(demo_models, tmp_path, prompt=LONG_PROMPT)) == 1
    err = capsys.readouterr().err
    assert "tokens long" in err and "--truncate" in err


def test_cli_strict_prompt_says_it_refuses(demo_models, tmp_path, capsys, tripwires):
    assert main(generate(demo_models, tmp_path, "--strict-prompt", prompt='{"broken": ')) == 1
    err = capsys.readouterr().err
    assert "Strict JSON captions are on" in err and "passed on as plain text" not in err
    assert main(generate(demo_models, tmp_path, "--strict-prompt")) == 1
    assert "plain text, not a JSON caption" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The nodes' queue-time checks (ComfyUI runs validate_inputs before executing anything)


def test_sampler_and_guider_refuse_non_finite_guidance():
    from ideogram4_gguf.nodes.core_graph import IG4OfficialGuider, IG4OfficialSigmas
    from ideogram4_gguf.nodes.sampler import IG4Sampler

    assert "guidance must be a finite number" in IG4Sampler.validate_inputs(guidance=math.nan)
    assert "polish_guidance" in IG4Sampler.validate_inputs(guidance=7.0, polish_guidance=math.inf)
    assert IG4Sampler.validate_inputs(guidance=7.0, polish_guidance=3.0, mu=0.0, std=1.75) is True
    assert "outside" in IG4Sampler.validate_inputs(guidance=31.0)
    assert "guidance" in IG4OfficialGuider.validate_inputs(guidance=math.nan)
    assert "std" in IG4OfficialSigmas.validate_inputs(mu=0.0, std=math.inf)


def test_file_nodes_check_headers_at_queue_time(demo_models):
    from ideogram4_gguf.nodes.core_graph import IG4CoreModelLoader
    from ideogram4_gguf.nodes.decode import IG4VAEDecode
    from ideogram4_gguf.nodes.encode import IG4TextEncode
    from ideogram4_gguf.nodes.loader import IG4ModelLoader

    assert IG4ModelLoader.validate_inputs(dit_name=str(demo_models.dit)) is True
    assert "not an Ideogram 4 DiT" in IG4ModelLoader.validate_inputs(dit_name=str(demo_models.vae))
    assert "not an Ideogram 4 DiT" in IG4CoreModelLoader.validate_inputs(dit_name=str(demo_models.text_encoder))
    assert "GGUF VAEs are not supported" in IG4VAEDecode.validate_inputs(vae_name=str(demo_models.dit))
    assert "not a readable safetensors" in IG4VAEDecode.validate_inputs(vae_name=str(demo_models.tokenizer))
    assert "not found" in IG4ModelLoader.validate_inputs(dit_name=str(demo_models.root / "nope.gguf"))
    te = str(demo_models.text_encoder)
    assert IG4TextEncode.validate_inputs(text_encoder=te, prompt="a red fox") is True
    assert IG4TextEncode.validate_inputs(text_encoder=te, prompt=None) is True  # linked: checked when it runs
    too_long = IG4TextEncode.validate_inputs(text_encoder=te, prompt=LONG_PROMPT)
    assert "tokens long" in too_long and "truncate" in too_long
    assert IG4TextEncode.validate_inputs(text_encoder=te, prompt=LONG_PROMPT, truncate=True) is True
    assert "Strict JSON" in IG4TextEncode.validate_inputs(text_encoder=te, prompt="plain", strict_json=True)
    assert "empty" in IG4TextEncode.validate_inputs(text_encoder=te, prompt="   ")
    assert "Qwen3-VL" in IG4TextEncode.validate_inputs(text_encoder=str(demo_models.vae), prompt="x")
