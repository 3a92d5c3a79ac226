"""The LoRA benchmark: what a LoRA costs per sampler step, side by side in one run on one model.

    python bench/bench_lora.py                     # CPU: full width, 2 blocks (the "reduced" model), 256², rank 32
    python bench/bench_lora.py --model tiny        # seconds (CI)

Three rows on the same Q4_K model, the same inputs and the same sampler loop (bench/bench_pipeline.py `measure_steps`):
- `none`: no LoRA;
- `side`: one rank-r LoRA on every Linear of both branches, run beside the packed weights as the pack does
  (models/lora.py: y = W x + s B (A x), nothing merged);
- `merge`: the same LoRA merged into the dequantized weight in every forward (W + s B A, then one GEMM): what a
  loader that patches the decoded weight each step (ComfyUI-GGUF's way) costs.
The side and merge rows must give the same latents (checked, float tolerance). Target: side <= 1.10 x none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from ideogram4_gguf.models.dit import default_compute_dtype
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.models.lora import LoraFile, LoraTerm, bind, install

import synthetic
from bench_pipeline import _features, _machine, measure_steps

DEFAULTS = {"cpu": ("reduced", 256, 64, 2), "cuda": ("full", 1024, 512, 5)}


def random_lora(branch: torch.nn.Module, rank: int, seed: int) -> LoraFile:
    """A rank-r LoRA on every Linear of `branch` (a random, realistic-scale update; the shape is what costs)."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for name, module in branch.named_modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features") and name:
            down = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
            up = torch.randn(module.out_features, rank, generator=g) * 1e-3
            terms.append(LoraTerm(name, None, down, up, 1.0, name))
    return LoraFile("random", "bench", "cond", "bench", terms)


class _MergedEachForward:
    """Patch each LoRA'd packed Linear so its forward decodes W, adds s B A, and multiplies: the per-step merge
    (the few plain Linears, e.g. the F16 input projection, keep the side path)."""

    def __init__(self, terms):
        self.patched = []
        self.side = install([t for t in terms if not hasattr(t.module, "dense_weight")])
        for term in terms:
            module = term.module
            if not hasattr(module, "dense_weight"):
                continue
            original = module.dense_weight

            def merged(dtype, original=original, term=term):
                weight = original(dtype)
                delta = (term.up.to(weight.device, torch.float32) @ term.down.to(weight.device, torch.float32))
                return (weight.float() + term.scale * delta).to(dtype)

            module.dense_weight = merged
            self.patched.append(module)

    def remove(self):
        for module in self.patched:
            del module.dense_weight  # the class method again
        self.side.remove()


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", choices=sorted(synthetic.PRESETS))
    parser.add_argument("--side", type=int, help="image side in pixels")
    parser.add_argument("--text-tokens", type=int)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache-dir", default=synthetic.DEFAULT_CACHE_DIR)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset_default, side_default, tokens_default, repeats_default = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    preset = args.model or preset_default
    side, text_tokens = args.side or side_default, args.text_tokens or tokens_default
    repeats = args.repeats or repeats_default
    if args.threads:
        torch.set_num_threads(args.threads)
    config = synthetic.PRESETS[preset]
    dtype = default_compute_dtype(device)
    gguf = synthetic.q4_k_gguf(config, args.cache_dir, preset=preset, log=lambda line: print(line, file=sys.stderr))
    cond, uncond, _ = load_dit_branches(gguf["path"], compute_dtype=dtype)
    cond, uncond = cond.to(device), uncond.to(device)
    features = _features(config, text_tokens, device, seed=0)
    loras = {"cond": random_lora(cond, args.rank, 1), "uncond": random_lora(uncond, args.rank, 2)}
    terms = {role: bind(loras[role], branch, 1.0)[0] for role, branch in (("cond", cond), ("uncond", uncond))}
    lora_params = sum(t.down.numel() + t.up.numel() for ts in terms.values() for t in ts)

    rows = {}
    for row in ("none", "side", "merge"):
        handles = None
        if row == "side":
            handles = install(terms["cond"] + terms["uncond"])
        elif row == "merge":
            handles = _MergedEachForward(terms["cond"] + terms["uncond"])
        try:
            started = time.perf_counter()
            result = measure_steps(cond, uncond, device, side, side, features, args.warmup, repeats)
            result["wall_s"] = time.perf_counter() - started
        finally:
            if handles is not None:
                handles.remove()
        rows[row] = result
        print(f"{row:>5}: {result['step_s']:.3f} s/step", file=sys.stderr)

    side_latents, merge_latents = rows["side"].pop("latents", None), rows["merge"].pop("latents", None)
    rows["none"].pop("latents", None)
    report = {
        "command": "python bench/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _machine(device),
        "options": {"model": preset, "side": side, "text_tokens": text_tokens, "rank": args.rank,
                    "repeats": repeats, "warmup": args.warmup, "dtype": str(dtype).replace("torch.", "")},
        "lora_parameters": lora_params,
        "rows": {name: {"step_s": r["step_s"], "step_times_s": r["step_times_s"]} for name, r in rows.items()},
        "side_over_none": rows["side"]["step_s"] / rows["none"]["step_s"],
        "merge_over_none": rows["merge"]["step_s"] / rows["none"]["step_s"],
    }
    if side_latents is not None and merge_latents is not None:
        report["side_vs_merge_max_abs"] = float((side_latents - merge_latents).abs().max())
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> dict:
    return run(argv)


if __name__ == "__main__":
    main()
