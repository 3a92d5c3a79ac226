"""Qwen3-VL Encode's core CONDITIONING against core's own CLIPLoader(type=ideogram4) + CLIPTextEncode, in a real
ComfyUI, on the same tiny text-encoder weights.

Core sizes its Ideogram 4 text encoder for Qwen3-VL-8B only; the probe pack (probe_pack/) lets core's detection
take this test's tiny Qwen3 (hidden 64, all 36 layers, the real 151,936-row vocabulary) and gives core's config
those sizes, so core's own code runs on the tiny weights. Core taps the *inputs* of layers 1, 4, ..., 34, 36 with
the final norm off; we tap the outputs of layers 0, 3, ..., 33, 35: the same values (docs/spec.md §4.3).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from .harness import run_ok

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 36, 2, 1, 32, 128, 151936
NAME = "qwen3-tiny-ideogram4-te.safetensors"
PROMPTS = ["a red fox reading a newspaper on a park bench",
           '{"high_level_description":"A poster","compositional_deconstruction":{"background":"white","elements":[]}}']


def tiny_qwen3(seed=7) -> dict[str, torch.Tensor]:
    """A Qwen3 text model in the `model.*` layout core's Qwen3_8B and our loader both read (float32)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    tensors = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN, scale=0.5),
               "model.norm.weight": 1 + normal(HIDDEN, scale=0.1)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": normal(HEADS * HEAD_DIM, HIDDEN, scale=HIDDEN ** -0.5),
            p + "self_attn.k_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN, scale=HIDDEN ** -0.5),
            p + "self_attn.v_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN, scale=HIDDEN ** -0.5),
            p + "self_attn.o_proj.weight": normal(HIDDEN, HEADS * HEAD_DIM, scale=HIDDEN ** -0.5),
            p + "self_attn.q_norm.weight": 1 + normal(HEAD_DIM, scale=0.1),
            p + "self_attn.k_norm.weight": 1 + normal(HEAD_DIM, scale=0.1),
            p + "mlp.gate_proj.weight": normal(MLP, HIDDEN, scale=HIDDEN ** -0.5),
            p + "mlp.up_proj.weight": normal(MLP, HIDDEN, scale=HIDDEN ** -0.5),
            p + "mlp.down_proj.weight": normal(HIDDEN, MLP, scale=MLP ** -0.5),
            p + "input_layernorm.weight": 1 + normal(HIDDEN, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + normal(HIDDEN, scale=0.1),
        })
    return tensors


@pytest.fixture(scope="module")
def tiny_text_encoder(comfy, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_te") / NAME
    save_file(tiny_qwen3(), str(path))
    link = comfy.base_dir / "models" / "text_encoders" / NAME
    link.symlink_to(path)
    yield NAME
    link.unlink()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["plain", "json"])
def test_core_conditioning_equals_core_cliptextencode(comfy, tiny_text_encoder, prompt):
    graph = {
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_text_encoder, "type": "ideogram4",
                                                       "device": "default"}},
        "core_encode": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": prompt}},
        "ours_encode": {"class_type": "IG4TextEncode", "inputs": {
            "text_encoder": tiny_text_encoder, "prompt": prompt, "tokenizer": "auto", "compute_dtype": "fp32",
            "keep_loaded": False, "strict_json": False, "truncate": False}},
        "save_core": {"class_type": "IG4TestSaveConditioning", "inputs": {"conditioning": ["core_encode", 0],
                                                                          "label": "te_core"}},
        "save_ours": {"class_type": "IG4TestSaveConditioning", "inputs": {"conditioning": ["ours_encode", 1],
                                                                          "label": "te_ours"}},
    }
    history = run_ok(comfy, graph)
    core = load_file(comfy.base_dir / "output" / "te_core.safetensors")["tensor"]
    ours = load_file(comfy.base_dir / "output" / "te_ours.safetensors")["tensor"]
    assert ours.shape == core.shape and ours.shape[-1] == 13 * HIDDEN and ours.shape[0] == 1
    error = ((ours - core).abs().max() / core.abs().max()).item()
    print(f"Qwen3-VL Encode vs core CLIPTextEncode ({ours.shape[1]} tokens): max abs difference / max {error:.2e}")
    assert error < 1e-5
    # our conditioning carries no attention mask (nothing is padded); core's mask, if any, is all ones
    assert json.loads(history["outputs"]["save_ours"]["text"][1]) == []
