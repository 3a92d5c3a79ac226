"""CPU dequant throughput: gguf-py (numpy), a straightforward chain of torch ops, and ops.dequantize.

Usage: python bench/bench_dequant.py [--mweights 16] [--repeats 5] [--threads 2] [--clock wall|cpu]

All three run in one process on the same random valid blocks; each result is checked bit-exact against
gguf-py before it is timed. Prints Mweights/s (best of --repeats) and the speed-up of ours over the chain.
--clock cpu times with process CPU time instead of wall time: steadier on a machine shared with other work
(with several threads it sums their CPU time, so it measures efficiency rather than latency).
"""

import argparse
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from ideogram4_gguf.ops import dequantize


def straightforward_q4_k(raw: torch.Tensor) -> torch.Tensor:
    """The op-by-op decode most loaders use (split fields, unpack 6-bit scales, shift/mask nibbles,
    multiply, subtract), each op over the whole tensor."""
    blocks = raw.reshape(-1, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    scales = blocks[:, 4:16].reshape(n, 3, 4)
    a, b, c = scales[:, 0], scales[:, 1], scales[:, 2]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=1)
    scale = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> shifts) & 15
    q = q.reshape(n, 8, 32).to(torch.float32)
    return (scale * q - offset).reshape(raw.shape[0], -1)


def random_q4_k(rows, cols, rng):
    n_blocks = rows * cols // 256
    data = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    for offset in (0, 2):
        data[:, offset:offset + 2] = (rng.random(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


CLOCK = time.perf_counter


def best_time(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mweights", type=float, default=16, help="tensor size in millions of weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    cols = 4096
    rows = max(1, int(args.mweights * 1e6) // cols)
    n = rows * cols
    raw = random_q4_k(rows, cols, np.random.default_rng(0))
    raw_t = torch.from_numpy(raw)
    reference = torch.from_numpy(quants.dequantize(raw, Q.Q4_K))

    candidates = {
        "gguf-py (numpy)": lambda: torch.from_numpy(quants.dequantize(raw, Q.Q4_K)),
        "straightforward torch chain": lambda: straightforward_q4_k(raw_t),
        "ops.dequantize fp32": lambda: dequantize(raw_t, Q.Q4_K, (rows, cols)),
        "ops.dequantize bf16": lambda: dequantize(raw_t, Q.Q4_K, (rows, cols), torch.bfloat16),
    }
    print(f"Q4_K dequant on CPU, {n / 1e6:.1f} M weights, torch {torch.__version__}, {args.threads} threads, "
          f"{args.clock} clock")
    rates = {}
    for name, fn in candidates.items():
        out = fn()
        assert torch.equal(out, reference.to(out.dtype)), f"{name} is not bit-exact"
        rates[name] = n / best_time(fn, args.repeats) / 1e6
    width = max(map(len, rates))
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {rate:8.1f} Mweights/s")
    speedup = rates["ops.dequantize fp32"] / rates["straightforward torch chain"]
    print(f"  ops.dequantize fp32 / straightforward chain: {speedup:.2f}x")
    return rates


if __name__ == "__main__":
    main()
