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

from ..ops import Fp8Linear, QuantLinear, triton_dequant
from ..ops import dequantize as torch_dequantize

CATEGORIES = ("dequant", "gemm", "attention")


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
    """Context manager that wraps the dequant / GEMM / attention functions; records while `active` is True."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.active = False
        self.pairs = {c: [] for c in CATEGORIES}
        self._restore = []

    def _wrap(self, owner, name, category):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            start = self.clock.mark()
            result = original(*args, **kwargs)
            self.pairs[category].append((start, self.clock.mark()))
            return result

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def __enter__(self):
        self._wrap(QuantLinear, "dense_weight", "dequant")
        self._wrap(Fp8Linear, "dense_weight", "dequant")
        self._wrap(F, "linear", "gemm")
        self._wrap(F, "scaled_dot_product_attention", "attention")
        try:
            import bitsandbytes.functional as bnb_functional
        except Exception:  # noqa: BLE001  (not installed, or no usable backend: its import raises anything)
            bnb_functional = None
        if bnb_functional is not None:
            self._wrap(bnb_functional, "dequantize_4bit", "dequant")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore = []
        self.active = False

    def seconds(self) -> dict[str, float]:
        """Summed time per category (after `clock.sync()`)."""
        return {c: sum(self.clock.seconds(a, b) for a, b in pairs) for c, pairs in self.pairs.items()}

    def counts(self) -> dict[str, int]:
        return {c: len(pairs) for c, pairs in self.pairs.items()}


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


def _median_seconds(fn, clock: Clock, repeats: int) -> float:
    fn()
    clock.sync()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        fn()
        end = clock.mark()
        clock.sync()
        times.append(clock.seconds(start, end))
    return statistics.median(times)


def dequant_kernels(device: torch.device) -> dict:
    """kernel name -> fn(packed, shape, dtype) available on this device (the ones QuantLinear can use)."""
    kernels = {"torch": lambda packed, shape, dtype: torch_dequantize(packed, Q.Q4_K, shape, dtype)}
    if device.type == "cuda" and triton_dequant.available():
        kernels["triton"] = lambda packed, shape, dtype: triton_dequant.dequantize(packed, Q.Q4_K, shape, dtype)
    return kernels


def dequant_bandwidth(device: torch.device, dtype: torch.dtype, rows: int = 12288, cols: int = 4608,
                      repeats: int = 5) -> dict:
    """GB/s of each Q4_K dequant kernel (packed bytes read + output bytes written) and of a device copy of the
    output size (bytes read + written), measured back to back."""
    clock = Clock(device)
    packed = random_q4_k(rows, cols).to(device)
    out_bytes = rows * cols * torch.empty(0, dtype=dtype).element_size()
    src = torch.empty(out_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), clock, repeats)
    copy_gbps = 2 * out_bytes / copy_s / 1e9
    result = {"weights": rows * cols, "packed_bytes": packed.numel(), "out_bytes": out_bytes,
              "out_dtype": str(dtype).replace("torch.", ""), "copy_s": copy_s, "copy_GBps": copy_gbps, "kernels": {}}
    for name, kernel in dequant_kernels(device).items():
        seconds = _median_seconds(lambda k=kernel: k(packed, (rows, cols), dtype), clock, repeats)
        gbps = (packed.numel() + out_bytes) / seconds / 1e9
        result["kernels"][name] = {"seconds": seconds, "GBps": gbps, "pct_of_copy": 100.0 * gbps / copy_gbps,
                                   "Mweights_per_s": rows * cols / seconds / 1e6}
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
