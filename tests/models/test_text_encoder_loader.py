"""Every text-encoder file layout gives the features of the same tiny weights.

References: the tiny transformers `Qwen3VLModel` (re-randomised, 36 layers) for the weights; our decoder on a
plain state dict (checked against transformers in test_text_encoder.py) for the features; gguf-py 0.19
`quants.quantize`/`dequantize` and ggml-python 0.0.45 `ggml_quantize_chunk` (llama.cpp's reference
quantizers) for GGUF blocks; the official fp8 recipe (per-row amax/448, e4m3) and ComfyUI's per-tensor one.
Lossless layouts must match exactly; quantized ones exactly against their own dequantized weights.
"""

import json

import pytest
import gguf_files
import torch
from gguf_files import ggml_quantize
from gguf import GGMLQuantizationType as Q
from ideogram4_gguf.errors import ModelFileError
from ideogram4_gguf.models.text_encoder import Qwen3TextConfig, Qwen3TextEncoder, unload_text_encoder
from ideogram4_gguf.models.text_encoder_loader import (
    llama_cpp_name,
    QuantizedEmbedding,
    load_lm_head,
    load_text_encoder,
    source_stored_bytes,
    text_model_view,
)
from ideogram4_gguf.models.tokenizer import tokenizer_from_gguf_metadata
from safetensors.torch import save_file

from .te_reference import (  # noqa: F401
    TINY_VOCAB,
    one_cpu_thread,
    text_state_dict,
    tiny_qwen3vl_model,
)

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")
IDS = [3, 17, 250, 9, 77, 501, 128, 0, 42]


def _is_linear(name):
    return name.endswith(LINEAR_SUFFIXES)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    model = tiny_qwen3vl_model(seed=7)
    visual = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("visual.")}
    return text_state_dict(model), visual


def features(state, dtype=torch.float32, ids=IDS):
    """Our decoder on a plain state dict (canonical names): the reference every layout must reproduce."""
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = state["layers.0.self_attn.q_norm.weight"].shape[0]
    config = Qwen3TextConfig(vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=state["layers.0.mlp.gate_proj.weight"].shape[0],
                             num_layers=36, num_heads=state["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
                             num_kv_heads=state["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
                             head_dim=head_dim)
    encoder = Qwen3TextEncoder(config, dtype=dtype)
    encoder.load_state_dict({k: v.to(dtype) for k, v in state.items() if k != "norm.weight" and k != "lm_head.weight"})
    return encoder(ids)


# --- stored forms -------------------------------------------------------------------------------------------

def fp8_per_row(w):
    """Official Ideogram fp8: scale_r = max|W_r| / 448, W ~ e4m3(W / scale) * scale."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 448.0
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale.float()


def fp8_per_tensor(w):
    """ComfyUI fp8_scaled: one float32 scale per tensor."""
    scale = w.abs().max().clamp(min=1e-12) / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale.float().reshape(())


to_llama_cpp = llama_cpp_name


def write_gguf(path, tensors, arch="qwen3vl", theta=5e6, tokens=None):
    """tensors: llama.cpp name -> float32 array or (qtype, packed uint8); tokens: (list, types) or None."""
    metadata = {f"{arch}.rope.freq_base": float(theta), f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    if tokens is not None:
        metadata.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                         "tokenizer.ggml.tokens": tokens[0], "tokenizer.ggml.token_type": tokens[1],
                         "tokenizer.ggml.merges": ["a b"]})
    return gguf_files.write_gguf(path, tensors, metadata, arch)


# --- lossless layouts ---------------------------------------------------------------------------------------

def test_official_layout_single_file_in_base_repo_folder(tiny, tmp_path):
    state, visual = tiny
    folder = tmp_path / "ideogram-4" / "text_encoder"
    folder.mkdir(parents=True)
    save_file({**{f"language_model.{k}": v for k, v in state.items()}, **visual}, folder / "model.safetensors")
    encoder = load_text_encoder(tmp_path / "ideogram-4", compute_dtype=torch.float32)
    assert encoder.layout.startswith("official") and len(encoder.layers) == 36 and encoder.norm is None
    assert torch.equal(encoder(IDS), features(state))


def test_transformers_bf16_shards_with_index(tiny, tmp_path):
    state, visual = tiny
    full = {f"model.language_model.{k}": v.to(torch.bfloat16) for k, v in state.items()}
    full.update({f"model.{k}": v.to(torch.bfloat16) for k, v in visual.items()})
    full["lm_head.weight"] = torch.randn(TINY_VOCAB, 32).to(torch.bfloat16)
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: full[k] for k in keys}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {**tiny_config_dict(), "rope_parameters": {"rope_theta": 5e6}}}))
    bf16_state = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    encoder = load_text_encoder(tmp_path / "model.safetensors.index.json", compute_dtype=torch.float32)
    assert encoder.layout == "transformers Qwen3-VL"
    assert torch.equal(encoder(IDS), features(bf16_state))
    # bf16 compute: same as our decoder run in bf16 on the same weights
    encoder16 = load_text_encoder(tmp_path, compute_dtype=torch.bfloat16)
    assert torch.equal(encoder16(IDS), features(bf16_state, torch.bfloat16))


def tiny_config_dict():
    return dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=36,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_llama_cpp_gguf_float_is_exact(tiny, tmp_path):
    state, _ = tiny
    tensors = {to_llama_cpp(k): v.numpy() for k, v in state.items()}
    tensors["token_embd.weight"] = (Q.F16, state["embed_tokens.weight"].half().numpy())
    path = write_gguf(tmp_path / "qwen3vl-f32.gguf", tensors)
    encoder = load_text_encoder(path, compute_dtype=torch.float32)
    assert encoder.layout == "llama.cpp GGUF"
    expected = dict(state, **{"embed_tokens.weight": state["embed_tokens.weight"].half().float()})
    assert torch.equal(encoder(IDS), features(expected))


def test_gguf_tokenizer_travels_with_the_encoder(tiny, tmp_path):
    state, _ = tiny
    tensors = {to_llama_cpp(k): v.numpy() for k, v in state.items()}
    tokens = (["a", "b", "ab", "<|im_start|>", "<|im_end|>"], [1, 1, 1, 3, 3])
    path = write_gguf(tmp_path / "qwen3vl-with-vocab.gguf", tensors, tokens=tokens)
    encoder = load_text_encoder(path, compute_dtype=torch.float32)
    # the GGUF's tokenizer comes with the encoder, no second metadata parse
    tokenizer = tokenizer_from_gguf_metadata(encoder.tokenizer_metadata, path)
    assert tokenizer.encode("<|im_start|>abab<|im_end|>", add_special_tokens=False).ids == [3, 2, 2, 4]


# --- fp8 layouts ----------------------------------------------------------------------------------------------

def _fp8_files(state, quantize, prefix, embedding=False):
    stored, dequantized = {}, {}
    for k, v in state.items():
        if _is_linear(k) or (embedding and k == "embed_tokens.weight"):
            q, scale = quantize(v)
            stored[f"{prefix}{k}"], stored[f"{prefix}{k}_scale"] = q, scale
            dequantized[k] = q.float() * (scale[:, None] if scale.ndim else scale)
        else:
            stored[f"{prefix}{k}"] = v.to(torch.bfloat16)
            dequantized[k] = v.to(torch.bfloat16).float()
    return stored, dequantized


def test_official_fp8_sharded(tiny, tmp_path):
    state, visual = tiny
    stored, dequantized = _fp8_files(state, fp8_per_row, "language_model.", embedding=True)
    stored.update({k: v.to(torch.bfloat16) for k, v in visual.items()})
    names = sorted(stored)
    half = len(names) // 2
    save_file({k: stored[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: stored[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
        for i, k in enumerate(names)}}))
    encoder = load_text_encoder(tmp_path, compute_dtype=torch.float32)
    assert type(encoder.layers[0].self_attn.q_proj).__name__ == "Fp8Linear"
    assert torch.equal(encoder(IDS), features(dequantized))


def test_comfyui_fp8_scaled_single_file(tiny, tmp_path):
    state, visual = tiny
    stored, dequantized = _fp8_files(state, fp8_per_tensor, "model.language_model.")
    for k in list(stored):
        if k.endswith("_scale"):
            layer = k[: -len(".weight_scale")]
            stored[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            stored[f"{layer}.input_scale"] = torch.tensor(1.0)
    stored.update({f"model.{k}": v for k, v in visual.items()})
    assert "model.visual.deepstack_merger_list.0.norm.weight" in stored  # what ComfyUI detects Qwen3-VL by
    save_file(stored, tmp_path / "qwen3vl_8b_fp8_scaled.safetensors")
    encoder = load_text_encoder(tmp_path / "qwen3vl_8b_fp8_scaled.safetensors", compute_dtype=torch.float32)
    assert torch.equal(encoder(IDS), features(dequantized))


def test_comfyui_old_scaled_fp8_in_qwen3_layout(tiny, tmp_path):
    state, _ = tiny
    stored, dequantized = _fp8_files(state, fp8_per_tensor, "model.")
    stored = {k.replace(".weight_scale", ".scale_weight"): v for k, v in stored.items()}
    stored["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(stored, tmp_path / "qwen3_8b_scaled.safetensors")
    encoder = load_text_encoder(tmp_path / "qwen3_8b_scaled.safetensors", compute_dtype=torch.float32)
    assert torch.equal(encoder(IDS), features(dequantized))


# --- GGUF quantized -----------------------------------------------------------------------------------------

def _llama_cpp_q8_0(state):
    """llama.cpp GGUF tensors of a state dict (Linears and the embedding in Q8_0 by gguf-py, the rest as they are),
    and the weights they decode to."""
    from gguf import quants

    tensors, dequantized = {}, {}
    for k, v in state.items():
        if _is_linear(k) or k == "embed_tokens.weight":
            packed = quants.quantize(v.numpy(), Q.Q8_0)
            tensors[to_llama_cpp(k)] = (Q.Q8_0, packed)
            dequantized[k] = torch.from_numpy(quants.dequantize(packed, Q.Q8_0))
        else:
            tensors[to_llama_cpp(k)], dequantized[k] = v.numpy(), v
    return tensors, dequantized


def test_llama_cpp_gguf_q8_0(tiny, tmp_path):
    state, _ = tiny
    tensors, dequantized = _llama_cpp_q8_0(state)
    path = write_gguf(tmp_path / "qwen3vl-q8_0.gguf", tensors)
    encoder = load_text_encoder(path, compute_dtype=torch.float32, embed_device="cpu")
    assert isinstance(encoder.embed_tokens, QuantizedEmbedding)
    assert torch.equal(encoder(IDS), features(dequantized))
    unload_text_encoder(encoder)  # packed blocks included: nothing keeps memory
    assert all(t.device.type == "meta" for t in [*encoder.parameters(), *encoder.buffers()])


@pytest.fixture(scope="module")
def wide_state():
    """Random weights of a decoder wide enough for K-quants (in_features % 256 == 0), 36 layers."""
    config = Qwen3TextConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_layers=36, num_heads=2,
                             num_kv_heads=1, head_dim=128)
    generator = torch.Generator().manual_seed(8)
    state = {}
    for k, v in Qwen3TextEncoder(config, final_norm=True, dtype=torch.float32, device="meta").state_dict().items():
        noise = torch.randn(v.shape, generator=generator)
        state[k] = 1.0 + 0.1 * noise if v.ndim == 1 else noise * (1.0 / v.shape[1] ** 0.5)
    return state


def test_llama_cpp_gguf_k_quants_mixed(wide_state, tmp_path):
    from gguf import quants

    # A Q4_K_M-like mix: most linears Q4_K, ffn_down and attn_v Q6_K, the embedding Q6_K, norms F32.
    types = {"down_proj.weight": Q.Q6_K, "v_proj.weight": Q.Q6_K}
    tensors, dequantized = {}, {}
    for k, v in wide_state.items():
        if _is_linear(k) or k == "embed_tokens.weight":
            qtype = Q.Q6_K if k == "embed_tokens.weight" else types.get(k.split(".", 3)[-1], Q.Q4_K)
            packed = ggml_quantize(v.numpy(), qtype)
            tensors[to_llama_cpp(k)] = (qtype, packed)
            dequantized[k] = torch.from_numpy(quants.dequantize(packed, qtype))
        else:
            tensors[to_llama_cpp(k)] = v.numpy()
            dequantized[k] = v
    path = write_gguf(tmp_path / "qwen3vl-q4_k_m.gguf", tensors)
    ids = [5, 300, 12, 511, 64]
    encoder = load_text_encoder(path, compute_dtype=torch.float32)
    out = encoder(ids)
    assert encoder.layers[0].self_attn.q_proj.storage == "Q4_K"
    assert encoder.layers[0].mlp.down_proj.storage == "Q6_K"
    assert torch.equal(out, features(dequantized, ids=ids))
    first, last = tap_errors(out, features(wide_state, ids=ids))
    assert first < 0.30 and last < 0.60  # measured 0.21 / 0.41 (Q4_K everywhere); see docs/text_encoder.md

    # stored sizes (what the memory table in docs/text_encoder.md computes) = the GGUF's packed bytes
    from ideogram4_gguf.ops import open_gguf, open_weights

    gguf_file = open_gguf(path)
    view, _ = text_model_view(open_weights(path))
    assert source_stored_bytes(view, view.keys()) == sum(t.nbytes for t in gguf_file.tensors.values())

    # generation path: every layer, the final norm, and the GGUF's own `output` head
    generator = load_text_encoder(path, compute_dtype=torch.float32, for_generation=True)
    assert generator.norm is not None
    with pytest.raises(ModelFileError, match="no lm_head"):
        load_lm_head(tmp_path / "qwen3vl-q4_k_m.gguf", generator)


def tap_errors(out, reference):
    """Relative error of the first tap (layer 0) and the last tap (layer 35) vs float weights. Random
    36-layer stacks amplify weight rounding layer after layer, so these are loose sanity bounds, not a
    quality estimate for the real model."""
    return [((out[:, t::13] - reference[:, t::13]).norm() / reference[:, t::13].norm()).item() for t in (0, 12)]


@pytest.mark.parametrize("layout, bounds", [("official fp8", (0.08, 0.16)), ("GGUF Q8_0", (0.025, 0.05))])
def test_quantized_layouts_stay_close_to_float_weights(layout, bounds, wide_state, tmp_path):
    ids = [5, 300, 12, 511, 64]
    if layout == "official fp8":
        stored, dequantized = _fp8_files(wide_state, fp8_per_row, "language_model.")
        dequantized = dict(dequantized, **{k: v for k, v in wide_state.items() if not _is_linear(k)})
        stored.update({f"language_model.{k}": v for k, v in wide_state.items() if not _is_linear(k)})
        save_file(stored, tmp_path / "model.safetensors")
        path = tmp_path / "model.safetensors"
    else:
        tensors, dequantized = _llama_cpp_q8_0(wide_state)
        path = write_gguf(tmp_path / "q8_0.gguf", tensors)
    out = load_text_encoder(path, compute_dtype=torch.float32)(ids)
    assert torch.equal(out, features(dequantized, ids=ids))
    first, last = tap_errors(out, features(wide_state, ids=ids))
    assert first < bounds[0] and last < bounds[1]  # measured fp8 0.056 / 0.115, Q8_0 0.016 / 0.029


def test_quantized_embedding_decodes_only_rows(wide_state):
    from gguf import quants

    table = wide_state["embed_tokens.weight"].numpy()
    packed = ggml_quantize(table, Q.Q4_K)
    embedding = QuantizedEmbedding(torch.from_numpy(packed), Q.Q4_K, 512, 256)
    ids = torch.tensor([7, 0, 511, 7])
    full = torch.from_numpy(quants.dequantize(packed, Q.Q4_K))
    assert torch.equal(embedding(ids), full[ids])


def test_lm_head_from_gguf_output_and_from_safetensors(tiny, tmp_path):
    state, _ = tiny
    head = torch.randn(TINY_VOCAB, 32)
    tensors = {to_llama_cpp(k): v.numpy() for k, v in state.items()}
    tensors["output.weight"] = head.numpy()
    path = write_gguf(tmp_path / "with-head.gguf", tensors)
    encoder = load_text_encoder(path, compute_dtype=torch.float32, for_generation=True)
    x = torch.randn(3, 32)
    assert torch.equal(load_lm_head(path, encoder)(x), x @ head.T)
    save_file({"lm_head.weight": head.to(torch.bfloat16)}, tmp_path / "diffusion_pytorch_model.safetensors")
    assert torch.equal(load_lm_head(tmp_path, encoder)(x), x @ head.to(torch.bfloat16).float().T)
    save_file({"lm_head.weight": torch.randn(100, 32)}, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="must come from Qwen3-VL-8B"):
        load_lm_head(tmp_path / "bad.safetensors", encoder)


# --- wrong files ----------------------------------------------------------------------------------------------

def test_wrong_files_get_clear_errors(tiny, tmp_path):
    state, _ = tiny
    cases = {
        "dit.safetensors": ({"embed_image_indicator.weight": torch.zeros(2, 8),
                             "layers.0.attention.qkv.weight": torch.zeros(24, 8)}, "DiT"),
        "vae.safetensors": ({"decoder.conv_in.weight": torch.zeros(4, 2, 3, 3)}, "VAE"),
        "random.safetensors": ({"foo.weight": torch.zeros(2)}, "foo.weight"),
    }
    for name, (tensors, words) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(ModelFileError, match=words) as err:
            load_text_encoder(tmp_path / name)
        assert name in str(err.value)

    qwen25 = {f"model.{k}": v for k, v in state.items() if "q_norm" not in k and "k_norm" not in k}
    qwen25["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(16)
    save_file(qwen25, tmp_path / "qwen25.safetensors")
    with pytest.raises(ModelFileError, match="Qwen2"):
        load_text_encoder(tmp_path / "qwen25.safetensors")

    shallow = {f"model.{k}": v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < 28}
    save_file(shallow, tmp_path / "qwen3vl_2b.safetensors")
    with pytest.raises(ModelFileError, match="28 layers"):
        load_text_encoder(tmp_path / "qwen3vl_2b.safetensors")

    nvfp4 = {f"model.language_model.{k}": (torch.zeros(v.shape[0], v.shape[1] // 2, dtype=torch.uint8)
                                           if _is_linear(k) else v) for k, v in state.items()}
    nvfp4.update({f"model.language_model.{k}_scale_2": torch.tensor(1.0) for k in state if _is_linear(k)})
    save_file(nvfp4, tmp_path / "qwen3vl_8b_nvfp4.safetensors")
    with pytest.raises(ModelFileError, match="NVFP4"):
        load_text_encoder(tmp_path / "qwen3vl_8b_nvfp4.safetensors")

    save_file({f"model.{k}": v for k, v in state.items()}, tmp_path / "narrow.safetensors")
    with pytest.raises(ModelFileError, match="53248"):
        load_text_encoder(tmp_path / "narrow.safetensors", expected_feature_dim=53248)
    assert load_text_encoder(tmp_path / "narrow.safetensors", expected_feature_dim=32 * 13) is not None
