"""The embedded default: a tiny random-weight Ideogram 4 model set, built once, and the whole pipeline on it.

The set has the real architecture at toy width, in the file formats the pack reads: the two-branch Q4_K
GGUF written by quant_tools (the published build's layout), a llama.cpp-style Qwen3-VL GGUF text encoder
that carries its own (toy, byte-level BPE) tokenizer, and a FLUX.2 VAE decoder safetensors file. It is
deterministic (fixed seeds, fixed training text), a few MB, cached on disk, and runs text -> image on the
CPU in seconds. The weights are random, so the picture is noise; the point is that every stage runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_VERSION = 3  # bump when the set's content changes, so old caches are rebuilt
SEED = 20260604

# DiT: the real layout at width 256 (K % 256 == 0, so every linear but input_proj can be Q4_K like the published
# file), head_dim 128 so the published MRoPE sections (24, 20, 20) apply unchanged.
DIT_CONFIG = dict(hidden_size=256, num_layers=2, num_heads=2, head_dim=128, intermediate_size=512, adaln_dim=256,
                  in_channels=128, llm_features_dim=13 * 64, rope_theta=5e6, mrope_section=(24, 20, 20))
# Text encoder: all 36 layers (the taps reach layer 35) at width 64.
TE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_layers=36, num_heads=2, num_kv_heads=1, head_dim=32,
                 rope_theta=5e6)
# VAE: four levels (x8 like FLUX.2) of 32 channels, 32 latent channels.
VAE_CONFIG = dict(latent_channels=32, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)
TOKENIZER_VOCAB = 384
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# File names in ComfyUI's models/ layout.
DIT_FILE = "diffusion_models/ideogram4-tiny-demo-q4_k.gguf"
TE_FILE = "text_encoders/qwen3vl-tiny-demo-q8_0.gguf"
VAE_FILE = "vae/flux2-vae-tiny-demo.safetensors"
TOKENIZER_FILE = "text_encoders/qwen3vl-tiny-demo-tokenizer.json"

DEMO_PROMPT = {
    "high_level_description": "A tiny demo poster with the word HELLO on a plain background.",
    "compositional_deconstruction": {
        "background": "a plain warm beige background",
        "elements": [{"type": "text", "bbox": [380, 200, 620, 800], "text": "HELLO", "desc": "bold black letters"}],
    },
}
DEMO_WIDTH = DEMO_HEIGHT = 256

_TRAINING_TEXT = [
    "a poster that says HELLO", "a photo of a red cube on a wooden table", "minimal logo, flat colours",
    '{"high_level_description":"","compositional_deconstruction":{"background":"","elements":[]}}',
    "type obj text desc bbox color_palette #FFFFFF #000000", "the quick brown fox jumps over the lazy dog",
    "ideogram four tiny demo model, random weights, every stage runs", "0123456789 .,:;!?'\"()[]{}-_/",
]


@dataclass(frozen=True)
class DemoModels:
    root: Path
    dit: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path


def default_cache_dir() -> Path:
    base = os.environ.get("IDEOGRAM4_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ideogram4_gguf")
    return Path(base) / f"demo-v{DEMO_VERSION}"


def build_demo_models(models_dir=None, log=print) -> DemoModels:
    """Write the tiny model set under `models_dir` (ComfyUI's models/ layout); reuse it when already there."""
    root = Path(models_dir) if models_dir is not None else default_cache_dir()
    models = DemoModels(root, root / DIT_FILE, root / TE_FILE, root / VAE_FILE, root / TOKENIZER_FILE)
    stamp = root / ".ideogram4-demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == DEMO_VERSION and all(
            p.is_file() for p in (models.dit, models.text_encoder, models.vae, models.tokenizer)):
        return models
    log(f"building the tiny demo model set in {root} (once)")
    for path in (models.dit, models.text_encoder, models.vae, models.tokenizer):
        path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(models.tokenizer))
    _write_dit(models.dit, generator, log)
    _write_text_encoder(models.text_encoder, tokenizer, generator)
    _write_vae(models.vae, generator)
    stamp.write_text(json.dumps({"version": DEMO_VERSION}))
    return models


# ---------------------------------------------------------------------------------------------------------------
# The files


def _random(shape, generator, std):
    return torch.randn(shape, generator=generator) * std


def _dit_branch(generator, with_text=True) -> dict[str, torch.Tensor]:
    from .models.dit import Ideogram4Config, Ideogram4DiT

    config = Ideogram4Config(**DIT_CONFIG)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Ideogram4DiT(config, with_text=True).named_parameters()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            tensors[name] = _random(shape, generator, 0.02)
        elif len(shape) == 1:  # RMSNorm weights
            tensors[name] = 1.0 + _random(shape, generator, 0.1)
        else:  # Linear weights: std 1/sqrt(fan_in), like a trained layer's order of magnitude
            tensors[name] = _random(shape, generator, 1.0 / math.sqrt(shape[1]))
    return tensors


def _write_dit(path: Path, generator, log) -> None:
    """Both branches as float32 safetensors, then quant_tools' q4_k recipe -> one two-branch GGUF."""
    from safetensors.torch import save_file

    from .quant_tools.build import build_gguf
    from .quant_tools.recipe import Recipe
    from .quant_tools.sources import open_branches

    with tempfile.TemporaryDirectory() as tmp:
        cond, uncond = Path(tmp, "cond.safetensors"), Path(tmp, "uncond.safetensors")
        save_file(_dit_branch(generator), cond)
        save_file(_dit_branch(generator), uncond)
        branches = open_branches(cond, uncond)
        try:
            build_gguf(branches, Recipe.load("q4_k"), path, threads=1, progress=False, overwrite=True,
                       log=lambda line: None)
        finally:
            for branch in branches:
                branch.close()
    log(f"  DiT (both branches, Q4_K via quant_tools): {path}")


def _train_tokenizer():
    """A toy byte-level BPE with the Qwen chat tokens (deterministic: fixed text, fixed vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    # The chat tokens come after the BPE vocabulary, as in Qwen's (151643 BPE tokens, then 151643, 151644, ...).
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _tokenizer_metadata(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp stores a GPT-2 style BPE in GGUF metadata."""
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS})
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if token in SPECIAL_TOKENS else 1 for token in tokens]  # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def _write_text_encoder(path: Path, tokenizer, generator) -> None:
    """A llama.cpp-named Qwen3-VL GGUF: Q8_0 linears and embedding, F32 norms, the tokenizer in its metadata."""
    import gguf

    from .models.text_encoder import Qwen3TextConfig, Qwen3TextEncoder
    from .models.text_encoder_loader import llama_cpp_name

    tokens, types, merges = _tokenizer_metadata(tokenizer)
    config = Qwen3TextConfig(vocab_size=len(tokens), **TE_CONFIG)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Qwen3TextEncoder(config, final_norm=True).named_parameters()}
    # the language-model head a llama.cpp Qwen3-VL GGUF carries too: the demo set can upsample prompts
    shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    partial = path.with_suffix(path.suffix + ".partial")
    writer = gguf.GGUFWriter(partial, "qwen3vl")
    writer.add_float32("qwen3vl.rope.freq_base", config.rope_theta)
    writer.add_float32("qwen3vl.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(llama_cpp_name(name), (1.0 + _random(shape, generator, 0.1)).numpy())
        else:
            weights = _random(shape, generator, 1.0 / math.sqrt(shape[1])).numpy()
            writer.add_tensor(llama_cpp_name(name), gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    shutil.move(partial, path)


def _write_vae(path: Path, generator) -> None:
    """A FLUX.2-layout VAE decoder (diffusers names) at toy width; no encoder (text-to-image never uses it)."""
    from safetensors.torch import save_file

    from .models.vae import Flux2VAEConfig, Flux2VAEDecoder

    vae = Flux2VAEDecoder(Flux2VAEConfig(**VAE_CONFIG))
    tensors = {}
    for name, value in vae.state_dict().items():
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if "norm" in module and name.endswith(".weight"):
            tensors[name] = 1.0 + _random(value.shape, generator, 0.1)
        elif name.endswith(".bias"):
            tensors[name] = _random(value.shape, generator, 0.02)
        else:
            fan_in = max(1, value[0].numel())
            tensors[name] = _random(value.shape, generator, 1.0 / math.sqrt(fan_in))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_demo(out="demo.png", models_dir=None, seed=0, log=print) -> list[str]:
    """Build (or reuse) the tiny set and run text -> image on the CPU; returns the written PNG paths."""
    import time

    from . import pipeline
    from .prompts.caption import minify

    started = time.perf_counter()
    models = build_demo_models(models_dir, log)
    log(f"model set: {models.root}")
    device = "cpu"
    model = pipeline.load_model(models.dit, device=device, compute_dtype="fp32")
    log(f"1. DiT loaded: {model.summary()}")
    encoder = pipeline.load_encoder(models.text_encoder, device=device, compute_dtype="fp32",
                                    expected_feature_dim=None)
    tokenizer = pipeline.load_tokenizer(models.text_encoder, encoder=encoder)
    conditioning = pipeline.encode_text(encoder, tokenizer, minify(DEMO_PROMPT))
    log(f"2. prompt encoded by the Qwen3-VL text encoder (tokenizer from the GGUF metadata): "
        f"{conditioning.token_count} tokens -> text taps {tuple(conditioning.text_taps.shape)}")

    def progress(step, total, x0):
        log(f"   step {step}/{total}")

    latent = pipeline.sample_latents(model, conditioning, width=DEMO_WIDTH, height=DEMO_HEIGHT, seed=seed,
                                     preset="turbo", callback=progress)
    log(f"3. sampled (turbo preset, official Euler flow matching + asymmetric CFG): latent "
        f"{tuple(latent['samples'].shape)}")
    vae = pipeline.load_vae(models.vae, dtype="fp32", device=device)
    # The toy VAE has the real 32 latent channels, so the official de-normalisation constants apply.
    image = pipeline.decode(vae, latent)
    written = pipeline.save_png(image, out)
    log(f"4. decoded by the FLUX.2 VAE decoder: image {tuple(image.shape)}")
    log(f"done in {time.perf_counter() - started:.1f} s. The weights are random, so the picture is noise.")
    log("image: " + ", ".join(os.path.abspath(path) for path in written))
    log("next:\n"
        "  - the tiny models in ComfyUI's folder layout: python -m ideogram4_gguf demo --write-models DIR\n"
        "  - real images: python -m ideogram4_gguf download --models-dir <ComfyUI>/models (needs access to the gated\n"
        "    ideogram-ai/ideogram-4-fp8 repo), then python -m ideogram4_gguf generate \"...\" --dit ... "
        "--text-encoder ... --vae ...\n"
        "  - in ComfyUI: install the pack and open a workflow from workflows/ (README, 'Install in ComfyUI')")
    return written
