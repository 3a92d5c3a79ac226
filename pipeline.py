"""Load -> encode -> sample -> decode: the one code path the ComfyUI nodes and the command line share.

Nothing here imports ComfyUI. What ComfyUI offers (a device, free memory, progress, interruption) arrives as
plain arguments and callbacks; `nodes/comfy_adapter.py` supplies them inside ComfyUI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import Ideogram4Error, ModelFileError, PromptError, SamplingError, UsageError, quote
from .models.dit import default_compute_dtype
from .models.dit_loader import DiTLoadInfo, find_dit_branches, load_dit_branches
from .models.latents import LatentNorm, tokens_to_latent_dict
from .models.lora import BRANCH_CHOICES, LoraFile, LoraHandles, bind, install
from .models.lora import read_lora as _read_lora
from .models.residency import MEMORY_MODES  # noqa: F401  (the nodes offer pipeline.MEMORY_MODES)
from .models.residency import check_memory_mode, estimate_peak_bytes, place_branches, resolve_memory_mode, stored_bytes
from .models.text_encoder import unload_text_encoder
from .models.text_encoder_loader import config_from_weights as text_encoder_config
from .models.text_encoder_loader import load_lm_head, load_text_encoder, text_model_view
from .models.tokenizer import MAX_PROMPT_TOKENS, encode_prompt_ids, load_qwen_tokenizer, tokenizer_from_gguf_metadata
from .models.vae import Flux2VAEDecoder, check_vae_header, decode_latents
from .ops import open_gguf, open_weights
from .prompts.caption import prepare_prompt
from .prompts.upsample import upsample_prompt
from .sampler.flow import sample, token_grid
from .sampler.presets import check_seed, sampler_settings

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


@dataclass
class _Residency:
    placement: object = None  # residency.Placement while placed


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA file on one branch ("cond" / "uncond") at a strength."""

    lora: LoraFile
    strength: float
    branch: str


@dataclass(eq=False)  # identity semantics: hashable, so caches can hold it weakly
class Ideogram4Model:
    """Both DiT branches, loaded packed on the CPU (memory-mapped GGUF), and where they run.

    Sampling places them on `device` in `memory_mode` (models/residency.py: both resident, the unconditional
    branch streamed layer by layer from pinned host memory, or both streamed); `offload()` undoes it. `loras` run
    beside the branches while sampling (models/lora.py); `with_lora` returns a model that shares the branches and
    their placement with this one.
    """

    cond_branch: torch.nn.Module
    uncond_branch: torch.nn.Module
    info: DiTLoadInfo
    device: torch.device
    memory_mode: str = "auto"
    loras: tuple[AppliedLora, ...] = ()
    residency: _Residency = field(default_factory=_Residency, repr=False)

    @property
    def placement(self):
        return self.residency.placement

    @placement.setter
    def placement(self, value):
        self.residency.placement = value

    def with_lora(self, lora: LoraFile, strength: float = 1.0, branch: str = "auto") -> "Ideogram4Model":
        """This model plus a LoRA on `branch` ("auto": the branch the file was trained for; "both"); the
        branches, their placement and the packed weights are shared, nothing is merged."""
        if branch not in BRANCH_CHOICES:
            raise ValueError(f"LoRA branch must be one of {BRANCH_CHOICES}, got {branch!r}")
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
        roles = ("cond", "uncond") if branch == "both" else (lora.branch if branch == "auto" else branch,)
        for role in roles:  # check the shapes now, not when sampling starts
            bind(lora, self.cond_branch if role == "cond" else self.uncond_branch, 1.0, f" ({role} branch)")
        return dataclasses.replace(self, loras=self.loras + tuple(AppliedLora(lora, strength, r) for r in roles))

    def lora_hooks(self) -> LoraHandles:
        """Install every LoRA's low-rank path on the placed branches (remove them with the returned handles)."""
        handles = LoraHandles()
        placement = self.placement
        for applied in self.loras:
            branch = self.cond_branch if applied.branch == "cond" else self.uncond_branch
            terms, _ = bind(applied.lora, branch, applied.strength)
            streamed = placement is not None and placement.is_streamed(applied.branch)
            install(terms, keep_on_device=not streamed, handles=handles)
        return handles

    def place(self, width: int = 1024, height: int = 1024, text_tokens: int = 512, free_bytes: int | None = None,
              make_room: Callable[[int], None] | None = None):
        """Place the branches for an image of this size (kept when the resolved mode is unchanged).

        make_room(bytes): called with the computed peak before anything moves (ComfyUI frees memory there)."""
        cond, uncond = self.cond_branch, self.uncond_branch
        mode = resolve_memory_mode(self.memory_mode, cond, uncond, self.device, free_bytes=free_bytes, width=width,
                                   height=height, text_tokens=text_tokens)
        if self.placement is not None and self.placement.mode == mode:
            return self.placement
        self.offload()
        if make_room is not None:
            make_room(self.peak_bytes(mode, width, height, text_tokens))
        self.placement = place_branches(cond, uncond, self.device, mode)
        logger.info("Ideogram 4 DiT: %s", self.placement.summary())
        return self.placement

    def peak_bytes(self, mode: str, width: int, height: int, text_tokens: int) -> int:
        """Computed device memory of one image in an explicit mode (docs/memory.md)."""
        return estimate_peak_bytes(mode, self.cond_branch.config, stored_bytes(self.cond_branch),
                                   stored_bytes(self.uncond_branch), width, height, text_tokens,
                                   compute_dtype=self.cond_branch.compute_dtype).total

    def offload(self) -> None:
        """Free the device copies (the packed weights stay memory-mapped on the CPU)."""
        if self.placement is not None:
            self.placement.release()
            logger.info("Ideogram 4 DiT: released its %s copies (memory mode %s)", self.placement.device,
                        self.placement.mode)
            self.placement = None

    def summary(self) -> str:
        where = self.placement.summary() if self.placement is not None else f"memory mode {self.memory_mode}"
        loras = "".join(f"; LoRA {Path(a.lora.path).name} x{a.strength:g} on {a.branch}" for a in self.loras)
        return f"{self.info.summary()}; runs on {self.device}, {where}{loras}"

    def __repr__(self):  # ComfyUI shows node inputs in error reports: one line, not two module trees
        return f"Ideogram4Model({self.summary()})"


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


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class DeviceMemoryError(Ideogram4Error, _OUT_OF_MEMORY):
    """Out of GPU memory while sampling, with the memory modes that would fit. Still a torch OutOfMemoryError, so
    ComfyUI treats it as one (it unloads models and shows its out-of-memory tip)."""


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
    except _OUT_OF_MEMORY as exc:
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
    return Flux2VAEDecoder.from_file(path, dtype=resolve_dtype(dtype, device), device=device)


def decode(vae: Flux2VAEDecoder, latent: dict, *, tiled: str = "auto", free_memory_bytes: int | None = None,
           norm: LatentNorm | None = None, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Our LATENT -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1]."""
    return decode_latents(latent, vae, tiled=tiled, free_memory_bytes=free_memory_bytes, norm=norm,
                          progress=progress)


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
