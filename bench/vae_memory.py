"""Peak memory of the FLUX.2 VAE decode on the CPU, measured vs the pack's own estimate.

Usage: python bench/vae_memory.py [--width-divisor 4] [--sizes 1024 2048] [--dtype float32] [--threads 2]

Each case runs in a fresh subprocess: random weights of the full FLUX.2 decoder architecture with every channel
width divided by --width-divisor (GroupNorm keeps 32 groups), one small warm-up decode, then the measured decode.
Measured = peak resident memory during the decode (Linux VmHWM, reset through /proc/self/clear_refs just before)
minus the resident memory just before it, so weights and the input are excluded, as in the estimate. The
subprocesses run with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed tensors to the OS at once (otherwise
its arenas keep freed memory resident and the peak reads high). oneDNN's own layout copies and scratch are
included in the measurement, and in the CPU estimate as one input-sized copy per conv (device="cpu"); the
`computed full size` column is the CUDA estimate (no such copy). The estimate
is `estimate_decode_peak` for the same reduced config; activation bytes scale with the channel widths, so the
full-size figures are the `computed full size` column (the estimate for the real config).
"""

import argparse
import json
import os
import subprocess
import sys


def _status_kib(field):
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(case):
    """In the subprocess: build, warm up, decode once, print a JSON line."""
    import time

    import torch
    from ideogram4_gguf.models import vae as V
    from ideogram4_gguf.models import vae_tiling as T

    torch.set_num_threads(case["threads"])
    dtype = getattr(torch, case["dtype"])
    widths = tuple(c // case["divisor"] for c in (128, 256, 512, 512))
    config = V.Flux2VAEConfig(block_out_channels=widths)
    torch.manual_seed(0)
    vae = V.Flux2VAEDecoder(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
            elif not name.endswith("weight"):
                param.normal_(0.0, 0.1)
    size, band = case["size"], case["band_bytes"]
    latent = torch.randn(1, 32, size // 8, size // 8).to(dtype)
    if case["tile_px"]:
        run = lambda z: T.decode_tiled(vae, z, case["tile_px"], head_levels=case["head_levels"], band_bytes=band)
        estimate = T.estimate_decode_peak(config, size, size, dtype, band_bytes=band, tile_px=case["tile_px"],
                                          head_levels=case["head_levels"], device="cpu")
    else:
        run = lambda z: vae.decode(z, band_bytes=band)
        estimate = T.estimate_decode_peak(config, size, size, dtype, band_bytes=band, device="cpu")
    run(torch.randn(1, 32, 16, 16).to(dtype))  # warm-up: oneDNN kernels, thread pools
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = run(latent)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    full = T.estimate_decode_peak(V.Flux2VAEConfig(), size, size, torch.bfloat16,
                                  band_bytes=band, tile_px=case["tile_px"] or None, head_levels=case["head_levels"])
    print(json.dumps({
        **case, "measured_mib": (peak - before) / 1024, "estimate_mib": estimate.bytes / 2**20,
        "stage": estimate.stage, "seconds": seconds, "out": list(out.shape),
        "full_bf16_gib": full.bytes / 2**30, "full_stage": full.stage,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width-divisor", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile-px", type=int, default=1024, help="tile for the tiled rows (0: no tiled rows)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(json.loads(args.case))
        return
    band = 64 << 20  # models/vae.py DEFAULT_BAND_BYTES
    cases = []
    for size in args.sizes:
        cases += [{"size": size, "band_bytes": b, "tile_px": 0, "head_levels": 0} for b in (None, band)]
        if args.tile_px and size > args.tile_px:
            cases.append({"size": size, "band_bytes": band, "tile_px": args.tile_px, "head_levels": 2})
    print("| size | mode | estimate MiB | measured MiB | peak step (estimate) | seconds | computed full size, bf16 |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        case.update(divisor=args.width_divisor, dtype=args.dtype, threads=args.threads)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, env=env, check=False
        )
        if result.returncode:
            print(result.stderr, file=sys.stderr)
            continue
        r = json.loads(result.stdout.strip().splitlines()[-1])
        mode = "whole tensors" if r["band_bytes"] is None else "row bands"
        if r["tile_px"]:
            mode = f"tiled {r['tile_px']} px, head_levels {r['head_levels']}"
        print(f"| {r['size']}² | {mode} | {r['estimate_mib']:.0f} | {r['measured_mib']:.0f} | {r['stage']} | "
              f"{r['seconds']:.1f} | {r['full_bf16_gib']:.2f} GiB ({r['full_stage']}) |", flush=True)


if __name__ == "__main__":
    main()
