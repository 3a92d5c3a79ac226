"""Our core MODEL against core's own loaders on the same weights, in a real ComfyUI.

Reference: core's `UNETLoader` on a dense float32 safetensors of gguf-py's dequantization of our Q4_K file
(`gguf.quants.dequantize`), and core's `LoraLoaderModelOnly` on both. Core fixes every size of its Ideogram 4
model except the input channels and the layer count, so the model here has the published width with one layer
(about 560 M parameters per branch): big enough to be the real architecture, small enough for CI. The Q4_K file
is written with llama.cpp's reference quantizer (ggml-python), as the published file was. To keep CI fast, the
text projection (245 M weights) stays F16, which also puts a dense Linear beside the packed ones, and the two
branches share their block weights (the rest, t embedding, AdaLN projection, final layer and norms, differ).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf_files import ggml_quantize, write_gguf
from safetensors.numpy import save_file
from safetensors.torch import load_file

from .harness import run_ok

HIDDEN, HEADS, HEAD_DIM, MLP, ADALN, TEXT, CHANNELS = 4608, 18, 256, 12288, 512, 53248, 128
RANK, ALPHA, STRENGTH = 8, 4.0, 0.8
TOLERANCE = 1e-5


def random(shape, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Normal values (torch's generator: several times faster than numpy's for 10^8 values), seeded from rng."""
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return torch.randn(shape, generator=generator).mul_(scale).numpy()


def real_width_tensors(rng: np.random.Generator, with_text: bool, skip_blocks=False) -> dict[str, np.ndarray]:
    """One layer of the published Ideogram 4 shape (docs/spec.md §2.2), random values of the real scale;
    skip_blocks: placeholders (no random draw) for the attention and MLP weights, which the caller shares."""
    linear = {"input_proj": (HIDDEN, CHANNELS), "t_embedding.mlp_in": (HIDDEN, HIDDEN),
              "t_embedding.mlp_out": (HIDDEN, HIDDEN), "adaln_proj": (ADALN, HIDDEN),
              "layers.0.attention.qkv": (3 * HIDDEN, HIDDEN), "layers.0.attention.o": (HIDDEN, HIDDEN),
              "layers.0.feed_forward.w1": (MLP, HIDDEN), "layers.0.feed_forward.w3": (MLP, HIDDEN),
              "layers.0.feed_forward.w2": (HIDDEN, MLP), "layers.0.adaln_modulation": (4 * HIDDEN, ADALN),
              "final_layer.linear": (CHANNELS, HIDDEN), "final_layer.adaln_modulation": (HIDDEN, ADALN)}
    biased = {"input_proj", "t_embedding.mlp_in", "t_embedding.mlp_out", "adaln_proj", "layers.0.adaln_modulation",
              "final_layer.linear", "final_layer.adaln_modulation"}
    if with_text:
        linear["llm_cond_proj"] = (HIDDEN, TEXT)
        biased.add("llm_cond_proj")
    tensors = {}
    for name, (rows, cols) in linear.items():
        if skip_blocks and (".attention." in name or ".feed_forward." in name):
            tensors[f"{name}.weight"] = None
        else:
            tensors[f"{name}.weight"] = random((rows, cols), rng, 1 / np.sqrt(cols))
        if name in biased:
            tensors[f"{name}.bias"] = random((rows,), rng, 0.02)
    norms = {"layers.0.attention_norm1": HIDDEN, "layers.0.attention_norm2": HIDDEN, "layers.0.ffn_norm1": HIDDEN,
             "layers.0.ffn_norm2": HIDDEN, "layers.0.attention.norm_q": HEAD_DIM, "layers.0.attention.norm_k": HEAD_DIM}
    if with_text:
        norms["llm_cond_norm"] = TEXT
    for name, size in norms.items():
        tensors[f"{name}.weight"] = 1.0 + random((size,), rng, 0.1)
    tensors["embed_image_indicator.weight"] = random((2, HIDDEN), rng, 0.5)
    return tensors


def q4_k_recipe(tensors: dict, done: dict) -> dict:
    """The published recipe, except the F16 text projection: Linear weights whose rows hold whole 256-weight blocks
    in Q4_K, the rest F16. `done` memoises by array identity (tensors shared between the branches)."""
    out = {}
    for name, value in tensors.items():
        if id(value) not in done:
            quantize = (value.ndim == 2 and value.shape[1] % 256 == 0
                        and name not in ("embed_image_indicator.weight", "llm_cond_proj.weight"))
            done[id(value)] = (Q.Q4_K, quantize_rows(value)) if quantize else value.astype(np.float16)
        out[name] = done[id(value)]
    return out


def quantize_rows(weights: np.ndarray) -> np.ndarray:
    """ggml's Q4_K quantizer over row halves in two threads (rows are independent; ctypes releases the GIL)."""
    halves = np.array_split(weights, 2)
    with ThreadPoolExecutor(2) as pool:
        return np.concatenate(list(pool.map(lambda rows: ggml_quantize(rows, Q.Q4_K), halves)))


def dense_of(stored) -> np.ndarray:
    """gguf-py's decoding of what the GGUF stores, in float32 (the reference weights)."""
    if isinstance(stored, tuple):
        qtype, packed = stored
        return gguf_dequantize(packed, qtype).astype(np.float32)
    return stored.astype(np.float32)


def lora_for(tensors: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A core-format LoRA (`diffusion_model.<layer>.lora_up/lora_down/alpha`) on five Linears of the branch."""
    lora = {}
    for layer in ("layers.0.attention.qkv", "layers.0.attention.o", "layers.0.feed_forward.w2",
                  "layers.0.adaln_modulation", "t_embedding.mlp_in"):
        rows, cols = tensors[f"{layer}.weight"].shape
        lora[f"diffusion_model.{layer}.lora_down.weight"] = rng.standard_normal((RANK, cols), dtype=np.float32) / np.sqrt(cols)
        lora[f"diffusion_model.{layer}.lora_up.weight"] = 0.05 * rng.standard_normal((rows, RANK), dtype=np.float32)
        lora[f"diffusion_model.{layer}.alpha"] = np.array(ALPHA, dtype=np.float32)
    return lora


@pytest.fixture(scope="module")
def real_width_files(comfy, tmp_path_factory):
    """The two-branch Q4_K GGUF, the dense reference files and a LoRA, linked into the server's model folders."""
    rng = np.random.default_rng(20261203)
    work = tmp_path_factory.mktemp("real_width")
    cond = real_width_tensors(rng, True)
    uncond = {name: cond[name] if ".feed_forward." in name or ".attention." in name else value
              for name, value in real_width_tensors(rng, False, skip_blocks=True).items()}
    done = {}
    stored = {"cond": q4_k_recipe(cond, done), "uncond": q4_k_recipe(uncond, done)}
    del uncond, done
    gguf = {f"conditional_transformer.{k}": v for k, v in stored["cond"].items()}
    gguf.update({f"unconditional_transformer.{k}": v for k, v in stored["uncond"].items()})
    write_gguf(work / "ideogram4-real-width-q4_k.gguf", gguf)
    decoded = {}
    for branch in ("cond", "uncond"):
        for value in stored[branch].values():
            if id(value) not in decoded:
                decoded[id(value)] = dense_of(value)
        save_file({k: decoded[id(v)] for k, v in stored[branch].items()},
                  str(work / f"ideogram4-real-width-{branch}.safetensors"))
    del decoded
    save_file(lora_for(cond, rng), str(work / "ideogram4-test-lora.safetensors"))
    links = {"diffusion_models": ["ideogram4-real-width-q4_k.gguf", "ideogram4-real-width-cond.safetensors",
                                  "ideogram4-real-width-uncond.safetensors"], "loras": ["ideogram4-test-lora.safetensors"]}
    for folder, names in links.items():
        (comfy.base_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (comfy.base_dir / "models" / folder / name).symlink_to(work / name)
    yield
    for folder, names in links.items():
        for name in names:
            (comfy.base_dir / "models" / folder / name).unlink()


def forward(label, model, text_tokens, seed=11):
    return {"class_type": "IG4TestModelForward",
            "inputs": {"model": model, "label": label, "seed": seed, "text_tokens": text_tokens, "grid": 2}}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_core_model_equals_core_unetloader_on_the_dequantized_weights(comfy, real_width_files):
    graph = {
        "ours": {"class_type": "IG4CoreModelLoader", "inputs": {"dit_name": "ideogram4-real-width-q4_k.gguf",
                                                                "uncond_name": "(none)", "compute_dtype": "auto"}},
        "dense_cond": {"class_type": "UNETLoader", "inputs": {"unet_name": "ideogram4-real-width-cond.safetensors",
                                                             "weight_dtype": "default"}},
        "dense_uncond": {"class_type": "UNETLoader", "inputs": {
            "unet_name": "ideogram4-real-width-uncond.safetensors", "weight_dtype": "default"}},
        "ours_lora": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["ours", 0], "lora_name": "ideogram4-test-lora.safetensors", "strength_model": STRENGTH}},
        "dense_lora": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["dense_cond", 0], "lora_name": "ideogram4-test-lora.safetensors", "strength_model": STRENGTH}},
        "f1": forward("ours_cond", ["ours", 0], 3), "f2": forward("dense_cond", ["dense_cond", 0], 3),
        "f3": forward("ours_uncond", ["ours", 1], 0), "f4": forward("dense_uncond", ["dense_uncond", 0], 0),
        "f5": forward("ours_lora", ["ours_lora", 0], 3), "f6": forward("dense_lora", ["dense_lora", 0], 3),
    }
    # after the LoRA clone ran on the same model object, its patches must be gone again
    graph["f7"] = forward("ours_cond_again", ["ours", 0], 3)
    graph["f7"]["inputs"]["after"] = ["f5", 0]
    run_ok(comfy, graph)
    out = {label: load_file(comfy.base_dir / "output" / f"{label}.safetensors")["tensor"] for label in
           ("ours_cond", "dense_cond", "ours_uncond", "dense_uncond", "ours_lora", "dense_lora", "ours_cond_again")}
    errors = {"cond": relative(out["ours_cond"], out["dense_cond"]),
              "uncond": relative(out["ours_uncond"], out["dense_uncond"]),
              "lora": relative(out["ours_lora"], out["dense_lora"])}
    print("relative differences, our core MODEL vs core UNETLoader on dequantized weights:", errors)
    assert all(e < TOLERANCE for e in errors.values()), errors
    assert relative(out["ours_lora"], out["ours_cond"]) > 1e-3  # the LoRA does change the output
    assert relative(out["ours_cond"], out["ours_uncond"]) > 1e-2
    assert torch.equal(out["ours_cond_again"], out["ours_cond"])  # bypassing the LoRA restores it exactly
