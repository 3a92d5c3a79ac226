"""The one place that talks to ComfyUI's runtime: model folders, devices, memory, progress, previews, interruption.

The nodes call these functions; the layers below get plain values and callbacks. Every ComfyUI module is imported
inside the function that needs it, so the node modules import without ComfyUI (their unit tests run without it).
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import torch

from ..errors import ModelFileError

logger = logging.getLogger(__name__)

# Our own folder keys: they share ComfyUI's path lists (so extra_model_paths.yaml and --base-directory apply)
# but have their own extension sets. Widening core's shared `supported_pt_extensions` would put .gguf files in
# every core loader's list.
DIT_FOLDER = "ideogram4_dit"  # models/diffusion_models + models/unet: .gguf and .safetensors
TEXT_ENCODER_FOLDER = "ideogram4_text_encoder"  # models/text_encoders + models/clip: .gguf and .safetensors
VAE_FOLDER = "vae"
LORA_FOLDER = "loras"
_OWN_FOLDERS = {DIT_FOLDER: ("diffusion_models", {".gguf", ".safetensors", ".sft"}),
                TEXT_ENCODER_FOLDER: ("text_encoders", {".gguf", ".safetensors", ".sft"})}
NONE_CHOICE = "(none)"


def register_model_folders() -> None:
    import folder_paths

    for key, (base, extensions) in _OWN_FOLDERS.items():
        paths = folder_paths.folder_names_and_paths[base][0]  # the same list object: later additions show up
        folder_paths.folder_names_and_paths[key] = (paths, set(extensions))
        folder_paths.filename_list_cache.pop(key, None)


def register_lora_key_map() -> None:
    """Let core's LoRA loaders read every Ideogram 4 LoRA format the pack reads, on any Ideogram 4 MODEL (ours and
    core's own UNETLoader's): core maps only the bare official names, so diffusers / PEFT and OneTrainer files
    (`transformer.` prefix, split to_q / to_k / to_v / to_out.0) load as "lora key not loaded" there
    (Comfy-Org/ComfyUI#14477). Adds keys to core's map; never changes the ones core makes."""
    import comfy.lora
    import comfy.model_base

    from ..models.lora import core_key_map

    original = comfy.lora.model_lora_keys_unet
    if getattr(original, "ideogram4_keys", False):
        return

    def model_lora_keys_unet(model, key_map=None):
        key_map = original(model, {} if key_map is None else key_map)
        if isinstance(model, comfy.model_base.Ideogram4):
            network = model.diffusion_model
            names = [name for name, module in network.named_modules()
                     if hasattr(module, "in_features") and hasattr(module, "out_features")]
            rows = int(network.layers[0].attention.qkv.out_features) // 3 if len(network.layers) else 0
            for key, target in core_key_map(names, rows).items():
                key_map.setdefault(key, target)
        return key_map

    model_lora_keys_unet.ideogram4_keys = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet


def model_files(key: str) -> list[str]:
    """File names (relative to the model folders) for a dropdown; empty when ComfyUI is absent."""
    try:
        import folder_paths
    except ImportError:
        return []
    if key in _OWN_FOLDERS and key not in folder_paths.folder_names_and_paths:
        register_model_folders()
    return folder_paths.get_filename_list(key)


def model_path(key: str, name: str) -> str:
    """The full path of a dropdown choice, or a ModelFileError that says where to put the file."""
    if not name or name == NONE_CHOICE:
        raise ModelFileError(f"No file picked for {key}.")
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (tests, scripts): a plain path is accepted
        if os.path.exists(name):
            return name
        raise ModelFileError(f"{name}: file not found.") from None
    path = folder_paths.get_full_path(key, name)
    if path is None:
        base = _OWN_FOLDERS.get(key, (key,))[0]
        folders = ", ".join(folder_paths.get_folder_paths(key)) if key in folder_paths.folder_names_and_paths else base
        raise ModelFileError(f"'{name}' was not found in the {base} folders ({folders}). Put the file there (the "
                             "workflow's model list and the README's 'Model files' table give the download links) "
                             "and refresh the page.")
    return path


def file_fingerprint(key: str, *names) -> tuple:
    """What makes a cached node output stale: the picked files' modification times (a file replaced under
    the same name must reload)."""
    stamps = []
    for name in names:
        try:
            stamps.append(os.path.getmtime(model_path(key, name)))
        except (ModelFileError, OSError):
            stamps.append(None)
    return tuple(stamps)


def comfy_tokenizer_dirs() -> list[Path]:
    """ComfyUI's own Qwen tokenizer files (comfy/text_encoders/qwen25_tokenizer), when ComfyUI is present."""
    try:
        import comfy
    except ImportError:
        return []
    # `comfy` may be a namespace package (no __file__): search every folder it spans.
    folders = [Path(p) / "text_encoders" / "qwen25_tokenizer" for p in getattr(comfy, "__path__", [])]
    return [f for f in folders if f.is_dir()]


# ---------------------------------------------------------------------------------------------------------------
# Devices and memory


def _model_management():
    """ComfyUI's comfy.model_management, or None outside ComfyUI."""
    try:
        import comfy.model_management
    except ImportError:
        return None
    return comfy.model_management


def torch_device() -> torch.device:
    mm = _model_management()
    if mm is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return mm.get_torch_device()


def free_memory_bytes(device: torch.device) -> int | None:
    mm = _model_management()
    return None if mm is None else int(mm.get_free_memory(device))


def make_room(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its other models until `bytes_needed` are free on `device` (on a `--cpu` ComfyUI the
    device is the CPU and ComfyUI manages RAM the same way)."""
    mm = _model_management()
    if mm is not None:
        mm.free_memory(int(bytes_needed), device)


def memory_for_planning(device: torch.device) -> int | None:
    """Device memory our models may plan with: what is free now plus what ComfyUI could free by unloading its
    models (it does that in `make_room`). None outside ComfyUI (the layers below then ask CUDA themselves)."""
    mm = _model_management()
    if mm is None or device.type == "cpu":
        return None
    free = int(mm.get_free_memory(device))
    try:
        free += sum(int(loaded.model_loaded_memory()) for loaded in mm.current_loaded_models
                    if loaded.device == device)
    except Exception:  # ComfyUI internals moved: plan with what is free now
        logger.debug("could not read ComfyUI's loaded models", exc_info=True)
    return free


class _Empty(torch.nn.Module):
    """What our stand-in ModelPatcher holds: nothing for ComfyUI to move (it would fight our own placement)."""


# Every stand-in patcher we registered, held strongly until ComfyUI has dropped it from its list. ComfyUI keeps its
# loaded models only through weak references, with a finalizer that removes a dead one from `current_loaded_models`:
# a stand-in that died inside ComfyUI's own unload loop (our `on_unload` releasing the last reference) would shrink
# that list mid-iteration and kill ComfyUI's prompt worker with an IndexError; and one that nobody held would be
# forgotten by ComfyUI at once.
_standins: list = []


def _prune_standins(mm) -> None:
    tracked = {id(loaded.model) for loaded in mm.current_loaded_models}
    _standins[:] = [patcher for patcher in _standins if id(patcher) in tracked]


def _register(device: torch.device, size_bytes: int, on_unload):
    """Make ComfyUI's memory manager count `size_bytes` of ours on `device` as a loaded model, so "Unload
    models", "Free memory" and eviction for other models release it: unloading the stand-in patcher calls
    `on_unload()`. Returns the patcher (None outside ComfyUI)."""
    mm = _model_management()
    if mm is None:
        return None
    import comfy.model_patcher
    from comfy.patcher_extension import CallbacksMP

    _prune_standins(mm)
    patcher = comfy.model_patcher.ModelPatcher(_Empty(), load_device=device, offload_device=mm.unet_offload_device(),
                                               size=max(1, int(size_bytes)))
    patcher.add_callback(CallbacksMP.ON_DETACH, lambda _patcher, _unpatch_all: on_unload())
    _standins.append(patcher)
    mm.load_models_gpu([patcher])
    return patcher


_registered = weakref.WeakKeyDictionary()


def _if_alive(method_ref: weakref.WeakMethod):
    def call():
        method = method_ref()
        if method is not None:
            method()

    return call


def track_placement(model) -> None:
    """Register our placed DiT (once per placement); unloading it calls `model.offload()`. On a `--cpu` ComfyUI the
    placement is on the CPU and is registered there, as ComfyUI registers its own models."""
    placement = model.placement
    if placement is None:
        return
    patcher = _registered.get(placement)
    if patcher is None:
        # the stand-in must not keep the DiT pair alive: it calls offload only while the pair still exists
        patcher = _register(placement.device, placement.device_bytes, _if_alive(weakref.WeakMethod(model.offload)))
        if patcher is None:
            return
        _registered[placement] = patcher
    else:
        _model_management().load_models_gpu([patcher])  # marks it recently used


def keep_loaded(module: torch.nn.Module, device: torch.device, on_unload) -> None:
    """Register a module we keep between runs (a text encoder asked to stay loaded): `on_unload()` runs when
    ComfyUI unloads it. Outside ComfyUI nothing is registered (the caller's cache just keeps it)."""
    device = torch.device(device)
    on_device = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
                    if t.device.type == device.type)
    _register(device, on_device, on_unload)


def throw_if_interrupted() -> None:
    mm = _model_management()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------------------------
# Progress and previews


class SamplingProgress:
    """ComfyUI progress bar + live previews + interruption, as the sampler's `callback(step, total, x0)`."""

    def __init__(self, total: int, node_id=None, grid=None):
        self.grid = grid
        self.bar = None
        self.preview_method = None
        try:
            import comfy.utils
            from comfy.cli_args import LatentPreviewMethod, args
        except ImportError:
            return
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        method = args.preview_method
        if method != LatentPreviewMethod.NoPreviews:
            self.preview_method = method
            self.preview_size = args.preview_size

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        throw_if_interrupted()
        if self.bar is not None:
            self.bar.update_absolute(step, total, self._preview(x0))

    def _preview(self, x0):
        if self.preview_method is None or self.grid is None:
            return None
        from PIL import Image

        from ..models.preview import latent_preview_rgb, preview_to_uint8

        rgb = latent_preview_rgb(x0[:1].float().cpu(), grid=self.grid)
        return ("JPEG", Image.fromarray(preview_to_uint8(rgb)[0].numpy()), self.preview_size)


def node_progress(node_id):
    """A (done, total) callback driving a ComfyUI progress bar (VAE tiles, say); no-op outside ComfyUI."""
    try:
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(1, node_id=node_id)

    def report(done, total):
        throw_if_interrupted()
        bar.update_absolute(done, total)

    return report
