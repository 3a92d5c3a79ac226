"""Running a converted workflow on the tiny demo models: model names swapped for the demo files, a small size and
few steps; and a node-by-node executor for the pack's nodes outside ComfyUI (core SaveImage stood in for)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image

from ideogram4_gguf.sampler.presets import PRESETS

from .ui_to_api import execution_order

# Model-file dropdowns -> the ComfyUI model folder they list. Their options are the files in that folder (empty
# outside ComfyUI), so tests check the stored names against the node's `properties.models` instead.
MODEL_FILE_INPUTS = {("IG4Loader", "dit_name"): "diffusion_models",
                     ("IG4Loader", "uncond_name"): "diffusion_models",
                     ("IG4LoaderAdvanced", "dit_name"): "diffusion_models",
                     ("IG4LoaderAdvanced", "uncond_name"): "diffusion_models",
                     ("IG4PromptUpsample", "text_encoder"): "text_encoders",
                     ("IG4ModelLoader", "dit_name"): "diffusion_models",
                     ("IG4ModelLoader", "uncond_name"): "diffusion_models",
                     ("IG4CoreModelLoader", "dit_name"): "diffusion_models",
                     ("IG4CoreModelLoader", "uncond_name"): "diffusion_models",
                     ("IG4TextEncode", "text_encoder"): "text_encoders",
                     ("IG4VAEDecode", "vae_name"): "vae",
                     ("IG4LatentToFlux2", "vae_name"): "vae"}
NO_FILE = "(none)"
# LoRA dropdowns: user files (no download link), so not in MODEL_FILE_INPUTS; tiny runs swap in a test LoRA.
LORA_INPUTS = {("IG4LoraLoader", "lora_name"): "loras"}


def for_tiny_models(prompt: dict, files: dict[str, str], size=256, preset="turbo", steps=2, seed=None) -> dict:
    """A copy of an API prompt with `files[folder]` (a path outside ComfyUI, a file name inside it) in place of
    every model file, and a small size and few steps (the turbo preset cut to `steps`, its polish step
    included; 0 = the preset's own count) so runs stay within CI time."""
    prompt = copy.deepcopy(prompt)
    for entry in prompt.values():
        inputs = entry["inputs"]
        for (kind, name), folder in {**MODEL_FILE_INPUTS, **LORA_INPUTS}.items():
            if entry["class_type"] == kind and inputs.get(name, NO_FILE) != NO_FILE:
                inputs[name] = files[folder]
        if entry["class_type"] == "IG4Sampler":
            inputs.update(width=size, height=size, preset=preset, steps=steps)
            if seed is not None:
                inputs["seed"] = seed
        elif entry["class_type"] == "IG4PresetSampler":  # no steps widget: the preset runs as it is
            inputs.update(width=size, height=size, preset=preset)
            if seed is not None:
                inputs["seed"] = seed
        elif entry["class_type"] == "IG4SamplerAdvanced":
            inputs.update(width=size, height=size, steps=steps or 12, polish_steps=min(inputs["polish_steps"], steps or 12))
            if seed is not None:
                inputs["seed"] = seed
        elif entry["class_type"] == "IG4PromptUpsample":
            inputs.update(max_tokens=16)
            if seed is not None:
                inputs["seed"] = seed
        elif entry["class_type"] in ("IG4EmptyLatent", "IG4OfficialSigmas"):  # the core-graph workflow
            inputs.update(width=size, height=size)
            if entry["class_type"] == "IG4OfficialSigmas":
                turbo = PRESETS[preset]
                inputs.update(steps=steps or turbo.steps, mu=turbo.mu, std=turbo.std)
        elif entry["class_type"] == "IG4OfficialNoise" and seed is not None:
            inputs["noise_seed"] = seed
    return prompt


def save_image_stand_in(out_dir: Path):
    """Core SaveImage's job: one 8-bit PNG per image of the batch."""

    def execute(images, filename_prefix):
        paths = []
        for i, image in enumerate(images):
            path = out_dir / f"{filename_prefix}_{i:05}_.png"
            Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)
            paths.append(path)
        return (images,), paths

    return execute


def run_prompt(prompt: dict, out_dir: Path):
    """Execute an API prompt node by node in dependency order (the pack's nodes through their `execute`);
    returns (outputs by node id, saved PNG paths)."""
    from ideogram4_gguf.nodes import NODES

    classes = {n.define_schema().node_id: n for n in NODES}
    save_image = save_image_stand_in(out_dir)
    outputs, saved = {}, []
    for node_id in execution_order(prompt):
        entry = prompt[node_id]
        inputs = {name: outputs[value[0]][value[1]] if isinstance(value, list) else value
                  for name, value in entry["inputs"].items()}
        if entry["class_type"] == "SaveImage":
            outputs[node_id], paths = save_image(**inputs)
            saved += paths
        else:
            outputs[node_id] = classes[entry["class_type"]].execute(**inputs).args
    return outputs, saved
