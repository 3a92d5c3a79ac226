"""The pipeline benchmark: Q4_K vs bf16 dense vs NF4, memory modes, load time, on one device in one run.

    python bench/bench_pipeline.py                       # CUDA: full size, 1024², every format and mode
    python bench/bench_pipeline.py --device cpu          # CPU: full width, 2 blocks, 256², 64 text tokens
    python bench/bench_pipeline.py --model tiny --json out.json      # seconds (CI)
    python bench/bench_pipeline.py --model full --sections load      # GGUF open + model ready only

What it does, in order (every part on the same device, in the same process):
1. builds (or finds in --cache-dir) a synthetic model of the chosen size in each format: the two-branch Q4_K GGUF
   (bench/synthetic.py), the bf16 dense folder decoded from it (if the disk allows), NF4 quantized at load from the
   bf16 weights by bitsandbytes (when installed; on a CPU it needs >= 0.48);
2. bandwidth: Q4_K dequant kernels vs a device copy of the same output size;
3. load: GGUF open + model ready (`load_dit_branches` on the CPU, then `place_branches` on the device) after
   reading the file once, so the page cache is warm;
4. steps: sampler steps (cond with `--text-tokens` text rows + uncond) through the real `sample()` loop, per format
   and memory mode: median step time, cond / uncond forward time and one step broken down into dequant, GEMM,
   attention and the rest; the final latents of every format are compared with Q4_K's;
5. memory: peak device memory of the pipeline (text projection of fake (n, 53248) features, one step, VAE decode
   with a random FLUX.2-size decoder) per memory mode and size. CUDA: measured (max_memory_allocated). CPU:
   measured with the profiler's allocation trace at the run size, and computed (models/memory_plan.py
   `estimate_peak_bytes`) for the full-size model at --memory-sizes;
6. host RSS, targets, a table (printed last) and --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from ideogram4_gguf.models.dit import Ideogram4Config, default_compute_dtype
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.models.memory_plan import MEMORY_MODES, estimate_peak_bytes, module_stored_bytes
from ideogram4_gguf.models.residency import place_branches
from ideogram4_gguf.sampler.flow import sample
from ideogram4_gguf.sampler.presets import sampler_settings

import synthetic
from instrument import (
    CATEGORIES,
    Breakdown,
    Clock,
    cpu_transient_peak,
    cuda_peak,
    dequant_bandwidth,
    host_rss,
)

SCHEMA = "ideogram4-bench/1"
FORMATS = ("q4_k", "bf16", "nf4")
MODES = tuple(m for m in MEMORY_MODES if m != "auto")
SECTIONS = ("bandwidth", "load", "steps", "memory")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Defaults per device: (model, side in pixels, text tokens, repeats)
DEFAULTS = {"cuda": ("full", 1024, 512, 3), "cpu": ("reduced", 256, 64, 2)}
# The GPU performance targets (docs/PERF.md). GB = 1e9 bytes.
TARGETS = {
    "q4_k_vs_bf16_step": 1.05,
    "q4_k_vs_nf4_step": 1.0,
    "dequant_pct_of_copy": 70.0,
    "peak_gpu_1024_bytes": 12e9,
    "peak_stream_uncond_1024_bytes": 8e9,
    "stream_uncond_slowdown": 1.10,
    "load_ready_s": 5.0,
}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--model", choices=sorted(synthetic.PRESETS), help="default: full on CUDA, reduced on CPU")
    parser.add_argument("--layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--text-tokens", type=int)
    parser.add_argument("--memory-sizes", nargs="+", type=int, default=[1024, 2048],
                        help="square sizes of the memory section (CUDA: measured; CPU: computed, full-size model)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed steps per run (default 3 on CUDA, 2 on the CPU)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    parser.add_argument("--kernel", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--prefetch", type=int, default=1, help="units streamed ahead in the stream modes")
    parser.add_argument("--dequant-ahead", action="store_true",
                        help="also time Q4_K with the next Linear decoded on a side stream (bench/dequant_ahead.py)")
    parser.add_argument("--no-decode", action="store_true", help="leave the VAE decode out of the memory section")
    parser.add_argument("--card-gb", type=float,
                        help="memory section: simulate a card of this many GB (1e9 bytes): CUDA allocations past it "
                             "fail, and the decode plans for what such a card has left")
    parser.add_argument("--cache-dir", type=Path, default=synthetic.DEFAULT_CACHE_DIR)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def _gb(n):
    return None if n is None else n / 1e9


def _log(line):
    print(line, file=sys.stderr, flush=True)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Machine and model


def _machine(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_name"] = names[0] if names else None
    except OSError:
        info["cpu_name"] = None
    for package in ("triton", "bitsandbytes"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001  (bitsandbytes' import can fail with anything when CUDA is missing)
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_bytes"] = props.total_memory
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def _nf4_unavailable(device: torch.device) -> str | None:
    """Why NF4 cannot run here (None when it can). bitsandbytes >= 0.48 runs its 4-bit layers on the CPU too, so
    the CPU run (and CI, where it is installed) exercises the same NF4 code the GPU comparison uses."""
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001  (see _machine)
        return f"NF4: bitsandbytes is not usable ({type(exc).__name__}: {exc})"
    version = tuple(int(p) for p in bitsandbytes.__version__.split(".")[:2] if p.isdigit())
    if device.type != "cuda" and version < (0, 48):
        return f"NF4 on the CPU needs bitsandbytes >= 0.48 (found {bitsandbytes.__version__})"
    return None


def _vae(preset: str, device, dtype):
    from ideogram4_gguf.models.vae import Flux2VAEConfig, Flux2VAEDecoder

    config = Flux2VAEConfig() if preset != "tiny" else Flux2VAEConfig(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    vae = Flux2VAEDecoder(config).to(device=device, dtype=dtype).eval()  # default init: random, FLUX.2 sized
    torch.random.set_rng_state(generator_state)
    return vae


# ---------------------------------------------------------------------------------------------------------------
# Steps


def _features(config: Ideogram4Config, text_tokens: int, device, seed: int) -> torch.Tensor:
    """Stand-in for the text encoder's output: (n, llm_features_dim) float32, the scale of LLM hidden states."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(text_tokens, config.llm_features_dim, generator=generator).to(device)


def measure_steps(cond, uncond, device, width, height, features, warmup, repeats, seed=0) -> dict:
    """Median sampler step time over `repeats` steps after `warmup`, then one instrumented step."""
    clock = Clock(device)
    projected = cond.project_text(features)
    inst = Breakdown(clock)
    marks, forward_marks = [], {"cond": [], "uncond": []}
    total_steps = warmup + repeats + 1

    def callback(step, total, x0):
        marks.append(clock.mark())
        inst.active = step == warmup + repeats  # the step after the timed ones is the instrumented one

    handles = []
    for role, branch in (("cond", cond), ("uncond", uncond)):
        def pre(module, args, role=role):
            if inst.active:
                forward_marks[role].append(clock.mark())

        def post(module, args, output, role=role):
            if inst.active:
                forward_marks[role].append(clock.mark())

        handles += [branch.register_forward_pre_hook(pre), branch.register_forward_hook(post)]
    settings = sampler_settings("default", steps=total_steps, polish_steps=0)
    try:
        with inst:
            start = clock.mark()
            latents = sample(cond, uncond, projected, width, height, seed=seed, settings=settings, callback=callback)
            clock.sync()
    finally:
        for handle in handles:
            handle.remove()
    bounds = [start, *marks]
    steps = [clock.seconds(a, b) for a, b in itertools.pairwise(bounds)]
    timed = steps[warmup : warmup + repeats]
    parts = inst.seconds()
    instrumented = steps[-1]
    breakdown = {f"{c}_s": parts[c] for c in CATEGORIES}
    breakdown["rest_s"] = instrumented - sum(parts.values())
    breakdown["total_s"] = instrumented
    breakdown["calls"] = inst.counts()
    forwards = {role: clock.seconds(m[0], m[1]) if len(m) == 2 else None for role, m in forward_marks.items()}
    return {
        "step_s": statistics.median(timed),
        "step_times_s": timed,
        "cond_forward_s": forwards["cond"],
        "uncond_forward_s": forwards["uncond"],
        "breakdown": breakdown,
        "latents": latents.float().cpu(),
    }


def _load_branches(fmt, files, dtype, kernel, device):
    if fmt == "q4_k":
        cond, uncond, _ = load_dit_branches(files["q4_k"]["path"], compute_dtype=dtype, device="cpu", kernel=kernel)
    else:
        cond, uncond, _ = load_dit_branches(files["bf16"]["path"], compute_dtype=dtype, device="cpu")
        if fmt == "nf4":
            from nf4 import to_nf4

            cond, uncond = to_nf4(cond, device, dtype), to_nf4(uncond, device, dtype)
    return cond, uncond


def _dense_fits(fmt, config, dtype, device) -> str | None:
    """Why the bf16 / nf4 run cannot fit here (None when it can)."""
    params = synthetic.parameter_count(config, True) + synthetic.parameter_count(config, False)
    element = torch.empty(0, dtype=dtype).element_size()
    host_needed = params * max(element, 2)  # loaded on the CPU first (bf16 file; fp32 compute expands it)
    available = _mem_available()
    if available is not None and host_needed > 0.85 * available:
        return (f"{fmt}: loading the dense branches needs ~{host_needed / 1e9:.1f} GB of host memory, "
                f"{available / 1e9:.1f} GB available")
    if device.type == "cuda" and fmt == "bf16":
        free = torch.cuda.mem_get_info(device)[0]
        if params * element > 0.9 * free:
            return f"bf16: both dense branches need {params * element / 1e9:.1f} GB of device memory, {free / 1e9:.1f} free"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Load


def _warm_page_cache(paths) -> float:
    started = time.perf_counter()
    buffer = bytearray(64 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started


def measure_load(gguf_path, device, dtype, kernel, modes) -> dict:
    """Open + ready time per memory mode (the first one is the headline), after one read to warm the page cache."""
    size = os.path.getsize(gguf_path)
    available = _mem_available()
    warm = available is None or size < 0.8 * available
    result = {"file_bytes": size, "warm_page_cache": warm,
              "warm_read_s": _warm_page_cache([gguf_path]) if warm else None, "modes": {}}
    clock = Clock(device)
    for mode in modes:
        started = time.perf_counter()
        cond, uncond, info = load_dit_branches(gguf_path, compute_dtype=dtype, device="cpu", kernel=kernel)
        opened = time.perf_counter()
        placement = place_branches(cond, uncond, device, mode)
        clock.sync()
        ready = time.perf_counter()
        result["modes"][mode] = {"open_s": opened - started, "ready_s": ready - started,
                                 "placement": placement.summary()}
        result.setdefault("summary", info.summary())
        placement.release()
        del cond, uncond, placement
        gc.collect()
    first = result["modes"][modes[0]]
    result.update(mode=modes[0], open_s=first["open_s"], ready_s=first["ready_s"])
    return result


# ---------------------------------------------------------------------------------------------------------------
# Memory


def _pipeline_once(cond, uncond, features, side, vae, seed, card_bytes=None, in_use=None) -> dict:
    """Text projection, one sampler step and (with a VAE) the decode. With `card_bytes` the decode plans for a card
    of that size, as the nodes do from ComfyUI's free-memory figure: the card minus what `in_use()` says is taken.
    Returns the decode plan used (empty without a VAE)."""
    from ideogram4_gguf.models.vae_tiling import decode_latents, plan_decode

    projected = cond.project_text(features)
    latents = sample(cond, uncond, projected, side, side, seed=seed,
                     settings=sampler_settings("default", steps=1, polish_steps=0))
    if vae is None:
        return {}
    free = None if card_bytes is None else max(int(0.9 * (card_bytes - in_use())), 0)
    plan = plan_decode(vae, side, side, "auto", free)
    decode_latents(latents, vae, grid=(side // 16, side // 16), free_memory_bytes=free)
    return {"decode_tiled": plan.tiled, "decode_tile_px": plan.tile_px, "decode_band_bytes": plan.band_bytes,
            "decode_free_bytes": plan.free_memory_bytes, "decode_estimated_peak_bytes": plan.estimated_peak_bytes}


def measure_memory_cuda(cond, uncond, device, modes, sizes, text_tokens, vae, prefetch, seed,
                        card_bytes=None) -> list[dict]:
    """Peak device memory of the whole pipeline per mode and size. With `card_bytes`, a card of that size is
    simulated: the caching allocator is capped there (an allocation past it fails as on that card, recorded as
    `out_of_memory`) and the decode plans for the memory such a card would have left."""
    total = torch.cuda.get_device_properties(device).total_memory
    if card_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(min(card_bytes / total, 1.0), device)
    try:
        rows = []
        for mode in modes:
            for side in sizes:
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(_memory_row_cuda(cond, uncond, device, mode, side, text_tokens, vae, prefetch, seed,
                                             card_bytes))
        return rows
    finally:
        if card_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def _memory_row_cuda(cond, uncond, device, mode, side, text_tokens, vae, prefetch, seed, card_bytes) -> dict:
    row = {"mode": mode, "side": side, "measured": True, "with_decode": vae is not None, "card_bytes": card_bytes,
           "out_of_memory": False}
    placement = None
    try:
        with cuda_peak(device) as record:  # the VAE weights count: it moves in inside the measured block
            placement = place_branches(cond, uncond, device, mode, prefetch=prefetch)
            if vae is not None:
                vae.to(device)
            features = _features(cond.config, text_tokens, device, seed)
            started = time.perf_counter()
            row.update(_pipeline_once(cond, uncond, features, side, vae, seed, card_bytes,
                                      lambda: torch.cuda.memory_allocated(device)))
            del features
        torch.cuda.synchronize(device)
        row.update(pipeline_s=time.perf_counter() - started, peak_bytes=record["peak_bytes"],
                   peak_reserved_bytes=record["peak_reserved_bytes"])
    except torch.cuda.OutOfMemoryError as exc:
        row.update(out_of_memory=str(exc).splitlines()[0], peak_bytes=None, peak_reserved_bytes=None)
        card = f"the simulated {card_bytes / 1e9:g} GB card" if card_bytes else str(device)
        _log(f"memory {mode} {side}: out of memory on {card}")
    finally:
        row["weights_on_device_bytes"] = placement.device_bytes if placement else None
        if placement is not None:
            placement.release()
        if vae is not None:
            vae.to("cpu")
    return row


def measure_memory_cpu(cond, uncond, modes, side, text_tokens, vae, prefetch, seed, card_bytes=None) -> list[dict]:
    """The CPU counterpart: resident weights + the allocator's transient peak. `card_bytes` only steers the decode
    plan (nothing caps the CPU allocator)."""
    rows = []
    config = cond.config
    for mode in modes:
        placement = place_branches(cond, uncond, "cpu", mode, prefetch=prefetch)
        features = _features(config, text_tokens, "cpu", seed)
        # on the CPU "in use" is what the card would hold: the resident weights (the trace adds the transients)
        plan, transient = cpu_transient_peak(lambda f=features: _pipeline_once(
            cond, uncond, f, side, vae, seed, card_bytes, lambda: placement.device_bytes))
        rows.append({"mode": mode, "side": side, "measured": True, "weights_on_device_bytes": placement.device_bytes,
                     "transient_peak_bytes": transient, "with_decode": vae is not None, "card_bytes": card_bytes,
                     "peak_bytes": None if transient is None else placement.device_bytes + transient, **plan})
        placement.release()
    return rows


def computed_memory(config, cond_bytes, uncond_bytes, modes, sizes, text_tokens, dtype, vae_config, prefetch):
    from ideogram4_gguf.models.vae_tiling import estimate_decode_peak

    rows = []
    for mode in modes:
        for side in sizes:
            vae_weights = vae_decode = 0
            if vae_config is not None:
                vae_weights = _vae_weight_bytes(vae_config, dtype)
                vae_decode = estimate_decode_peak(vae_config, side, side, dtype=dtype).bytes
            estimate = estimate_peak_bytes(mode, config, cond_bytes, uncond_bytes, side, side, text_tokens,
                                           compute_dtype=dtype, prefetch=prefetch, vae_bytes=vae_weights,
                                           vae_decode_bytes=vae_decode)
            rows.append({"mode": mode, "side": side, "measured": False, "peak_bytes": estimate.total,
                         "phases_bytes": estimate.phases, "text_tokens": text_tokens,
                         "compute_dtype": str(dtype).replace("torch.", ""), "describe": estimate.describe()})
    return rows


def _vae_weight_bytes(vae_config, dtype) -> int:
    from ideogram4_gguf.models.vae import Flux2VAEDecoder

    with torch.device("meta"):
        vae = Flux2VAEDecoder(vae_config)
    return sum(p.numel() for p in vae.parameters()) * torch.empty(0, dtype=dtype).element_size()


def full_size_stored_bytes(recipe="q4_k") -> tuple[int, int]:
    """Stored bytes of the full-size branches as the loader holds them (uncond without llm_cond_*), computed from
    quant_tools' plan of the recipe."""
    from ideogram4_gguf.quant_tools.build import plan
    from ideogram4_gguf.quant_tools.recipe import Recipe
    from ideogram4_gguf.quant_tools.sources import BranchSource

    totals = {}
    for role, with_text in (("conditional", True), ("unconditional", False)):
        branch = BranchSource(role, Path("computed"), "computed", [], {
            n: synthetic._SyntheticTensor(n, s) for n, s in synthetic.tensor_shapes(Ideogram4Config(), with_text).items()
        }, config=Ideogram4Config())
        totals[role] = sum(t.nbytes for t in plan([branch], Recipe.load(recipe)))
    return totals["conditional"], totals["unconditional"]


# ---------------------------------------------------------------------------------------------------------------
# Main


def run(argv=None) -> dict:
    args = _parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model_default, side_default, tokens_default, repeats_default = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    preset = args.model or model_default
    config = synthetic.PRESETS[preset]
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
        preset = f"{preset}-{args.layers}l"
    width, height = args.width or side_default, args.height or side_default
    text_tokens = args.text_tokens or tokens_default
    repeats = args.repeats or repeats_default
    dtype = default_compute_dtype(device) if args.dtype == "auto" else DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall = time.perf_counter()

    report = {
        "schema": SCHEMA,
        "command": "python bench/bench_pipeline.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _machine(device),
        "options": {"model": preset, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in config.__dict__.items()},
                    "width": width, "height": height, "text_tokens": text_tokens, "warmup": args.warmup,
                    "repeats": repeats, "compute_dtype": str(dtype).replace("torch.", ""), "kernel": args.kernel,
                    "prefetch": args.prefetch, "formats": args.formats, "modes": args.modes,
                    "sections": args.sections, "memory_sizes": args.memory_sizes},
        "model": {"parameters_per_branch": {"cond": synthetic.parameter_count(config, True),
                                            "uncond": synthetic.parameter_count(config, False)}},
        "files": {}, "skipped": [], "bandwidth": None, "load": None, "steps": {}, "comparisons": {},
        "memory": {"measured": [], "computed": []},
    }
    skip = lambda why: (report["skipped"].append(why), _log(f"skip: {why}"))

    # 1. files
    report["files"]["q4_k"] = synthetic.q4_k_gguf(config, args.cache_dir, seed=args.seed, preset=preset, log=_log)
    formats = list(args.formats)
    if "nf4" in formats and (why := _nf4_unavailable(device)):
        skip(why)
        formats.remove("nf4")
    if any(f in formats for f in ("bf16", "nf4")) and "steps" in args.sections:
        built = synthetic.bf16_folder(report["files"]["q4_k"]["path"], config, args.cache_dir, log=_log)
        if "skipped" in built:
            skip(built["skipped"])
            formats = [f for f in formats if f == "q4_k"]
        else:
            report["files"]["bf16"] = built

    # 2. bandwidth
    if "bandwidth" in args.sections:
        # a full-size MLP weight (12288 x 4608); CI's tiny model a slice of it
        rows = 12288 if not preset.startswith("tiny") else 1536
        report["bandwidth"] = dequant_bandwidth(device, dtype, rows, 4608)

    # 3. load
    if "load" in args.sections:
        # on the CPU every mode is "ready" at once (nothing moves); on a GPU each placement is timed
        modes = args.modes if device.type == "cuda" else args.modes[:1]
        report["load"] = measure_load(report["files"]["q4_k"]["path"], device, dtype, args.kernel, modes)

    # 4. steps
    if "steps" in args.sections:
        features = _features(config, text_tokens, device, args.seed)
        for fmt in formats:
            if fmt != "q4_k" and (why := _dense_fits(fmt, config, dtype, device)):
                skip(why)
                continue
            _log(f"steps: {fmt}")
            cond, uncond = _load_branches(fmt, report["files"], dtype, args.kernel, device)
            report["steps"][fmt] = {}
            for mode in (args.modes if fmt == "q4_k" else ["gpu"]):
                # NF4 layers are already on the device (bitsandbytes quantizes on the move); everything else is
                # placed by the memory mode under test
                placement = place_branches(cond, uncond, device, mode, prefetch=args.prefetch)
                result = measure_steps(cond, uncond, device, width, height, features, args.warmup, repeats,
                                       args.seed)
                result["placement"] = placement.summary()
                streamed = {r: p.stats.bytes_copied for r, p in placement.placements.items() if p.stats}
                if streamed:
                    result["streamed_bytes"] = streamed
                report["steps"][fmt][mode] = result
                _log(f"  {fmt} {mode}: {result['step_s']:.3f} s/step")
                if fmt == "q4_k" and mode == "gpu" and args.dequant_ahead:
                    from dequant_ahead import DequantAhead

                    # the side stream at normal and at high priority: a GEMM fills every SM, and a high-priority
                    # decode gets the SMs its waves free first (on the CPU both rows run the same code)
                    for label, priority in (("gpu+ahead", 0), ("gpu+ahead-hi", -1)):
                        ahead = DequantAhead((cond, uncond), device, priority=priority)
                        result = measure_steps(cond, uncond, device, width, height, features, args.warmup,
                                               repeats, args.seed)
                        result["decoded_ahead"] = ahead.ahead_hits
                        ahead.close()
                        report["steps"][fmt][label] = result
                        _log(f"  {fmt} {label}: {result['step_s']:.3f} s/step")
                placement.release()
            del cond, uncond
            gc.collect()
        _compare(report)

    # 5. memory
    if "memory" in args.sections:
        _memory(report, args, device, dtype, preset, config, width, text_tokens)

    report["host"] = host_rss()
    report["targets"] = _targets(report, device)
    report["wall_s"] = time.perf_counter() - wall
    report["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for runs in report["steps"].values():
        for result in runs.values():
            result.pop("latents", None)
    return report


def _compare(report):
    steps = report["steps"]
    reference = steps.get("q4_k", {}).get("gpu")
    comparisons = report["comparisons"]
    for fmt, runs in steps.items():
        for mode, result in runs.items():
            if reference is not None and (fmt, mode) != ("q4_k", "gpu"):
                a, b = result["latents"], reference["latents"]
                comparisons[f"{fmt}/{mode}_vs_q4_k/gpu_latent_rel_diff"] = float((a - b).norm() / b.norm())
    if reference is not None:
        for fmt in ("bf16", "nf4"):
            if "gpu" in steps.get(fmt, {}):
                comparisons[f"q4_k_vs_{fmt}_step"] = reference["step_s"] / steps[fmt]["gpu"]["step_s"]
        if "stream_uncond" in steps["q4_k"]:
            comparisons["stream_uncond_slowdown"] = steps["q4_k"]["stream_uncond"]["step_s"] / reference["step_s"]
        if "cpu_offload" in steps["q4_k"]:
            comparisons["cpu_offload_slowdown"] = steps["q4_k"]["cpu_offload"]["step_s"] / reference["step_s"]


def _memory(report, args, device, dtype, preset, config, width, text_tokens):
    from ideogram4_gguf.models.vae import Flux2VAEConfig

    vae = None if args.no_decode else _vae(preset, "cpu" if device.type == "cuda" else device, dtype)
    card_bytes = None if args.card_gb is None else int(args.card_gb * 1e9)
    cond, uncond = _load_branches("q4_k", report["files"], dtype, args.kernel, device)
    cond_bytes, uncond_bytes = module_stored_bytes(cond), module_stored_bytes(uncond)
    report["model"]["stored_bytes"] = {"cond": cond_bytes, "uncond": uncond_bytes}
    if device.type == "cuda":
        report["memory"]["measured"] = measure_memory_cuda(cond, uncond, device, args.modes, args.memory_sizes,
                                                           text_tokens, vae, args.prefetch, args.seed, card_bytes)
        computed_sizes, computed_config, computed_bytes = args.memory_sizes, config, (cond_bytes, uncond_bytes)
    else:
        report["memory"]["measured"] = measure_memory_cpu(cond, uncond, args.modes, width, text_tokens, vae,
                                                          args.prefetch, args.seed, card_bytes)
        # the same estimate for the run itself, to set the measurement beside it
        for row in computed_memory(config, cond_bytes, uncond_bytes, args.modes, [width], text_tokens, dtype,
                                   vae.config if vae is not None else None, args.prefetch):
            row["for"] = "this run"
            report["memory"]["computed"].append(row)
        computed_sizes, computed_config = args.memory_sizes, Ideogram4Config()
        computed_bytes = full_size_stored_bytes()
        dtype = torch.bfloat16  # the GPU plan
    for row in computed_memory(computed_config, *computed_bytes, args.modes, computed_sizes, 512, dtype,
                               None if args.no_decode else Flux2VAEConfig(), args.prefetch):
        row["for"] = "full-size model on a GPU" if device.type != "cuda" else "this run"
        report["memory"]["computed"].append(row)
    del cond, uncond, vae
    gc.collect()


def _targets(report, device) -> list[dict]:
    on_gpu = device.type == "cuda"
    rows = []

    def add(name, value, limit, lower_is_better=True, unit=""):
        if value is None:
            status = "not run"
        elif not on_gpu:
            status = "unmeasured (no GPU; CPU figure shown)"
        else:
            status = "met" if (value <= limit if lower_is_better else value >= limit) else "missed"
        rows.append({"target": name, "value": value, "limit": limit, "unit": unit, "status": status})

    comparisons = report["comparisons"]
    add("Q4_K step / bf16 dense step", comparisons.get("q4_k_vs_bf16_step"), TARGETS["q4_k_vs_bf16_step"])
    add("Q4_K step / NF4 step", comparisons.get("q4_k_vs_nf4_step"), TARGETS["q4_k_vs_nf4_step"])
    kernels = (report["bandwidth"] or {}).get("kernels", {})
    best = max((k["pct_of_copy"] for k in kernels.values()), default=None)
    add("dequant kernel % of copy bandwidth", best, TARGETS["dequant_pct_of_copy"], lower_is_better=False, unit="%")
    measured = {(r["mode"], r["side"]): r for r in report["memory"]["measured"]}
    if on_gpu:
        for mode, name, limit in (("gpu", "both branches resident", TARGETS["peak_gpu_1024_bytes"]),
                                  ("stream_uncond", "uncond streamed", TARGETS["peak_stream_uncond_1024_bytes"])):
            row = measured.get((mode, 1024), {})
            card = f" (simulated {row['card_bytes'] / 1e9:g} GB card)" if row.get("card_bytes") else ""
            add(f"peak VRAM 1024², {name}{card}", row.get("peak_bytes"), limit, unit="bytes")
            if row.get("out_of_memory"):
                rows[-1]["status"] = "missed: out of memory" + card
    else:
        rows.append({"target": "peak VRAM 1024² (gpu <= 12 GB, stream_uncond <= 8 GB)", "value": None,
                     "limit": None, "unit": "bytes", "status": "unmeasured (no GPU); see memory.computed"})
    add("stream_uncond step / gpu step", comparisons.get("stream_uncond_slowdown"), TARGETS["stream_uncond_slowdown"])
    load = report["load"] or {}
    add("GGUF open + model ready (warm cache)", load.get("ready_s"), TARGETS["load_ready_s"], unit="s")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Table


def table(report) -> str:
    opts, machine = report["options"], report["machine"]
    lines = [
        (f"Ideogram 4 benchmark: {machine['device']} ({machine.get('device_name') or ''}; "
         f"{machine.get('cpu_name') or ''}, {machine['torch_threads']} threads), torch {machine['torch']}"),
        (f"model {opts['model']} ({opts['config']['num_layers']} blocks, hidden {opts['config']['hidden_size']}, "
         f"{report['model']['parameters_per_branch']['cond'] / 1e9:.2f} B params/branch), {opts['width']}x"
         f"{opts['height']}, {opts['text_tokens']} text tokens, compute {opts['compute_dtype']}"),
    ]
    if report["steps"]:
        lines.append("")
        lines.append(f"{'format':<6} {'mode':<14} {'step s':>8} {'cond s':>8} {'uncond s':>8} {'dequant':>8} "
                     f"{'gemm':>8} {'attn':>8} {'rest':>8}")
        for fmt, runs in report["steps"].items():
            for mode, r in runs.items():
                b = r["breakdown"]
                cells = [r["step_s"], r["cond_forward_s"], r["uncond_forward_s"], b["dequant_s"], b["gemm_s"],
                         b["attention_s"], b["rest_s"]]
                lines.append(f"{fmt:<6} {mode:<14} " + " ".join(f"{c:8.3f}" if c is not None else f"{'-':>8}"
                                                                for c in cells))
        lines.append("(breakdown columns: one instrumented step; rest = step - dequant - gemm - attention)")
        for key, value in report["comparisons"].items():
            lines.append(f"  {key}: {value:.4g}")
    bw = report["bandwidth"]
    if bw:
        lines.append("")
        lines.append(f"bandwidth ({bw['weights'] / 1e6:.1f} M Q4_K weights -> {bw['out_dtype']}): device copy "
                     f"{bw['copy_GBps']:.1f} GB/s; " + "; ".join(
                         f"{k} dequant {v['GBps']:.1f} GB/s = {v['pct_of_copy']:.0f} % of copy "
                         f"({v['Mweights_per_s']:.0f} M weights/s)" for k, v in bw["kernels"].items()))
        if bw.get("triton_launches"):
            best = bw["triton_best_launch"]
            default = best["default"]
            lines.append(f"  Triton sweep ({len(bw['triton_launches'])} kernel x launch shapes): best {best['variant']} "
                         f"kernel, {best['blocks_per_program']} blocks x {best['num_warps']} warps, "
                         f"{best['pct_of_copy']:.0f} % of copy; shipped: {default[0]}, {default[1]} x {default[2]}")
    load = report["load"]
    if load:
        ready = ", ".join(f"{mode} {r['ready_s']:.2f} s" for mode, r in load["modes"].items())
        lines.append(f"load: {load['file_bytes'] / 1e9:.2f} GB GGUF, open {load['open_s']:.2f} s, ready: {ready}; "
                     f"page cache {'warm' if load['warm_page_cache'] else 'NOT warmed (file larger than free memory)'}")
    memory = report["memory"]
    if memory["measured"] or memory["computed"]:
        lines.append("")
        lines.append(f"{'memory':<9} {'mode':<14} {'side':>5} {'peak GB':>8}  {'what'}")
        for r in memory["measured"]:
            what = "measured" + (", + VAE decode" if r["with_decode"] else "")
            if "transient_peak_bytes" in r:
                what += " (CPU: resident weights + allocation trace)"
            lines.append(f"{'':<9} {r['mode']:<14} {r['side']:>5} {_fmt_gb(r['peak_bytes']):>8}  {what}")
        for r in memory["computed"]:
            lines.append(f"{'':<9} {r['mode']:<14} {r['side']:>5} {_fmt_gb(r['peak_bytes']):>8}  computed, "
                         f"{r['for']}")
    host = report.get("host", {})
    lines.append(f"host RSS peak {_fmt_gb(host.get('peak_rss_bytes'))} GB")
    if report["skipped"]:
        lines.append("skipped: " + "; ".join(report["skipped"]))
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        value = t["value"]
        shown = "-" if value is None else (f"{value / 1e9:.2f} GB" if t["unit"] == "bytes" else f"{value:.3g}{t['unit']}")
        limit = "" if t["limit"] is None else (f" (limit {t['limit'] / 1e9:.0f} GB)" if t["unit"] == "bytes"
                                               else f" (limit {t['limit']:g}{t['unit']})")
        lines.append(f"  {t['target']}: {shown}{limit} -> {t['status']}")
    return "\n".join(lines)


def _fmt_gb(n):
    return "-" if n is None else f"{n / 1e9:.3f}"


def main(argv=None) -> dict:
    report = run(argv)
    args = _parse(argv)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=_json_default))
    print(table(report))
    return report


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
