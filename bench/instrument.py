"""Measuring tools of the benchmark: device clocks, the step breakdown, bandwidth, memory peaks.

- `Clock`: CUDA events on a GPU (read after one synchronize, so timing does not serialize the work), perf_counter
  on the CPU.
- `Breakdown`: while active, times every dequantization (`QuantLinear.dense_weight`, `Fp8Linear.dense_weight`,
  bitsandbytes' `dequantize_4bit`), every GEMM (`torch.nn.functional.linear`, which nn.Linear, the stored-weight
  Linears and bitsandbytes all call) and every attention call (`scaled_dot_product_attention`) by wrapping those
  functions; "rest" is the step time minus the three. The wrappers are installed for a whole sampling run and
  record only while `active`, so one chosen step is measured inside an ordinary run.
- `dequant_bandwidth`: a full-size MLP weight (12288 x 4608 Q4_K) decoded by each available kernel, against a plain
  device copy of the same output size in the same run.
- `cpu_transient_peak`: peak bytes the CPU allocator held above its starting level while running a function, from
  the allocation events of torch.profiler (the CPU counterpart of torch.cuda.max_memory_allocated).
- `host_rss`: current and peak resident set size of this process.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from ideogram4_gguf.ops import Fp8Linear, QuantLinear, triton_dequant
from ideogram4_gguf.ops import dequantize as torch_dequantize

import triton_variants

CATEGORIES = ("dequant", "gemm", "attention")
FUSED_4BIT = "bitsandbytes matmul_4bit"  # resolved to dequant or gemm per call (Breakdown._category)


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, start, end) -> float:
        """Time between two marks (after `sync()` on a GPU)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start


class Breakdown:
    """Context manager that wraps the dequant / GEMM / attention functions; records while `active` is True.

    Calls can nest (bitsandbytes' fused `matmul_4bit` may itself call `dequantize_4bit` and `F.linear`): each
    category gets the time of its calls minus the time of the wrapped calls inside them, so nothing is counted
    twice and the three categories never add up to more than the step.
    """

    def __init__(self, clock: Clock):
        self.clock = clock
        self.active = False
        self.records = []  # (category, start, end, [(start, end) of the wrapped calls directly inside])
        self._open = []  # children lists of the wrapped calls in progress, innermost last
        self._restore = []

    def _wrap(self, owner, name, category):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            children = []
            self._open.append(children)
            start = self.clock.mark()
            try:
                result = original(*args, **kwargs)
            finally:
                end = self.clock.mark()
                self._open.pop()
            self.records.append((category, start, end, children))
            if self._open:
                self._open[-1].append((start, end))
            return result

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def __enter__(self):
        self._wrap(QuantLinear, "dense_weight", "dequant")
        self._wrap(Fp8Linear, "dense_weight", "dequant")
        self._wrap(F, "linear", "gemm")
        self._wrap(F, "scaled_dot_product_attention", "attention")
        try:
            import bitsandbytes
            import bitsandbytes.functional as bnb_functional
        except Exception:  # noqa: BLE001  (not installed, or no usable backend: its import raises anything)
            bitsandbytes = None
        if bitsandbytes is not None:
            self._wrap(bnb_functional, "dequantize_4bit", "dequant")
            # Linear4bit.forward calls bnb.matmul_4bit. In bitsandbytes 0.50 that is one op,
            # torch.ops.bitsandbytes.gemm_4bit: a fused decode-and-multiply kernel (CPU; small batches on CUDA),
            # or a decode followed by F.linear (large batches on CUDA). See _category.
            self._wrap(bitsandbytes, "matmul_4bit", FUSED_4BIT)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore = []
        self.active = False

    @staticmethod
    def _category(category, children) -> str:
        # bitsandbytes' 4-bit matmul: with an F.linear inside, what remains of it is the decode; without, it is
        # one fused kernel, counted as GEMM (its decode cannot be told apart)
        if category == FUSED_4BIT:
            return "dequant" if children else "gemm"
        return category

    def seconds(self) -> dict[str, float]:
        """Summed exclusive time per category (after `clock.sync()`)."""
        totals = dict.fromkeys(CATEGORIES, 0.0)
        for category, start, end, children in self.records:
            inner = sum(self.clock.seconds(a, b) for a, b in children)
            totals[self._category(category, children)] += max(self.clock.seconds(start, end) - inner, 0.0)
        return totals

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CATEGORIES, 0)
        for category, _, _, children in self.records:
            counts[self._category(category, children)] += 1
        return counts


# ---------------------------------------------------------------------------------------------------------------
# Bandwidth


def random_q4_k(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Valid Q4_K blocks with random nibbles and scales (small positive f16 d / dmin), (rows, cols/256*144) uint8."""
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // 256
    data = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
    for offset in (0, 2):
        d = (rng.random(n_blocks) * 1e-3 + 1e-4).astype(np.float16)
        data[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(data.reshape(rows, -1))


def _median_seconds(fn, clock: Clock, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the time of `inner` back-to-back calls, divided by `inner`. On a GPU several calls
    between two events keep the device busy while the host launches the next one, so a short kernel is timed
    without the launch latency of the first call."""
    fn()
    clock.sync()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        for _ in range(inner):
            fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end) / inner)
    return statistics.median(times)


def dequant_kernels(device: torch.device) -> dict:
    """kernel name -> fn(packed, shape, dtype) available on this device (the ones QuantLinear can use)."""
    kernels = {"torch": lambda packed, shape, dtype: torch_dequantize(packed, Q.Q4_K, shape, dtype)}
    if device.type == "cuda" and triton_dequant.available():
        kernels["triton"] = lambda packed, shape, dtype: triton_dequant.dequantize(packed, Q.Q4_K, shape, dtype)
    return kernels


# Triton Q4_K kernels and launch shapes tried by the sweep: (kernel variant, GGUF blocks per program, warps per
# program); variant None is the shipped kernel, the others are the benchmark's (triton_variants.py KERNELS).
TRITON_LAUNCHES = tuple((variant, blocks, warps) for qtype, variant in triton_variants.KERNELS if qtype == Q.Q4_K
                        for blocks in (2, 4, 8, 16, 32) for warps in (2, 4, 8))


def dequant_bandwidth(device: torch.device, dtype: torch.dtype, rows: int = 12288, cols: int = 4608,
                      repeats: int = 5, sweep: bool = True) -> dict:
    """GB/s of each Q4_K dequant kernel (packed bytes read + output bytes written) and of a device copy of the
    output size (bytes read + written), measured back to back. With `sweep` (and the Triton kernel available)
    every kernel variant and launch shape of TRITON_LAUNCHES is timed too, so a GPU run tells which default to
    keep; each one's output is checked equal to the default's first."""
    clock = Clock(device)
    inner = 10 if clock.cuda else 1
    packed = random_q4_k(rows, cols).to(device)
    out_bytes = rows * cols * torch.empty(0, dtype=dtype).element_size()
    src = torch.empty(out_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), clock, repeats, inner)
    copy_gbps = 2 * out_bytes / copy_s / 1e9
    result = {"weights": rows * cols, "packed_bytes": packed.numel(), "out_bytes": out_bytes,
              "out_dtype": str(dtype).replace("torch.", ""), "copy_s": copy_s, "copy_GBps": copy_gbps, "kernels": {}}

    def measure(kernel):
        seconds = _median_seconds(lambda: kernel(packed, (rows, cols), dtype), clock, repeats, inner)
        gbps = (packed.numel() + out_bytes) / seconds / 1e9
        return {"seconds": seconds, "GBps": gbps, "pct_of_copy": 100.0 * gbps / copy_gbps,
                "Mweights_per_s": rows * cols / seconds / 1e6}

    kernels = dequant_kernels(device)
    for name, kernel in kernels.items():
        result["kernels"][name] = measure(kernel)
    if sweep and "triton" in kernels:
        reference = kernels["triton"](packed, (rows, cols), dtype)
        launches = []
        for variant, blocks, warps in TRITON_LAUNCHES:
            def kernel(p, shape, dt, variant=variant, blocks=blocks, warps=warps):
                return triton_variants.dequantize(p, Q.Q4_K, shape, dt, variant=variant, blocks_per_program=blocks,
                                                  num_warps=warps)

            if not torch.equal(kernel(packed, (rows, cols), dtype), reference):
                raise AssertionError(f"Triton {variant or 'default'} kernel, {blocks} blocks x {warps} warps, "
                                     "decodes differently")
            launches.append({"variant": variant or "default", "blocks_per_program": blocks, "num_warps": warps,
                             **measure(kernel)})
        best = max(launches, key=lambda row: row["GBps"])
        result["triton_launches"] = launches
        # beside "kernels", which holds what ships (the target is judged on those)
        result["triton_best_launch"] = {
            **best, "default": ("default", triton_dequant.BLOCKS_PER_PROGRAM, triton_dequant.NUM_WARPS)}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Memory


def cpu_transient_peak(fn) -> tuple[object, int | None]:
    """(fn(), peak bytes allocated on the CPU above the level at the start), from torch.profiler's allocation
    events; None for the peak when this torch build does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    try:
        from torch._C._profiler import _EventType

        sizes = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # noqa: BLE001  (a private API: report "unknown" rather than fail the benchmark)
        return result, None
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    return result, peak


def host_rss() -> dict[str, int | None]:
    """Current (VmRSS) and peak (VmHWM) resident set size in bytes."""
    values = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    peak = values.get("VmHWM")
    if peak is None:
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = usage if os.uname().sysname == "Darwin" else usage * 1024
    return {"rss_bytes": values.get("VmRSS"), "peak_rss_bytes": peak}


@contextlib.contextmanager
def cuda_peak(device: torch.device):
    """Yields a dict that holds, after the block, the peak bytes allocated (and reserved) above the level at its
    start."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    base_reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    record = {}
    yield record
    torch.cuda.synchronize(device)
    record["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    # what the caching allocator took from the device (fragmentation included; the CUDA context is not in either)
    record["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) - base_reserved
    record["base_bytes"] = base
