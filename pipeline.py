"""Load -> encode -> sample -> decode: the one code path the ComfyUI nodes and the command line share.

Nothing here imports ComfyUI. What ComfyUI offers (a device, free memory, progress, interruption) arrives as
plain arguments and callbacks; `nodes/comfy_adapter.py` supplies them inside ComfyUI. The nodes import only this
module (docs/ARCHITECTURE.md): what they need from the layers below is a function here or a name imported here
for them (Ideogram4Model, DeviceMemoryError, MEMORY_MODES, KERNELS, PRESETS, ... : the `noqa: F401` imports).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LatentFormatError, ModelFileError, PromptError, SamplingError, UsageError, quote
from .models.dit import default_compute_dtype
from .models.dit_loader import find_dit_branches, load_dit_branches
from .models.dit_pair import (
    AppliedLora,  # noqa: F401  (for the nodes)
    Ideogram4Model,
)
from .models.latents import LatentNorm, from_comfy_flux2, is_ideogram4_latent, to_comfy_flux2, tokens_to_latent_dict
from .models.lora import (
    BRANCH_CHOICES,  # noqa: F401  (for the nodes)
    LoraFile,
)
from .models.lora import read_lora as _read_lora
from .models.memory_plan import (
    MEMORY_MODES,  # noqa: F401  (for the nodes)
    TORCH_OUT_OF_MEMORY,
    DeviceMemoryError,
    check_memory_mode,
)
from .models.text_encoder import unload_text_encoder
from .models.text_encoder_loader import config_from_weights as text_encoder_config
from .models.text_encoder_loader import load_lm_head, load_text_encoder, text_model_view
from .models.tokenizer import MAX_PROMPT_TOKENS, encode_prompt_ids, load_qwen_tokenizer, tokenizer_from_gguf_metadata
from .models.vae import Flux2VAEDecoder
from .models.vae_loader import check_vae_header, load_vae_decoder
from .models.vae_tiling import decode_latents, estimate_decode_peak
from .ops import (
    KERNELS,  # noqa: F401  (for the nodes)
    open_gguf,
    open_weights,
)
from .prompts.caption import (
    caption_from_form,  # noqa: F401  (for the nodes)
    prepare_prompt,
)
from .prompts.upsample import upsample_prompt
from .sampler.flow import (
    MAX_SIDE,  # noqa: F401  (for the nodes)
    MIN_SIDE,  # noqa: F401  (for the nodes)
    PIXELS_PER_TOKEN,  # noqa: F401  (for the nodes)
    sample,
    token_grid,
)
from .sampler.presets import (
    PRESETS,  # noqa: F401  (for the nodes)
    TERMINALS,  # noqa: F401  (for the nodes)
    check_seed,
    sampler_settings,
)

logger = logging.getLogger(__name__)

MAX_BATCH = 16  # images per run (one prompt); the nodes' batch_size widget ends here too
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ProgressCallback = Callable[[int, int, torch.Tensor], None]


def resolve_device(device=None) -> torch.device:
    """The device to compute on: the one given (checked to exist here), else CUDA when present, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"Unknown device {quote(device)}; use cpu, cuda or cuda:N.") from None
    available = available_devices()
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"Device {device} is not available on this machine (this torch build sees: "
                         f"{', '.join(available)}); pick one of those.")
    if device.type not in ("cpu", "cuda") and device.type not in {d.split(':')[0] for d in available}:
        raise UsageError(f"Device {device} is not available on this machine; pick one of {', '.join(available)}.")
    return device


def available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


# ---------------------------------------------------------------------------------------------------------------
# Cheap checks before minutes of loading (the nodes' validate_inputs and the command line run them first)


def check_settings(width: int, height: int, seed: int = 0, batch_size: int = 1, preset: str = "default",
                   **overrides):
    """The sampler settings for these values, after checking every number (finite, in range): SamplingError."""
    settings = sampler_settings(preset, **overrides)
    token_grid(width, height)
    check_seed(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise SamplingError(f"batch_size must be a whole number from 1 to {MAX_BATCH}, got {batch_size!r}.")
    return settings


def check_dit_file(path, uncond_path=None, branch_prefixes=None):
    """The DiT config of a file (or pair), from its header and tensor shapes only: ModelFileError / GGUFFormatError
    for a wrong, damaged or one-branch file."""
    return find_dit_branches(path, uncond_path, branch_prefixes=branch_prefixes).config


def check_text_encoder_file(path):
    """The text encoder's config from its header (ModelFileError for anything that is not a Qwen3-VL text model)."""
    path = resolve_text_encoder_path(path)
    view, _ = text_model_view(open_weights(path))
    return text_encoder_config(view, path)


def check_vae_file(path) -> None:
    """That a file (or folder) holds a FLUX.2 VAE decoder, from its header."""
    check_vae_header(path)


def check_output_path(path) -> Path:
    """An output PNG path whose folder exists and can be written (checked before anything is computed)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.suffix.lower() != ".png":
        raise UsageError(f"The output {path} must be a .png file.")
    if not folder.is_dir():
        raise UsageError(f"The output folder {folder} does not exist; create it or pick another --out.")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"The output folder {folder} is not writable; pick another --out.")
    return path


def check_prompt_length(tokenizer, prompt: str, *, strict: bool = False, truncate: bool = False) -> int:
    """Tokens the prompt will take (template included), or PromptError when it is too long (without truncate) or
    not a caption in strict mode: the same checks encoding makes, without the encoder."""
    text, _ = prepare_prompt(prompt, strict=strict)
    return len(encode_prompt_ids(tokenizer, text, truncate=truncate))


def resolve_dtype(dtype, device) -> torch.dtype:
    """"auto" | "bf16" | "fp16" | "fp32" | a torch dtype -> the torch dtype ("auto": bf16 on GPUs with fast bf16,
    fp16 on older GPUs, fp32 on the CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}")
    return COMPUTE_DTYPES[dtype] or default_compute_dtype(device)


# ---------------------------------------------------------------------------------------------------------------
# The DiT pair


def load_model(path, uncond_path=None, *, compute_dtype="auto", kernel="auto", memory_mode="auto",
               device=None, branch_prefixes=None) -> Ideogram4Model:
    """Load both DiT branches from a two-branch file (or a cond file + `uncond_path`); see docs/dit.md.

    memory_mode: one of MEMORY_MODES ("auto", "gpu", "stream_uncond", "cpu_offload"; docs/memory.md).
    branch_prefixes: (cond_prefix, uncond_prefix) for a two-branch file whose tensor prefixes do not say which
    branch is which (docs/dit.md, "Which prefix is which branch")."""
    check_memory_mode(memory_mode)
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    cond, uncond, info = load_dit_branches(path, uncond_path, compute_dtype=dtype, device="cpu", kernel=kernel,
                                           branch_prefixes=branch_prefixes)
    model = Ideogram4Model(cond, uncond, info, device, memory_mode)
    logger.info("Ideogram 4 DiT: %s", model.summary())
    return model


def read_lora(path, *, branch: str = "auto") -> LoraFile:
    """Read and check a LoRA file (any format of docs/lora.md) for `Ideogram4Model.with_lora`; branch "auto" |
    "cond" | "uncond" says which DiT it was trained for ("auto": as the file says)."""
    return _read_lora(path, branch=branch)


# ---------------------------------------------------------------------------------------------------------------
# Text


@dataclass
class TextConditioning:
    """What the text encoder hands to the sampler: the interleaved taps of one prompt, on the CPU.

    The DiT projects them (llm_cond_norm + llm_cond_proj) once per image when sampling starts.
    """

    text_taps: torch.Tensor  # (tokens, 13 * hidden) float32
    prompt: str  # the exact text encoded (a canonical minified caption, or the plain prompt)
    token_count: int  # template included
    warnings: list[str] = field(default_factory=list)
    encoder_file: str = ""

    def __repr__(self):
        return (f"TextConditioning({self.token_count} tokens, taps {tuple(self.text_taps.shape)}, "
                f"prompt {self.prompt[:60]!r}{'...' if len(self.prompt) > 60 else ''})")


def tokenizer_search_dirs(text_encoder_path) -> list[Path]:
    """Where a tokenizer may sit beside a text-encoder file: its folder, and the release layout's sibling
    `tokenizer/` folder (`<repo>/text_encoder/model.safetensors` + `<repo>/tokenizer/`)."""
    path = Path(text_encoder_path)
    folder = path if path.is_dir() else path.parent
    return [folder, folder / "tokenizer", folder.parent / "tokenizer", folder.parent]


def load_tokenizer(text_encoder_path=None, tokenizer_source=None, encoder=None, extra_search_dirs=()):
    """The Qwen tokenizer for a text encoder: an explicit `tokenizer_source`, else the vocabulary inside the
    encoder's GGUF (read from the file when no `encoder` is loaded yet), else one found beside the encoder file,
    else one in `extra_search_dirs` (ComfyUI passes its own `qwen25_tokenizer` folder)."""
    if tokenizer_source:
        return load_qwen_tokenizer(tokenizer_source)
    metadata = getattr(encoder, "tokenizer_metadata", None)
    if encoder is None and text_encoder_path is not None and str(text_encoder_path).lower().endswith(".gguf"):
        metadata = open_gguf(text_encoder_path).metadata
    if metadata and "tokenizer.ggml.tokens" in metadata:
        return tokenizer_from_gguf_metadata(metadata, str(text_encoder_path))
    search = (tokenizer_search_dirs(text_encoder_path) if text_encoder_path else []) + [Path(d) for d in extra_search_dirs]
    return load_qwen_tokenizer(None, search_dirs=[d for d in search if d.is_dir()])


def resolve_text_encoder_path(path) -> Path:
    """A picked shard of a sharded checkpoint stands for the whole checkpoint (its `*.index.json`)."""
    path = Path(path)
    if path.is_file() and "-of-" in path.name:
        indexes = sorted(path.parent.glob("*.safetensors.index.json"))
        if indexes:
            return indexes[0]
    return path


def load_encoder(path, *, compute_dtype="auto", device=None, embed_device="auto", kernel="auto",
                 expected_feature_dim: int | None = None):
    """Load the Qwen3-VL text encoder (GGUF, fp8 or bf16 safetensors, ComfyUI single file); docs/text_encoder.md.

    expected_feature_dim: the DiT's text feature width when known (53248 for the published model), to refuse a
    wrong encoder (e.g. Qwen3-VL-4B) before encoding; the sampler checks it again in any case."""
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    return load_text_encoder(resolve_text_encoder_path(path), compute_dtype=dtype, device=device,
                             embed_device=embed_device, expected_feature_dim=expected_feature_dim, kernel=kernel)


def encode_text(encoder, tokenizer, prompt: str, *, strict: bool = False, truncate: bool = False,
                max_tokens: int = MAX_PROMPT_TOKENS) -> TextConditioning:
    """Prompt -> TextConditioning. JSON captions are validated and re-minified in canonical order; plain text is
    accepted with a warning (JSON captions give better images)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("The prompt is empty. Write a description, ideally a JSON caption (see the Ideogram4 "
                          "JSON Prompt node).")
    text, warnings = prepare_prompt(prompt, strict=strict)
    for warning in warnings:
        logger.warning("prompt: %s", warning)
    ids = encode_prompt_ids(tokenizer, text, max_tokens=max_tokens, truncate=truncate)
    taps = encoder(ids)
    return TextConditioning(taps.float().cpu(), text, len(ids), list(warnings),
                            str(getattr(encoder, "source_path", "")))


def encode_prompt(text_encoder_path, prompt: str, *, tokenizer_source=None, extra_search_dirs=(),
                  compute_dtype="auto", device=None, strict=False, truncate=False,
                  expected_feature_dim: int | None = None, tokenizer=None) -> TextConditioning:
    """Load the encoder, encode one prompt, free the encoder. tokenizer: one already loaded (to check the prompt's
    length before loading anything big)."""
    encoder = load_encoder(text_encoder_path, compute_dtype=compute_dtype, device=device,
                           expected_feature_dim=expected_feature_dim)
    try:
        tokenizer = tokenizer or load_tokenizer(text_encoder_path, tokenizer_source, encoder, extra_search_dirs)
        return encode_text(encoder, tokenizer, prompt, strict=strict, truncate=truncate)
    finally:
        unload_text_encoder(encoder)


def upsample(text_encoder_path, idea: str, *, width: int = 1024, height: int = 1024, seed: int = 0,
             max_new_tokens: int = 1024, temperature: float = 0.0, lm_head_path=None, tokenizer_source=None,
             extra_search_dirs=(), compute_dtype="auto", device=None, on_token=None):
    """Local prompt upsampling (docs/prompts.md): a plain idea -> a validated JSON caption, written by the text
    encoder's own Qwen3-VL weights with a language-model head (from `lm_head_path`, else the encoder file itself:
    llama.cpp GGUFs and the Instruct checkpoints carry one). Loads, generates, frees. Greedy at temperature 0.

    Returns prompts.upsample.UpsampleResult (caption, minified prompt, raw reply, warnings)."""
    check_seed(seed)
    if not isinstance(idea, str) or not idea.strip():
        raise PromptError("Prompt upsampling needs an idea: write a few words about the picture.")
    for name, value, low, high in (("temperature", temperature, 0.0, 2.0), ("max_new_tokens", max_new_tokens, 16, 4096)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise PromptError(f"{name} must be a number from {low} to {high}, got {value!r}.")
    token_grid(width, height)
    device = resolve_device(device)
    dtype = resolve_dtype(compute_dtype, device)
    path = resolve_text_encoder_path(text_encoder_path)
    encoder = load_text_encoder(path, compute_dtype=dtype, device=device, for_generation=True)
    try:
        try:
            head = load_lm_head(lm_head_path or path, encoder)
        except ModelFileError as exc:
            if lm_head_path:
                raise
            raise ModelFileError(f"{path} has no language-model head, which prompt upsampling needs: pick "
                                 "a text encoder that carries one (a llama.cpp Qwen3-VL-8B GGUF, or the "
                                 "Qwen3-VL-8B-Instruct checkpoint), or give the head separately (lm_head file, e.g. "
                                 "diffusers/qwen3-vl-8b-instruct-lm-head).") from exc
        tokenizer = load_tokenizer(path, tokenizer_source, encoder, extra_search_dirs)
        return upsample_prompt(idea, encoder, head, tokenizer, width=width, height=height,
                               max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=int(seed),
                               on_token=on_token)
    finally:
        unload_text_encoder(encoder)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def sample_latents(model: Ideogram4Model, conditioning: TextConditioning, *, width: int, height: int, seed: int = 0,
                   batch_size: int = 1, preset: str = "default", callback: ProgressCallback | None = None,
                   free_bytes: int | None = None, make_room: Callable[[int], None] | None = None,
                   **overrides) -> dict:
    """Sample one prompt -> our LATENT dict (docs/vae.md): `{"samples": (B, 128, H/16, W/16), "ideogram4_latent": 1}`.

    overrides: any `SamplerSettings` field (steps, guidance, polish_steps, polish_guidance, mu, std, terminal,
    guidance_schedule, round_t); None keeps the preset's value. callback(step, total, x0_tokens) after each step;
    an exception it raises stops sampling (interruption). free_bytes / make_room: see `Ideogram4Model.place`.
    """
    settings = check_settings(width, height, seed, batch_size, preset, **overrides)
    grid = token_grid(width, height)
    features = conditioning.text_taps
    expected = model.cond_branch.config.llm_features_dim
    if features.shape[-1] != expected:
        raise ModelFileError(
            f"The text features are {features.shape[-1]} wide but this DiT expects {expected}: the text encoder "
            f"({conditioning.encoder_file or 'unknown file'}) does not belong to this Ideogram 4 model."
        )
    try:
        model.place(width, height, conditioning.token_count, free_bytes=free_bytes, make_room=make_room)
        with model.lora_hooks():
            projected = model.cond_branch.project_text(features.to(model.device))
            tokens = sample(model.cond_branch, model.uncond_branch, projected, width, height, seed=int(seed),
                            batch_size=batch_size, settings=settings, callback=callback)
    except TORCH_OUT_OF_MEMORY as exc:
        raise _out_of_memory(model, width, height, conditioning.token_count, exc) from exc
    return tokens_to_latent_dict(tokens.cpu(), *grid)


def _out_of_memory(model: Ideogram4Model, width: int, height: int, text_tokens: int, exc) -> DeviceMemoryError:
    mode = model.placement.mode if model.placement is not None else model.memory_mode
    model.offload()  # the device copies go now, so that a retry (or the next node) finds the memory free
    needs = ", ".join(f"{m} {model.peak_bytes(m, width, height, text_tokens) / 1e9:.1f} GB"
                      for m in ("gpu", "stream_uncond", "cpu_offload"))
    free = ""
    if model.device.type == "cuda":
        free = f"; {torch.cuda.mem_get_info(model.device)[0] / 1e9:.1f} GB of the GPU is free now"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DeviceMemoryError(
        f"Out of GPU memory while sampling {width}x{height} with the Ideogram 4 DiT in memory mode '{mode}' "
        f"({reason}). Computed need of one image at this size per memory mode: {needs}{free}. Choose a memory "
        "mode that fits in the Ideogram4 Q4_K Loader (or 'auto'), lower the resolution, or close other programs "
        "using the GPU. The DiT's GPU copies have been released."
    )


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def load_vae(path, *, dtype="auto", device=None) -> Flux2VAEDecoder:
    """The FLUX.2 VAE decoder from a diffusers `vae/` file/folder or a BFL/ComfyUI `flux2-vae.safetensors`."""
    device = resolve_device(device)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return load_vae_decoder(path, dtype=resolve_dtype(dtype, device), device=device)


def decode(vae: Flux2VAEDecoder, latent: dict, *, tiled: str = "auto", free_memory_bytes: int | None = None,
           norm: LatentNorm | None = None, progress: Callable[[int, int], None] | None = None,
           make_room: Callable[[int], int | None] | None = None) -> torch.Tensor:
    """Our LATENT -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1]: plan (whole, row bands or tiles), decode.

    make_room(bytes) -> free bytes (or None: ask the device): called first with the computed peak of an untiled
    decode, so that ComfyUI can make room for it (it may evict the DiT); tiling is then planned against the free
    bytes it returns, in place of `free_memory_bytes`."""
    if make_room is not None:
        grid_h, grid_w = latent["samples"].shape[-2:]
        f = 2 * vae.scale_factor
        peak = estimate_decode_peak(vae.config, grid_h * f, grid_w * f, dtype=vae.dtype, device=vae.device)
        free_memory_bytes = make_room(peak.bytes)
    return decode_latents(latent, vae, tiled=tiled, free_memory_bytes=free_memory_bytes, norm=norm,
                          progress=progress)


def latent_from_core(latent: dict, vae: Flux2VAEDecoder, vae_name: str) -> dict:
    """Our LATENT as it is; a core FLUX.2 LATENT converted with the statistics of the VAE file `vae_name`."""
    if is_ideogram4_latent(latent):
        return latent
    if vae.latent_bn is None:
        raise LatentFormatError(
            f"This LATENT is not from Ideogram4 Sampler, and {vae_name} carries no latent statistics to "
            "convert a core FLUX.2 latent; use ComfyUI's flux2-vae.safetensors or decode with core VAE "
            "Decode.")
    return from_comfy_flux2(latent, vae.latent_bn)


def latent_to_core(latent: dict, vae_path, vae_name: str) -> dict:
    """Our LATENT -> core's FLUX.2 LATENT, normalised with the statistics of the VAE file core's VAE Decode loads."""
    if not is_ideogram4_latent(latent):
        raise LatentFormatError("This LATENT is not from Ideogram4 Sampler (it is probably already a core "
                                "FLUX.2 latent); connect the sampler's output.")
    vae = load_vae(vae_path, dtype="fp32", device="cpu")
    if vae.latent_bn is None:
        raise LatentFormatError(f"{vae_name} carries no latent statistics (bn.running_mean/var); core's FLUX.2 "
                                "VAE Decode needs ComfyUI's flux2-vae.safetensors.")
    return to_comfy_flux2(latent, vae.latent_bn)


def save_png(image: torch.Tensor, path) -> list[str]:
    """Write a ComfyUI IMAGE batch as PNG files (`name.png`, or `name_1.png`, ... for a batch)."""
    from PIL import Image

    path = Path(path)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    written = []
    for index, array in enumerate(images):
        target = path if len(images) == 1 else path.with_name(f"{path.stem}_{index + 1}{path.suffix}")
        Image.fromarray(array).save(target)
        written.append(os.fspath(target))
    return written
