"""Experiment: dequantize the next Q4_K Linear on a side CUDA stream while the current one's GEMM runs.

docs/spec.md §G6.2 suggests it: the GEMMs are compute-bound and leave DRAM bandwidth idle, the dequant kernel
is bandwidth-bound, so running the next layer's decode beside the current GEMM could hide part of the ~2-8 % the
decode costs (computed: 8 ms per forward on an H100 against 100-150 ms of GEMMs). Whether the GPU actually runs
the two kernels side by side (a GEMM may fill every SM) is what the benchmark measures: `--dequant-ahead` adds a
"gpu+ahead" row for Q4_K. Nothing changes numerically: the same kernel decodes the same bytes, only earlier.

How: each QuantLinear of the resident branches gets an instance-level `dense_weight` that hands out the weight
decoded ahead (waiting for its event) or decodes it now, and then starts decoding its successor. The successor of a
layer is learned from the call order (the first forward decodes everything in place), so no order is hard-coded.
The host is kept at most two Linears ahead of the GPU: a decoded weight's memory can only be reused once the GPU
has consumed it, so an unthrottled host would hold one dense weight per Linear it ran ahead. On the CPU everything
runs in order (the tests check the results are identical, which exercises the successor bookkeeping).
"""

from __future__ import annotations

import collections

import torch
from ideogram4_gguf.ops import QuantLinear


class DequantAhead:
    def __init__(self, branches, device, max_ahead: int = 2, priority: int = 0):
        """priority: of the side stream (CUDA: lower is more urgent; torch clamps to the device's range)."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device, priority=priority) if self.cuda else None
        self.max_ahead = max_ahead
        self.successor: dict[int, QuantLinear] = {}
        self.ready: dict[int, tuple[torch.Tensor, object]] = {}
        self.queued = collections.deque()
        self.previous = None
        self.ahead_hits = 0
        self.layers = [m for b in branches for m in b.modules() if isinstance(m, QuantLinear)]
        for layer in self.layers:
            layer.dense_weight = self._dense_weight_of(layer)

    def close(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("dense_weight", None)
        if self.cuda:
            self.side.synchronize()
        self.ready.clear()
        self.queued.clear()

    def _dense_weight_of(self, layer: QuantLinear):
        def decode(layer, dtype):  # looked up per call, so the benchmark's timing wrapper still sees every decode
            return type(layer).dense_weight(layer, dtype)

        def dense_weight(dtype):
            if self.previous is not None:
                self.successor.setdefault(id(self.previous), layer)
            self.previous = layer
            if self.cuda:
                compute = torch.cuda.current_stream(self.device)
                mark = torch.cuda.Event()
                mark.record(compute)
                self.queued.append(mark)
                while len(self.queued) > self.max_ahead:
                    self.queued.popleft().synchronize()
            got = self.ready.pop(id(layer), None)
            if got is not None and got[0].dtype == dtype:
                weight, event = got
                if event is not None:
                    compute.wait_event(event)
                    weight.record_stream(compute)
                self.ahead_hits += 1
            else:
                weight = decode(layer, dtype)
            following = self.successor.get(id(layer))
            if following is not None and following.packed.device == self.device and id(following) not in self.ready:
                self._start(following, decode, dtype)
            return weight

        return dense_weight

    def _start(self, layer, decode, dtype):
        if not self.cuda:
            self.ready[id(layer)] = (decode(layer, dtype), None)
            return
        with torch.cuda.stream(self.side):
            weight = decode(layer, dtype)
            event = torch.cuda.Event()
            event.record(self.side)
        self.ready[id(layer)] = (weight, event)
