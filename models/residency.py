"""Layer streaming: the two DiT branches resident on the device, or streamed layer by layer from host memory, in
one of the memory modes of `memory_plan.py` (which also resolves "auto" and computes what each mode needs).

Streaming works with forward hooks on the units of a branch (each block of `layers`, and the small modules around
them), so neither the model nor the sampler knows about it: a unit's pre-hook swaps the device copies of its stored
tensors into the module (waiting for their copy to finish) and starts copying the next unit(s) on a side CUDA
stream, so the copies overlap compute; its post-hook swaps the host tensors back and drops the device copies.
Only the stored tensors move: the packed uint8 blocks of a `QuantLinear`, the fp8 weight and scale of an
`Fp8Linear`, plain parameters. `embed_image_indicator` (two rows) stays on the device, so `branch.device` is the
compute device and the sampler moves its inputs there as usual.

The same machinery runs with device "cpu" (the copies are plain CPU clones, no streams or events): that is how the
CPU-only tests check that a streamed branch computes exactly what a resident one does and keeps no copies after
its forward. Facts behind the plans: docs/spec.md §G8; docs/memory.md.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .memory_plan import DEFAULT_PREFETCH, STREAMED, resolve_memory_mode


def _order(branch) -> tuple[tuple[str, ...], ...]:
    """The streamed units of a branch as sequences in call order (prefetch runs along a sequence).

    `project_text` runs llm_cond_norm then llm_cond_proj (once per image); `forward` runs input_proj, t_embedding,
    adaln_proj, the blocks, final_layer. tests/models/test_residency.py checks this against the hooks' firing order.
    """
    text = ("llm_cond_norm", "llm_cond_proj") if branch.with_text else ()
    blocks = tuple(f"layers.{i}" for i in range(len(branch.layers)))
    forward = ("input_proj", "t_embedding", "adaln_proj", *blocks, "final_layer")
    return tuple(seq for seq in (text, forward) if seq)


# ---------------------------------------------------------------------------------------------------------------
# Stored tensors


@dataclass(eq=False)
class _Slot:
    """One parameter or buffer of one module: where a stored tensor lives, so it can be swapped."""

    module: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.name] = nn.Parameter(tensor, requires_grad=False)
        else:
            self.module._buffers[self.name] = tensor


def _slots(module: nn.Module) -> list[_Slot]:
    slots = []
    for owner in module.modules():
        slots += [_Slot(owner, n, True) for n, p in owner._parameters.items() if p is not None]
        slots += [_Slot(owner, n, False) for n, b in owner._buffers.items() if b is not None]
    return slots


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------------------------
# Streaming one branch


@dataclass
class StreamStats:
    """What a streamed branch did since placement (the benchmark and the tests read it)."""

    fetches: int = 0
    bytes_copied: int = 0
    max_live_units: int = 0  # units holding device copies at the same time, as seen by the host
    calls: list = field(default_factory=list)  # unit names in pre-hook order (the first 4096)


class _PinnedArena:
    """One page-locked host buffer holding copies of a streamed branch's stored tensors, sized exactly.

    `tensor.pin_memory()` goes through torch's pinned caching allocator, which rounds every allocation up to a power
    of two: the 35.8 MB qkv blocks of Q4_K take 64 MB each, about 1.24x overall (6.3 GB of page-locked memory for a
    5.08 GB branch). Registering one ordinary allocation with cudaHostRegister locks exactly what is needed. Should
    registration fail, the tensors are pinned one by one instead (rounded, but still asynchronous copies).
    """

    ALIGN = 256  # every tensor starts on a 256-byte boundary (DMA-friendly, and any dtype view is aligned)

    def __init__(self, tensors: list[torch.Tensor]):
        total = sum(-(-_nbytes(t) // self.ALIGN) * self.ALIGN for t in tensors)
        self.buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        self.offset = 0
        code = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
        self.registered = int(code) == 0
        if not self.registered:
            self.buffer = None
            warnings.warn(f"cudaHostRegister of {total / 1e9:.2f} GB failed ({code}); pinning tensor by tensor "
                          "(uses up to 1.3x the host memory).", stacklevel=4)

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.buffer is None:
            return tensor.to("cpu").pin_memory()
        size = _nbytes(tensor)
        view = self.buffer[self.offset : self.offset + size].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        self.offset += -(-size // self.ALIGN) * self.ALIGN
        return view

    def close(self) -> None:
        if self.buffer is not None and self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False


class _Unit:
    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.slots = _slots(module)
        self.hosts: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] | None = None
        self.ready = None  # CUDA event recorded on the copy stream after the copies
        self.nbytes = 0


class _BranchStreamer:
    """Streams the units of one branch to `device` (CUDA: side stream + events; CPU: synchronous clones)."""

    def __init__(self, branch: nn.Module, device: torch.device, prefetch: int, pin_memory: bool, copy_stream):
        self.handles = []
        self.live: dict[str, _Unit] = {}
        self.arena = None
        self.cuda, self.copy_stream = False, None
        self.finishing = collections.deque()  # CUDA events: units whose compute the host has queued
        try:
            self._setup(branch, device, prefetch, pin_memory, copy_stream)
        except BaseException:
            self.close()  # no hook or page-locked memory left behind by a half-built streamer
            raise

    def _setup(self, branch, device, prefetch, pin_memory, copy_stream) -> None:
        self.device, self.prefetch = device, prefetch
        self.cuda = device.type == "cuda"
        self.copy_stream = copy_stream
        self.stats = StreamStats()
        self.units: dict[str, _Unit] = {}
        self.next_units: dict[str, list[str]] = {}
        for sequence in _order(branch):
            for i, name in enumerate(sequence):
                unit = _Unit(name, branch.get_submodule(name))
                self.units[name] = unit
                self.next_units[name] = list(sequence[i + 1 : i + 1 + prefetch])
        stored = [slot.get().detach() for unit in self.units.values() for slot in unit.slots]
        self.arena = _PinnedArena(stored) if self.cuda and pin_memory else None
        for unit in self.units.values():
            for slot in unit.slots:
                host = slot.get().detach()
                if self.arena is not None:
                    host = self.arena.hold(host)
                elif host.device.type != "cpu":
                    host = host.to("cpu")
                unit.hosts.append(host)
                unit.nbytes += _nbytes(host)
                slot.set(host)
            self.handles.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit)))
            self.handles.append(unit.module.register_forward_hook(self._make_post_hook(unit)))

    @property
    def host_bytes(self) -> int:
        return sum(u.nbytes for u in self.units.values())

    @property
    def largest_unit_bytes(self) -> int:
        return max((u.nbytes for u in self.units.values()), default=0)

    def _make_pre_hook(self, unit):
        def pre_hook(module, args):
            self._fetch(unit)
            self._bind(unit)
            for name in self.next_units[unit.name]:
                self._fetch(self.units[name])
            if len(self.stats.calls) < 4096:
                self.stats.calls.append(unit.name)

        return pre_hook

    def _make_post_hook(self, unit):
        def post_hook(module, args, output):
            self._unbind(unit)

        return post_hook

    def _fetch(self, unit: _Unit) -> None:
        if unit.copies is not None:
            return
        if self.cuda:
            # Bound the device memory: the host runs ahead of the GPU, and a copy buffer freed by the host is
            # reusable only once the GPU has finished with it. Waiting here until all but the last queued unit
            # are done keeps at most prefetch + 2 units alive without ever starving the GPU of queued work.
            while len(self.finishing) > 1:
                self.finishing.popleft().synchronize()
            with torch.cuda.stream(self.copy_stream):
                unit.copies = [host.to(self.device, non_blocking=True) for host in unit.hosts]
                unit.ready = torch.cuda.Event()
                unit.ready.record(self.copy_stream)
        else:
            unit.copies = [host.clone() for host in unit.hosts]
        self.live[unit.name] = unit
        self.stats.fetches += 1
        self.stats.bytes_copied += unit.nbytes
        self.stats.max_live_units = max(self.stats.max_live_units, len(self.live))

    def _bind(self, unit: _Unit) -> None:
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(unit.ready)
            for copy in unit.copies:
                # The copies were allocated on the copy stream; without this the allocator could hand their memory
                # to the next copy while the compute stream still reads it.
                copy.record_stream(compute)
        for slot, copy in zip(unit.slots, unit.copies):
            slot.set(copy)

    def _unbind(self, unit: _Unit) -> None:
        for slot, host in zip(unit.slots, unit.hosts):
            slot.set(host)
        unit.copies, unit.ready = None, None
        self.live.pop(unit.name, None)
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.finishing.append(done)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for unit in list(self.live.values()):
            self._unbind(unit)
        if self.cuda:
            self.copy_stream.synchronize()
        self.finishing.clear()
        if self.arena is not None:
            self.arena.close()


# ---------------------------------------------------------------------------------------------------------------
# Placement of both branches


@dataclass
class BranchPlacement:
    role: str  # "cond" | "uncond"
    streamed: bool
    stored_bytes: int  # all stored tensors of the branch
    device_bytes: int  # resident on the device (for a streamed branch: what never leaves it)
    streamer: _BranchStreamer | None = None

    @property
    def stats(self) -> StreamStats | None:
        return self.streamer.stats if self.streamer else None


class Placement:
    """The branches placed by `place_branches`; `release()` puts back exactly the tensors they had before."""

    def __init__(self, mode, device, cond, uncond, prefetch):
        self.mode, self.device, self.prefetch = mode, device, prefetch
        self.branches = {"cond": cond, "uncond": uncond}
        self._originals: list[tuple[_Slot, torch.Tensor]] = []
        self.placements: dict[str, BranchPlacement] = {}
        self.copy_stream = None
        self.released = False

    @property
    def cond(self) -> BranchPlacement:
        return self.placements["cond"]

    @property
    def uncond(self) -> BranchPlacement:
        return self.placements["uncond"]

    def is_streamed(self, role: str) -> bool:
        """Whether branch `role` ("cond" / "uncond") is streamed layer by layer in this mode."""
        return role in STREAMED[self.mode]

    @property
    def device_bytes(self) -> int:
        """Weight bytes resident on the device (streamed units in flight not counted)."""
        return sum(p.device_bytes for p in self.placements.values())

    def summary(self) -> str:
        def one(p: BranchPlacement) -> str:
            if not p.streamed:
                return f"{p.role} resident ({p.stored_bytes / 1e9:.2f} GB)"
            where = "pinned host memory" if self.device.type == "cuda" else "host memory"
            return (f"{p.role} streamed from {where} ({p.stored_bytes / 1e9:.2f} GB, {self.prefetch} unit(s) ahead, "
                    f"largest unit {p.streamer.largest_unit_bytes / 1e6:.0f} MB)")

        return f"memory mode {self.mode} on {self.device}: " + "; ".join(one(p) for p in self.placements.values())

    def release(self) -> None:
        """Remove the hooks and restore every stored tensor the branches had before placement (device memory is
        freed; the CUDA cache is emptied)."""
        if self.released:
            return
        for placement in self.placements.values():
            if placement.streamer is not None:
                placement.streamer.close()
        for slot, original in reversed(self._originals):
            if slot.is_param:
                slot.module._parameters[slot.name] = original
            else:
                slot.module._buffers[slot.name] = original
        self._originals = []
        for branch in self.branches.values():
            branch._ideogram4_placement = None
        self.released = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def place_branches(cond_branch, uncond_branch, device, mode: str = "auto", *, prefetch: int = DEFAULT_PREFETCH,
                   pin_memory: bool = True, free_bytes: int | None = None, width: int = 1024, height: int = 1024,
                   text_tokens: int = 512) -> Placement:
    """Put the two branches on `device` in a memory mode (MEMORY_MODES); "auto" is resolved first.

    The branches may be anywhere (typically loaded on the CPU, memory-mapped). Resident branches get device copies
    of their stored tensors; streamed ones keep theirs in (pinned, on CUDA) host memory. `release()` undoes it.
    width / height / text_tokens / free_bytes only inform "auto".
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mode = resolve_memory_mode(mode, cond_branch, uncond_branch, device, free_bytes=free_bytes, width=width,
                               height=height, text_tokens=text_tokens)
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    for branch in (cond_branch, uncond_branch):
        if getattr(branch, "_ideogram4_placement", None) is not None:
            raise RuntimeError("This DiT branch is already placed; call release() on its placement first.")
    placement = Placement(mode, device, cond_branch, uncond_branch, prefetch)
    try:
        if device.type == "cuda" and mode != "gpu":
            placement.copy_stream = torch.cuda.Stream(device)
        for role, branch in (("cond", cond_branch), ("uncond", uncond_branch)):
            branch._ideogram4_placement = placement
            _place_branch(placement, role, branch, device, mode, prefetch, pin_memory)
    except BaseException:
        # out of device memory half-way (or interrupted): put back what moved, so the branches can be placed again
        placement.release()
        raise
    return placement


def _place_branch(placement, role, branch, device, mode, prefetch, pin_memory) -> None:
    all_slots = _slots(branch)
    placement._originals += [(slot, slot.get()) for slot in all_slots]
    streamed = role in STREAMED[mode]
    streamer = None
    if streamed:
        streamer = _BranchStreamer(branch, device, prefetch, pin_memory, placement.copy_stream)
        placement.placements[role] = BranchPlacement(role, True, 0, 0, streamer)  # released with the rest on error
        covered = {id(slot.module) for unit in streamer.units.values() for slot in unit.slots}
        resident = [slot for slot in all_slots if id(slot.module) not in covered]
    else:
        resident = all_slots
    device_bytes = 0
    for slot in resident:
        tensor = slot.get()
        if tensor.device != device:
            slot.set(tensor.detach().to(device))
        device_bytes += _nbytes(tensor)
    placement.placements[role] = BranchPlacement(role, streamed, sum(_nbytes(s.get()) for s in all_slots),
                                                 device_bytes, streamer)


__all__ = [
    "BranchPlacement",
    "Placement",
    "StreamStats",
    "place_branches",
]
