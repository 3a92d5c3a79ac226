"""The command line on the tiny demo models: demo, generate, and the errors users see."""

import subprocess
import sys

import numpy as np
from PIL import Image

from ideogram4_gguf.cli import main

from .conftest import ROOT


def test_demo_writes_models_in_comfyui_layout_and_an_image(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--write-models", str(tmp_path / "models")]) == 0
    for sub in ("diffusion_models", "text_encoders", "vae"):
        assert any((tmp_path / "models" / sub).iterdir())
    image = np.asarray(Image.open(out))
    assert image.shape == (256, 256, 3) and image.std() > 5


def test_generate_on_the_tiny_models(demo_models, tmp_path, capsys):
    out = tmp_path / "gen.png"
    args = ["generate", "a poster that says HELLO", "--dit", str(demo_models.dit), "--text-encoder",
            str(demo_models.text_encoder), "--vae", str(demo_models.vae), "--width", "256", "--height", "288",
            "--preset", "turbo", "--steps", "3", "--seed", "7", "--batch", "2", "--out", str(out)]
    assert main(args) == 0
    first = [np.asarray(Image.open(tmp_path / f"gen_{i}.png")) for i in (1, 2)]
    assert first[0].shape == (288, 256, 3) and not np.array_equal(first[0], first[1])
    assert main(args) == 0  # same seed, same images
    assert np.array_equal(np.asarray(Image.open(tmp_path / "gen_1.png")), first[0])
    assert "gen_1.png" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_1(demo_models, tmp_path, capsys):
    common = ["--text-encoder", str(demo_models.text_encoder), "--vae", str(demo_models.vae), "--out",
              str(tmp_path / "x.png")]
    assert main(["generate", "x", "--dit", str(tmp_path / "missing.gguf"), *common]) == 1
    assert "missing.gguf: file not found" in capsys.readouterr().err
    assert main(["generate", "x", "--dit", str(demo_models.dit), "--width", "250", *common]) == 1
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["generate", "x", "--dit", str(demo_models.vae), *common]) == 1
    assert "not an Ideogram 4 DiT" in capsys.readouterr().err


def test_module_entry_points(tmp_path):
    """`python -m ideogram4_gguf` (the package's __main__) and `python -m quant_tools` from the repo root."""
    (tmp_path / "ideogram4_gguf").symlink_to(ROOT)
    pack = subprocess.run([sys.executable, "-m", "ideogram4_gguf", "--help"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert pack.returncode == 0 and "demo" in pack.stdout and "generate" in pack.stdout
    tool = subprocess.run([sys.executable, "-m", "quant_tools", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert tool.returncode == 0 and "quantize" in tool.stdout
