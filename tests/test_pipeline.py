"""pipeline.py: the shared load -> encode -> sample -> decode path (tiny demo models)."""

import shutil

import pytest
import torch

from ideogram4_gguf import pipeline
from ideogram4_gguf.errors import Ideogram4Error, ModelFileError
from ideogram4_gguf.pipeline import TextConditioning


def test_tokenizer_is_found_in_the_release_layout(demo_models, tmp_path):
    """<repo>/text_encoder/<file> + <repo>/tokenizer/tokenizer.json, as the official base repo ships them."""
    repo = tmp_path / "ideogram-4"
    (repo / "text_encoder").mkdir(parents=True)
    (repo / "tokenizer").mkdir()
    shutil.copy(demo_models.tokenizer, repo / "tokenizer" / "tokenizer.json")
    weights = repo / "text_encoder" / "model-00001-of-00002.safetensors"
    weights.write_bytes(b"")
    tokenizer = pipeline.load_tokenizer(weights)
    assert tokenizer.token_to_id("<|im_start|>") is not None
    with pytest.raises(ModelFileError, match="No Qwen tokenizer found"):
        pipeline.load_tokenizer(tmp_path / "elsewhere" / "model.safetensors")
    # an explicit source wins, and a GGUF encoder's own vocabulary is used before any search
    assert pipeline.load_tokenizer(tokenizer_source=demo_models.tokenizer).get_vocab_size() == \
        tokenizer.get_vocab_size()


def test_a_picked_shard_stands_for_its_checkpoint(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    shard = tmp_path / "model-00002-of-00004.safetensors"
    shard.write_bytes(b"")
    assert pipeline.resolve_text_encoder_path(shard) == tmp_path / "model.safetensors.index.json"
    single = tmp_path / "qwen.safetensors"
    single.write_bytes(b"")
    assert pipeline.resolve_text_encoder_path(single) == single


def test_text_features_of_another_encoder_are_refused(demo_models):
    model = pipeline.load_model(demo_models.dit, device="cpu")
    wrong = TextConditioning(torch.randn(5, 13 * 32), "x", 5, encoder_file="qwen3vl-4b.gguf")
    with pytest.raises(ModelFileError, match="qwen3vl-4b.gguf.*does not belong"):
        pipeline.sample_latents(model, wrong, width=256, height=256)


def test_encode_prompt_frees_the_encoder_and_is_deterministic(demo_models, monkeypatch):
    freed = []
    real = pipeline.unload_text_encoder
    monkeypatch.setattr(pipeline, "unload_text_encoder", lambda enc: (freed.append(enc), real(enc)))
    a = pipeline.encode_prompt(demo_models.text_encoder, "a red cube", device="cpu")
    b = pipeline.encode_prompt(demo_models.text_encoder, "a red cube", device="cpu")
    assert len(freed) == 2 and all(p.is_meta for p in freed[0].parameters())
    assert torch.equal(a.text_taps, b.text_taps) and a.token_count == b.token_count
    assert a.warnings  # plain text: the JSON recommendation
    with pytest.raises(ModelFileError, match="feature"):
        pipeline.encode_prompt(demo_models.text_encoder, "x", device="cpu", expected_feature_dim=13 * 4096)


def test_dtype_and_device_resolution():
    assert pipeline.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert pipeline.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert pipeline.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="compute dtype"):
        pipeline.resolve_dtype("int8", "cpu")


def test_memory_modes_give_the_same_latents(demo_models):
    """Every memory mode runs the same maths (on the CPU the streaming copies are CPU clones)."""
    conditioning = pipeline.encode_prompt(demo_models.text_encoder, "a red cube", device="cpu")
    latents = {}
    for mode in ("gpu", "stream_uncond", "cpu_offload"):
        model = pipeline.load_model(demo_models.dit, device="cpu", memory_mode=mode)
        asked = []
        latents[mode] = pipeline.sample_latents(model, conditioning, width=256, height=256, seed=3, preset="turbo",
                                                steps=2, make_room=asked.append)["samples"]
        assert model.placement.mode == mode and mode in model.summary()
        assert len(asked) == 1 and asked[0] > 0  # the computed peak was announced before anything moved
        pipeline.sample_latents(model, conditioning, width=256, height=256, seed=3, preset="turbo", steps=2,
                                make_room=asked.append)
        assert len(asked) == 1  # same mode: the placement is kept
        model.offload()
        assert model.placement is None
    assert torch.equal(latents["gpu"], latents["stream_uncond"]) and torch.equal(latents["gpu"], latents["cpu_offload"])
    with pytest.raises(ValueError, match="memory_mode"):
        pipeline.load_model(demo_models.dit, device="cpu", memory_mode="lowvram")


def test_out_of_memory_while_sampling_names_the_modes_that_fit(demo_models, monkeypatch):
    conditioning = pipeline.encode_prompt(demo_models.text_encoder, "a red cube", device="cpu")
    model = pipeline.load_model(demo_models.dit, device="cpu", memory_mode="gpu")
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def sample(*args, **kwargs):
        raise out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(pipeline, "sample", sample)
    with pytest.raises(pipeline.DeviceMemoryError) as caught:
        pipeline.sample_latents(model, conditioning, width=256, height=256, seed=1, preset="turbo", steps=2)
    error = caught.value
    # still a torch out-of-memory error (ComfyUI unloads models and shows its tip for those) and one of ours
    assert isinstance(error, out_of_memory) and isinstance(error, Ideogram4Error)
    message = str(error)
    assert "memory mode 'gpu'" in message and "Tried to allocate 2.00 GiB" in message
    for mode in ("gpu", "stream_uncond", "cpu_offload"):
        assert f"{mode} {model.peak_bytes(mode, 256, 256, conditioning.token_count) / 1e9:.1f} GB" in message
    assert model.placement is None  # the device copies were released
    monkeypatch.undo()
    latents = pipeline.sample_latents(model, conditioning, width=256, height=256, seed=1, preset="turbo", steps=2)
    assert latents["samples"].shape[-2:] == (16, 16)  # a retry works


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_whole_pipeline_on_cuda_matches_the_cpu(demo_models):
    """Text encoder, DiT in every memory mode and VAE on the GPU in float32: the CPU's results up to float rounding
    (cuDNN may run the VAE's convolutions in TF32), and the memory modes bit-identical to each other."""
    prompt = "a red cube on a blue table"
    on = {device: pipeline.encode_prompt(demo_models.text_encoder, prompt, compute_dtype="fp32", device=device)
          for device in ("cpu", "cuda")}
    cpu_taps, gpu_taps = on["cpu"].text_taps.float(), on["cuda"].text_taps.float().cpu()
    assert float((gpu_taps - cpu_taps).norm() / cpu_taps.norm()) < 1e-4
    latents = {}
    for device, modes in (("cpu", ["gpu"]), ("cuda", ["gpu", "stream_uncond", "cpu_offload"])):
        for mode in modes:
            model = pipeline.load_model(demo_models.dit, device=device, memory_mode=mode, compute_dtype="fp32")
            latents[device, mode] = pipeline.sample_latents(model, on["cpu"], width=256, height=256, seed=5,
                                                            preset="turbo", steps=2)
            model.offload()
    reference = latents["cpu", "gpu"]["samples"]
    first = latents["cuda", "gpu"]["samples"]
    assert float((first - reference).norm() / reference.norm()) < 1e-4
    for mode in ("stream_uncond", "cpu_offload"):
        assert torch.equal(latents["cuda", mode]["samples"], first), mode
    images = {device: pipeline.decode(pipeline.load_vae(demo_models.vae, dtype="fp32", device=device),
                                      latents["cpu", "gpu"]).float().cpu() for device in ("cpu", "cuda")}
    assert float((images["cuda"] - images["cpu"]).abs().max()) < 1e-2
