"""Core's Load LoRA on our core MODELs with the LoRA formats core does not read by itself (Comfy-Org/ComfyUI#14477):
OneTrainer / diffusers split names (`transformer.` prefix, to_q / to_k / to_v / to_out.0) and kohya flattened names.

Reference: the same update written in the fused official names core reads natively (a split q/k/v LoRA is the fused
qkv LoRA of rank 3r with stacked down factors and block-diagonal up factors), through the same core loader.
"""

from __future__ import annotations

import torch
from ideogram4_gguf.models.dit_loader import load_dit_branches
from safetensors.torch import load_file, save_file

from .harness import run_ok

RANK = 4


def split_and_fused(branch, seed=9):
    """(OneTrainer-style split LoRA, the equivalent fused-name LoRA) on every attention and MLP Linear."""
    g = torch.Generator().manual_seed(seed)
    split, fused = {}, {}
    for layer_index, layer in enumerate(branch.layers):
        p = f"layers.{layer_index}."
        hidden = layer.attention.qkv.in_features
        downs, ups = [], []
        for part in ("to_q", "to_k", "to_v"):
            down = torch.randn(RANK, hidden, generator=g) / hidden ** 0.5
            up = torch.randn(hidden, RANK, generator=g) * 0.5
            alpha = float(torch.randint(1, 9, (1,), generator=g))
            split.update({f"transformer.{p}attention.{part}.lora_down.weight": down,
                          f"transformer.{p}attention.{part}.lora_up.weight": up,
                          f"transformer.{p}attention.{part}.alpha": torch.tensor(alpha)})
            downs.append(down)
            ups.append(up * (alpha / RANK))
        fused[f"diffusion_model.{p}attention.qkv.lora_down.weight"] = torch.cat(downs)
        fused[f"diffusion_model.{p}attention.qkv.lora_up.weight"] = torch.block_diag(*ups)
        fused[f"diffusion_model.{p}attention.qkv.alpha"] = torch.tensor(float(3 * RANK))  # scale 1
        for ours, theirs in (("attention.o", "attention.to_out.0"), ("feed_forward.w2", "feed_forward.w2")):
            module = layer.get_submodule(ours)
            down = torch.randn(RANK, module.in_features, generator=g) / module.in_features ** 0.5
            up = torch.randn(module.out_features, RANK, generator=g) * 0.5
            split.update({f"lora_transformer_{p.replace('.', '_')}{theirs.replace('.', '_')}.lora_down.weight": down,
                          f"lora_transformer_{p.replace('.', '_')}{theirs.replace('.', '_')}.lora_up.weight": up,
                          f"lora_transformer_{p.replace('.', '_')}{theirs.replace('.', '_')}.alpha":
                              torch.tensor(float(RANK))})
            fused.update({f"diffusion_model.{p}{ours}.lora_down.weight": down,
                          f"diffusion_model.{p}{ours}.lora_up.weight": up,
                          f"diffusion_model.{p}{ours}.alpha": torch.tensor(float(RANK))})
    return split, fused


def test_core_load_lora_reads_split_and_flattened_ideogram4_loras(comfy, demo_models, tmp_path):
    cond, _, _ = load_dit_branches(demo_models.dit)
    split, fused = split_and_fused(cond)
    folder = comfy.base_dir / "models" / "loras"
    names = {"split": "ideogram4-test-split-lora.safetensors", "fused": "ideogram4-test-fused-lora.safetensors"}
    for kind, tensors in (("split", split), ("fused", fused)):
        save_file(tensors, str(tmp_path / names[kind]))
        (folder / names[kind]).symlink_to(tmp_path / names[kind])
    load = {"class_type": "IG4CoreModelLoader", "inputs": {"dit_name": demo_models.dit.name, "uncond_name": "(none)",
                                                          "compute_dtype": "fp32"}}
    graph = {"load": load}
    for kind in ("split", "fused"):
        graph[f"lora_{kind}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["load", 0], "lora_name": names[kind], "strength_model": 0.9}}
    for label, source in (("core_lora_base", ["load", 0]), ("core_lora_split", ["lora_split", 0]),
                          ("core_lora_fused", ["lora_fused", 0])):
        graph[label] = {"class_type": "IG4TestModelForward", "inputs": {"model": source, "label": label, "seed": 5,
                                                                        "text_tokens": 3, "grid": 2}}
    try:
        run_ok(comfy, graph)
    finally:
        for name in names.values():
            (folder / name).unlink()
    out = {k: load_file(comfy.base_dir / "output" / f"core_lora_{k}.safetensors")["tensor"]
           for k in ("base", "split", "fused")}
    assert ((out["fused"] - out["base"]).norm() / out["base"].norm()) > 1e-3
    error = ((out["split"] - out["fused"]).norm() / out["fused"].norm()).item()
    print(f"split-name LoRA vs its fused equivalent through core's Load LoRA: relative difference {error:.1e}")
    assert error < 1e-5
    assert "lora key not loaded" not in comfy.log()
