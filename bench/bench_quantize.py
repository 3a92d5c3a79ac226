"""Quantizer throughput: quant_tools (numpy) next to ggml's C reference (ggml-python), 1 and 2 threads.

    python bench/bench_quantize.py [--rows 1024] [--cols 4096] [--repeats 5] [--types Q4_K Q8_0 Q6_K Q5_K]
    python bench/bench_quantize.py --errors
    python bench/bench_quantize.py --big-tensor [--threads 2]

Prints M weights/s (best of --repeats, wall clock) on Gaussian weights (sigma 0.02, 1 % outlier columns x 8) and
checks on the way that both give the same bytes. The 2-thread oracle splits the rows over two threads
(`ggml_quantize_chunk` releases the GIL). `--errors` prints instead the relative RMSE of each type on synthetic
weight distributions and of each shipped recipe (weighted by the full-size tensor sizes). `--big-tensor` streams
one full-size llm_cond_proj (4608 x 53248 fp8 e4m3fn + per-row weight_scale, written to a temp file) through the
file writer's quantize path into /dev/null and prints the time and the peak RSS.
"""

import argparse
import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ideogram4_gguf.quant_tools.quants import QTYPES, quantize


def ggml_oracle():
    try:
        import ggml
        import gguf
    except ImportError:
        return None

    def run(x, qtype, threads):
        rows, n = x.shape
        kind = gguf.GGMLQuantizationType[qtype]
        out = np.zeros((rows, QTYPES[qtype].row_bytes(n)), np.uint8)
        src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        dst = out.ctypes.data_as(ctypes.c_void_p)

        def span(bounds):
            first, last = bounds
            ggml.ggml_quantize_chunk(int(kind), src, dst, first * n, last - first, n, None)

        step = -(-rows // threads)
        spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]
        if threads == 1:
            span(spans[0])
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(span, spans))
        return out

    return run


def best_rate(fn, weights, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return weights / best / 1e6, result


def synthetic(kind, rows, cols, rng):
    x = rng.standard_t(3, (rows, cols)) if kind == "student-t3" else rng.standard_normal((rows, cols))
    x = (x * 0.02).astype(np.float32)
    if kind == "gaussian+outlier-columns":
        x[:, rng.choice(cols, cols // 100, replace=False)] *= 8
    return x


def print_errors(rows, cols):
    from ideogram4_gguf.quant_tools.layout import FULL_SIZE
    from ideogram4_gguf.quant_tools.quants import dequantize
    from ideogram4_gguf.quant_tools.recipe import Recipe, shipped_names

    rng = np.random.default_rng(0)
    types = ["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16", "F16"]
    print(f"relative RMSE |dequant(quant(W)) - W| / |W| on {rows} x {cols} synthetic weights (sigma 0.02)")
    print(f"{'distribution':<26}" + "".join(f"{t:>8}" for t in types))
    measured = {}
    for kind in ("gaussian", "gaussian+outlier-columns", "student-t3"):
        x = synthetic(kind, rows, cols, rng)
        for t in types:
            d = dequantize(quantize(x, t), t).astype(np.float64)
            measured[kind, t] = float(np.sqrt(np.sum((d - x) ** 2) / np.sum(x.astype(np.float64) ** 2)))
        print(f"{kind:<26}" + "".join(f"{measured[kind, t]:>8.4f}" for t in types))
    print("recipes (2-D weights of both full-size branches; errors from the gaussian+outlier-columns row):")
    shapes = [s for s in FULL_SIZE.tensor_shapes().items() if len(s[1]) == 2]
    for name in shipped_names():
        recipe = Recipe.load(name)
        total = err2 = nbytes = 0
        for tensor, shape in shapes:
            qtype = recipe.decide(tensor, shape).qtype
            n = int(np.prod(shape))
            total += n
            err2 += n * measured.get(("gaussian+outlier-columns", qtype), 0.0) ** 2
            nbytes += n // QTYPES[qtype].block_size * QTYPES[qtype].type_size
        print(f"  {name:<8} rel RMSE {np.sqrt(err2 / total):.4f}   {8 * nbytes / total:.3f} bits/weight")


def big_tensor(threads, qtype="Q4_K"):
    """Full-size llm_cond_proj through build._write_tensor: wall time and peak RSS (Linux VmHWM)."""
    import json
    import tempfile

    from ideogram4_gguf.quant_tools.build import PlannedTensor, _write_tensor
    from ideogram4_gguf.quant_tools.quants import get_qtype
    from ideogram4_gguf.quant_tools.safetensors_io import SafetensorsFile
    from ideogram4_gguf.quant_tools.sources import Part, TensorSource

    rows, cols = 4608, 53248
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "llm_cond_proj.safetensors"
        header = {"w": {"dtype": "F8_E4M3", "shape": [rows, cols], "data_offsets": [0, rows * cols]},
                  "w_scale": {"dtype": "F32", "shape": [rows], "data_offsets": [rows * cols, rows * cols + 4 * rows]}}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for _ in range(0, rows, 256):  # random finite e4m3 codes (0x7f / 0xff are nan)
                codes = rng.integers(0, 0x7F, (256, cols), dtype=np.uint8)
                f.write((codes | (rng.integers(0, 2, (256, cols), dtype=np.uint8) << 7)).tobytes())
            f.write(np.full(rows, 1e-3, np.float32).tobytes())
        source = SafetensorsFile(path)
        tensor = TensorSource("llm_cond_proj.weight", (rows, cols), [Part(source, "w", rows, "w_scale", source)])
        planned = PlannedTensor("llm_cond_proj.weight", "conditional", tensor, get_qtype(qtype), "bench")
        start, cpu = time.perf_counter(), time.process_time()
        with open(os.devnull, "wb") as sink:
            weights = sum(_write_tensor(sink, planned, threads))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        source.close()
    peak = "?"
    if os.path.exists("/proc/self/status"):
        peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
        peak = f"{int(peak) / 1024:.0f} MiB"
    print(f"llm_cond_proj {rows} x {cols} fp8 -> {qtype}, {threads} threads: {wall:.1f} s wall "
          f"({weights / wall / 1e6:.1f} M weights/s), {cpu:.1f} CPU-s, peak RSS {peak}; load average {os.getloadavg()[0]:.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q8_0", "Q6_K", "Q5_K"])
    parser.add_argument("--errors", action="store_true", help="print quantization errors instead of speed")
    parser.add_argument("--big-tensor", action="store_true", help="one full-size llm_cond_proj: time and peak RSS")
    parser.add_argument("--threads", type=int, default=2, help="threads for --big-tensor")
    args = parser.parse_args(argv)
    if args.errors:
        return print_errors(512, args.cols)
    if args.big_tensor:
        return big_tensor(args.threads)

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    x[:, rng.choice(args.cols, max(1, args.cols // 100), replace=False)] *= 8
    oracle = ggml_oracle()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"{args.rows} x {args.cols} float32 ({x.size / 1e6:.1f} M weights), best of {args.repeats}; "
          f"{os.cpu_count()} CPUs, load average {load[0]}")
    print(f"{'type':<5} {'quant_tools 1t':>15} {'quant_tools 2t':>15} {'ggml 1t':>10} {'ggml 2t':>10}  bytes")
    for qtype in args.types:
        ours1, bytes1 = best_rate(lambda q=qtype: quantize(x, q, threads=1), x.size, args.repeats)
        ours2, _ = best_rate(lambda q=qtype: quantize(x, q, threads=2), x.size, args.repeats)
        if oracle is not None:
            ref1, reference = best_rate(lambda q=qtype: oracle(x, q, 1), x.size, args.repeats)
            ref2, _ = best_rate(lambda q=qtype: oracle(x, q, 2), x.size, args.repeats)
            same = "identical" if np.array_equal(bytes1, reference) else "DIFFER"
            print(f"{qtype:<5} {ours1:>15.1f} {ours2:>15.1f} {ref1:>10.1f} {ref2:>10.1f}  {same}")
        else:
            print(f"{qtype:<5} {ours1:>15.1f} {ours2:>15.1f} {'-':>10} {'-':>10}  (ggml-python not installed)")
    print("M weights/s, wall clock")


if __name__ == "__main__":
    main()
