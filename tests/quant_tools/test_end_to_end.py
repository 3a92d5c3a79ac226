"""quantize -> inspect -> verify through the command line, on tiny random Ideogram 4 models in every layout.

References: gguf-py 0.19 (`GGUFReader` for the container, `gguf.quants.dequantize`), ggml's reference quantizer
(ggml-python 0.0.45) for the bytes of every quantized tensor, hashlib for the recorded source hashes.
"""

import errno
import hashlib
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ideogram4_gguf.quant_tools import build
from ideogram4_gguf.quant_tools.cli import main

LAYOUTS = ["fp8_repo", "fp8_sharded", "bf16_diffusers", "bf16_fused", "comfy", "fp16", "fp32"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def built(layouts, tmp_path_factory):
    """One q4_k GGUF per layout (built once for the module)."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for name in LAYOUTS:
        path = out / f"{name}.gguf"
        assert main(["quantize", *layouts[name], "--recipe", "q4_k", "--out", str(path), "--no-progress"]) == 0
        files[name] = path
    return files


def _tensors(path):
    reader = gguf.GGUFReader(path)
    return {t.name: t for t in reader.tensors}, reader


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_inspect_verify(capsys, layouts, built, layout):
    code, out, err = _run(capsys, "inspect", built[layout])
    assert code == 0, err
    assert "architecture: ideogram4" in out
    assert "conditional_transformer. 42 tensors, unconditional_transformer. 42 tensors" in out
    assert "types: Q4_K 34" in out and "F16 50" in out
    assert "MISMATCH" not in out
    code, out, err = _run(capsys, "verify", built[layout], *layouts[layout], "--no-progress")
    assert code == 0, out + err
    assert "verify ok: 84 tensors" in out


def test_file_layout_metadata_and_bytes(built, layouts, small_models, ggml_quantize):
    tensors, reader = _tensors(built["fp8_repo"])
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "ideogram4"
    assert fields["ideogram4.hidden_size"] == 256 and fields["ideogram4.num_layers"] == 2
    assert fields["ideogram4.num_heads"] == 2 and fields["ideogram4.head_dim"] == 128
    assert fields["ideogram4.intermediate_size"] == 512 and fields["ideogram4.adaln_dim"] == 256
    assert fields["ideogram4.in_channels"] == 128 and fields["ideogram4.llm_features_dim"] == 832
    assert fields["ideogram4.mrope_section"] == [4, 2, 2] and fields["ideogram4.rope_theta"] == 5e6
    assert fields["ideogram4.branches"] == ["conditional", "unconditional"]
    assert fields["ideogram4.branch_prefixes"] == ["conditional_transformer.", "unconditional_transformer."]
    assert json.loads(fields["ideogram4.recipe"])["name"] == "q4_k"
    assert fields["ideogram4.quant_tools_version"] == build.__version__

    repo = layouts["fp8_repo"][1]
    recorded = dict(e.rsplit(":", 1) for e in fields["ideogram4.source_sha256"])
    for role, sub in (("conditional", "transformer"), ("unconditional", "unconditional_transformer")):
        path = os.path.join(repo, sub, "diffusion_pytorch_model.safetensors")
        assert recorded[f"{role}/diffusion_pytorch_model.safetensors"] == hashlib.sha256(open(path, "rb").read()).hexdigest()

    assert len(tensors) == 84
    qkv = tensors["unconditional_transformer.layers.1.attention.qkv.weight"]
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert list(qkv.shape) == [256, 768]  # GGUF order: ne0 = in_features
    assert tensors["conditional_transformer.input_proj.weight"].tensor_type == gguf.GGMLQuantizationType.F16

    # the stored bytes are ggml's reference quantization of fp8 * weight_scale (float32)
    import torch

    fused, _, _ = small_models["uncond"]
    w = fused["layers.1.attention.qkv.weight"]
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 448.0
    source = ((w / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]).numpy()
    assert np.array_equal(np.asarray(qkv.data), ggml_quantize(source, "Q4_K"))


def test_same_weights_in_different_layouts_give_the_same_tensors(built):
    def data(path):
        tensors, _ = _tensors(path)
        return {name: np.asarray(t.data).tobytes() for name, t in tensors.items()}

    assert data(built["fp8_repo"]) == data(built["fp8_sharded"])
    assert data(built["bf16_diffusers"]) == data(built["bf16_fused"])  # split names fused exactly


@pytest.mark.parametrize("recipe, types", [("q4_k_m", {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16"}),
                                           ("q8_0", {"Q8_0", "F16"})])
def test_other_recipes_end_to_end(capsys, layouts, tmp_path, recipe, types):
    out = tmp_path / f"{recipe}.gguf"
    code, _, err = _run(capsys, "quantize", *layouts["fp8_repo"], "--recipe", recipe, "--out", out, "--no-progress")
    assert code == 0, err
    tensors, _ = _tensors(out)
    assert {t.tensor_type.name for t in tensors.values()} == types
    code, text, err = _run(capsys, "verify", out, *layouts["fp8_repo"], "--no-progress", "--exact")
    assert code == 0, text + err


def test_single_branch_file_with_bare_names(capsys, layouts, tmp_path):
    out = tmp_path / "uncond.gguf"
    code, _, err = _run(capsys, "quantize", *layouts["fp8_repo"], "--single-branch", "uncond", "--out", out,
                        "--no-progress")
    assert code == 0, err
    tensors, reader = _tensors(out)
    assert "layers.0.attention.qkv.weight" in tensors and len(tensors) == 42
    assert reader.fields["ideogram4.branches"].contents() == ["unconditional"]
    assert "ideogram4.branch_prefixes" not in reader.fields
    code, text, err = _run(capsys, "verify", out, *layouts["fp8_repo"], "--no-progress")
    assert code == 0, text + err
    code, text, err = _run(capsys, "inspect", out)
    assert "(bare names) 42 tensors" in text


def test_verify_catches_swapped_branches(capsys, layouts, built):
    swapped = ["--source", layouts["fp16"][3], "--source-uncond", layouts["fp16"][1]]
    code, out, _ = _run(capsys, "verify", built["fp16"], *swapped, "--no-progress")
    assert code == 1
    assert "verify FAILED" in out and "sha256" in out and "relative RMSE" in out


def test_verify_catches_a_different_recipe(capsys, layouts, built):
    code, out, _ = _run(capsys, "verify", built["fp16"], *layouts["fp16"], "--recipe", "q8_0", "--no-progress",
                        "--no-hash")
    assert code == 1
    assert "stored as Q4_K, the recipe says Q8_0" in out


def test_verify_catches_corrupt_tensor_bytes(capsys, layouts, built, tmp_path):
    tensors, _ = _tensors(built["fp16"])
    victim = tensors["conditional_transformer.layers.0.feed_forward.w1.weight"]
    damaged = tmp_path / "damaged.gguf"
    data = bytearray(built["fp16"].read_bytes())
    data[victim.data_offset: victim.data_offset + victim.n_bytes] = os.urandom(victim.n_bytes)
    damaged.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "verify", damaged, *layouts["fp16"], "--no-progress")
    assert code == 1
    assert "conditional_transformer.layers.0.feed_forward.w1.weight" in out.split("verify FAILED")[1]


def test_bad_input_gives_a_clear_error(capsys, layouts, tmp_path):
    code, _, err = _run(capsys, "quantize", "--source", tmp_path / "missing", "--out", tmp_path / "x.gguf")
    assert code == 2 and "error: --source" in err and "no such file or folder" in err
    code, _, err = _run(capsys, "quantize", "--source", layouts["fp16"][1], "--out", tmp_path / "x.gguf")
    assert code == 2 and "--source-uncond" in err
    code, _, err = _run(capsys, "inspect", layouts["fp16"][1])
    assert code == 2 and "not a readable GGUF file" in err
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_force(capsys, layouts, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    code, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress")
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"
    code, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress", "--force")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"


def _fail_after_first_chunk(monkeypatch, error):
    original = build._write_tensor
    calls = []

    def failing(fout, planned, threads):
        for done in original(fout, planned, threads):
            calls.append(done)
            if len(calls) == 3:
                raise error
            yield done

    monkeypatch.setattr(build, "_write_tensor", failing)


@pytest.mark.parametrize("error, code, message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "disk full"),
])
def test_failure_midway_leaves_no_file(capsys, monkeypatch, layouts, tmp_path, error, code, message):
    _fail_after_first_chunk(monkeypatch, error)
    out = tmp_path / "x.gguf"
    got, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress")
    assert got == code and message in err
    assert list(tmp_path.iterdir()) == []  # neither x.gguf nor x.gguf.partial


def test_dry_run_writes_nothing(capsys, layouts, tmp_path):
    code, out, _ = _run(capsys, "quantize", *layouts["comfy"], "--out", tmp_path / "x.gguf", "--dry-run")
    assert code == 0 and "prefix 'model.diffusion_model.' stripped" in out and "Q4_K" in out
    assert list(tmp_path.iterdir()) == []


def test_runs_as_top_level_package_without_torch(repo_root, built):
    # `python -m quant_tools` from the repository root, and no torch import anywhere in quant_tools
    code = ("import sys, runpy; sys.argv = ['quant_tools', 'inspect', sys.argv[1]]\n"
            "try:\n    runpy.run_module('quant_tools', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "import quant_tools.verify, quant_tools.build, quant_tools.sources\n"
            "assert 'torch' not in sys.modules, 'quant_tools imported torch'\n"
            "assert 'ideogram4_gguf' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code, str(built["fp16"])], cwd=repo_root, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert "architecture: ideogram4" in result.stdout


def test_inspect_a_file_written_by_another_tool(capsys, tmp_path, small_models):
    # an sd.cpp-style single-branch file: bare names, no metadata at all, BF16 / Q8_0 mix
    import torch

    fused, _, _ = small_models["cond"]
    writer = gguf.GGUFWriter(tmp_path / "other.gguf", "unknown")
    for name, value in fused.items():
        array = value.float().numpy()
        if array.ndim == 2 and name.startswith("layers."):
            data = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value.to(torch.float16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, out, err = _run(capsys, "inspect", tmp_path / "other.gguf", "--recipe", "q8_0")
    assert code == 0, err
    assert "(bare names) 42 tensors" in out and "F16 30 (" in out and "Q8_0 12 (" in out
    # layer linears agree with q8_0; the global ones (F16 here) are reported as mismatches
    assert "MISMATCH: recipe says Q8_0" in out.split("t_embedding.mlp_in.weight")[1].splitlines()[0]
    code, _, err = _run(capsys, "verify", tmp_path / "other.gguf", "--source", "x")
    assert code == 2 and "records no recipe" in err


@pytest.mark.parametrize("cond, uncond", [("cond.", "uncond."), ("transformer.", "unconditional_transformer."),
                                          ("a.transformer.", "transformer.")])
def test_inspect_finds_the_branches_of_any_two_branch_file(capsys, tmp_path, small_models, cond, uncond):
    # other tools' two-branch files name their branches as they like: the branches are found by their marker
    # tensor, as the runtime finds them (layout.branch_prefixes), one prefix possibly inside another
    import torch

    writer = gguf.GGUFWriter(tmp_path / "pair.gguf", "unknown")
    for prefix, role in ((cond, "cond"), (uncond, "uncond")):
        for name, value in small_models[role][0].items():
            writer.add_tensor(prefix + name, value.to(torch.float16).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, out, err = _run(capsys, "inspect", tmp_path / "pair.gguf")
    assert code == 0, err
    counts = {role: len(small_models[role][0]) for role in ("cond", "uncond")}
    assert f"branches: {cond} {counts['cond']} tensors, {uncond} {counts['uncond']} tensors" in out
    assert "(bare names)" not in out


@pytest.mark.parametrize("value, message", [(float("nan"), "inf or nan"), (1e6, "beyond the float16 range")])
def test_values_a_type_cannot_hold_are_refused(capsys, tmp_path, small_models, layouts, value, message):
    from safetensors.torch import save_file

    fused, _, _ = small_models["cond"]
    state = {k: v.clone() for k, v in fused.items()}
    state["layers.1.ffn_norm1.weight"][3] = value  # a norm gain: stored as F16 by the q4_k recipe
    save_file(state, str(tmp_path / "cond.safetensors"))
    out = tmp_path / "x.gguf"
    code, _, err = _run(capsys, "quantize", "--source", tmp_path / "cond.safetensors", "--single-branch", "cond",
                        "--out", out, "--no-progress")
    assert code == 2 and "layers.1.ffn_norm1.weight" in err and message in err
    assert not out.exists() and not out.with_name("x.gguf.partial").exists()
