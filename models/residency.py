"""Where the two DiT branches live while sampling: resident on the device, or streamed layer by layer from host memory.

| mode | conditional branch | unconditional branch | device memory (full size, Q4_K, 1024², computed) |
|---|---|---|---|
| `gpu` | resident | resident | both branches (10.44 GB) + activations |
| `stream_uncond` | resident | pinned host memory, streamed | one branch (5.22 GB) + a few layers in flight + activations |
| `cpu_offload` | streamed | streamed | a few layers in flight + activations |
| `auto` | the first of the three above that fits the free device memory (on the CPU: everything resident) | | |

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

from ..errors import SamplingError, quote
from .dit import Ideogram4Config, Ideogram4DiT

MEMORY_MODES = ("auto", "gpu", "stream_uncond", "cpu_offload")
# Which branches each explicit mode streams.
STREAMED = {"gpu": (), "stream_uncond": ("uncond",), "cpu_offload": ("cond", "uncond")}
# Units fetched ahead of the one computing. One 149 MB Q4_K block copies in ~6 ms over PCIe 4.0 and computes in
# ~35 ms (uncond, 1024², RTX 3090, computed), so one ahead hides the copies; more only costs memory.
DEFAULT_PREFETCH = 1
# Share of the free device memory `auto` plans to use; the rest absorbs allocator fragmentation and estimate error.
AUTO_HEADROOM = 0.9


def check_memory_mode(mode) -> str:
    """`mode` when it is one of MEMORY_MODES; else the one SamplingError every caller raises for it."""
    if not isinstance(mode, str) or mode not in MEMORY_MODES:
        # named as the loader node and load_model name the input
        raise SamplingError(f"memory_mode {quote(mode)} is not one of {', '.join(MEMORY_MODES)}; pick one of those "
                            "(docs/memory.md).")
    return mode


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


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every stored tensor of a branch (packed blocks, fp8 + scales, plain parameters) wherever they are."""
    return sum(_nbytes(slot.get()) for slot in _slots(module))


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


# ---------------------------------------------------------------------------------------------------------------
# Planning: peak estimate and the "auto" choice (computed, not measured)


@dataclass(frozen=True)
class PeakEstimate:
    """Computed device memory of one image, by phase. All numbers are estimates from the shapes (docs/memory.md)."""

    mode: str
    width: int
    height: int
    text_tokens: int
    resident_weights: int  # stored bytes resident on the device for the whole run
    stream_window: int  # streamed units alive at once during a forward (copies in flight, computing, finishing)
    text_projection: int  # transient of project_text (features, their casts, the dense llm_cond_proj)
    denoise: int  # the busiest moment of the largest forward (activations, a dequantized weight)
    decode: int  # VAE weights + decode activations (0 when not given)

    @property
    def phases(self) -> dict[str, int]:
        base = self.resident_weights
        # Streamed blocks are in flight only while a branch runs its forward; project_text streams just the two text
        # modules (counted in text_projection when the conditional branch is streamed).
        return {
            "text_projection": base + self.text_projection,
            "denoise": base + self.stream_window + self.denoise,
            "decode": base + self.decode,
        }

    @property
    def total(self) -> int:
        return max(self.phases.values())

    def describe(self) -> str:
        phases = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.phases.items())
        return (f"{self.mode} {self.width}x{self.height}, {self.text_tokens} text tokens: peak {self.total / 2**30:.2f} "
                f"GiB ({self.total / 1e9:.2f} GB) computed; {phases}")


# Live activation tensors of one block at its busiest moments, in units of (rows x hidden x element size) on top
# of the residual stream h, read off dit.py's Block.forward and measured with a CPU allocation trace (fp32, hidden
# 1024, 1088 and 2432 rows: 12.25 units with h, independent of the row count; tests/models/test_residency.py keeps
# the estimate within 15 % of that trace):
# - rotating k: x, the qkv output (3), rotated q, normed k and the rotation's temporaries (x*cos, the half-rotated
#   copy, its product with sin, the sum), plus the contiguous copy rms_norm makes of the strided k view;
# - the qkv GEMM: x, the dense (dequantized) weight, the output (3);
# - the w3 GEMM: x, silu(w1 x), the dense weight, w3 x;
# - the SwiGLU product: x, silu(w1 x), w3 x and their product.
ROTATION_UNITS = 11.25
# plus a fixed allowance for small tensors (modulations, RoPE tables, latents, velocities) and library workspaces
# (cuBLAS keeps up to 32 MiB per stream).
FIXED_ALLOWANCE = 96 << 20


def _block_peak_bytes(config: Ideogram4Config, rows: int, element: int, residual_element: int,
                      dense_weights: bool) -> int:
    """Peak bytes one block allocates (residual stream included); dense_weights: the Linears expand their stored
    weights to the compute dtype in forward (quantized / fp8 storage)."""
    unit = rows * config.hidden_size * element
    ratio = config.intermediate_size / config.hidden_size
    weights = _linear_weights(config)
    transient = {name: n * element if dense_weights else 0 for name, n in weights.items()}
    moments = (
        ROTATION_UNITS * unit,
        (1 + 3) * unit + transient["qkv"],
        (1 + 2 * ratio) * unit + transient["w3"],
        (1 + 3 * ratio) * unit,
    )
    return int(rows * config.hidden_size * residual_element + max(moments))


def _linear_weights(config: Ideogram4Config) -> dict[str, int]:
    h, m, a = config.hidden_size, config.intermediate_size, config.adaln_dim
    return {"qkv": 3 * h * h, "o": h * h, "w1": m * h, "w3": m * h, "w2": h * m, "adaln_modulation": 4 * h * a}


def branch_parameters(config: Ideogram4Config, with_text: bool) -> tuple[int, int]:
    """(weights of the whole branch, weights of one block), counted on a meta-device model."""
    with torch.device("meta"):
        branch = Ideogram4DiT(config, with_text)
    total = sum(p.numel() for p in branch.parameters())
    return total, sum(p.numel() for p in branch.layers[0].parameters())


def estimate_peak_bytes(mode: str, config: Ideogram4Config, cond_bytes: int, uncond_bytes: int, width: int = 1024,
                        height: int = 1024, text_tokens: int = 512, *, compute_dtype=torch.bfloat16,
                        prefetch: int = DEFAULT_PREFETCH, vae_bytes: int = 0, vae_decode_bytes: int = 0,
                        feature_dtype=torch.float32) -> PeakEstimate:
    """Computed peak device memory of one image (batch 1) in an explicit memory mode.

    cond_bytes / uncond_bytes: stored bytes of the branches (`stored_bytes(branch)`; the unconditional branch has
    no llm_cond_* tensors). vae_bytes / vae_decode_bytes: the VAE's weights and decode activations (models/vae.py
    `estimate_decode_peak`), 0 to leave the decode out. The text features are assumed to arrive on the device in
    `feature_dtype`.
    """
    if mode not in STREAMED:
        raise ValueError(f"estimate_peak_bytes needs an explicit mode ({', '.join(STREAMED)}), got {mode!r}")
    element = torch.empty(0, dtype=compute_dtype).element_size()
    residual = 4 if compute_dtype == torch.float16 else element  # fp16 mode keeps the residual stream in float32
    image_rows = (width // 16) * (height // 16)
    streamed = STREAMED[mode]

    cond_weights, block_weights = branch_parameters(config, with_text=True)
    per_weight = {"cond": cond_bytes / cond_weights,
                  "uncond": uncond_bytes / branch_parameters(config, with_text=False)[0]}
    resident = sum(b for role, b in (("cond", cond_bytes), ("uncond", uncond_bytes)) if role not in streamed)
    branch_bytes = {"cond": cond_bytes, "uncond": uncond_bytes}
    windows = [min(int((prefetch + 2) * block_weights * per_weight[role]), branch_bytes[role]) for role in streamed]
    # cpu_offload: the host starts the unconditional branch's first copies while the conditional one's last
    # blocks still run, so both windows can be alive for a moment.
    window = sum(windows)

    # Stored weights smaller than the compute dtype (quantized, fp8) are expanded per Linear during forward.
    dense_weights = cond_bytes / cond_weights < element
    denoise = _block_peak_bytes(config, text_tokens + image_rows, element, residual, dense_weights)
    features = text_tokens * config.llm_features_dim
    feature_element = torch.empty(0, dtype=feature_dtype).element_size()
    projection = features * (feature_element + 2 * element)
    if dense_weights:
        projection += config.llm_features_dim * config.hidden_size * element
    if "cond" in streamed:
        projection += int(config.llm_features_dim * config.hidden_size * per_weight["cond"])
    return PeakEstimate(mode, width, height, text_tokens, resident + FIXED_ALLOWANCE, window, projection, denoise,
                        vae_bytes + vae_decode_bytes)


def resolve_memory_mode(mode: str, cond_branch, uncond_branch, device, free_bytes: int | None = None,
                        width: int = 1024, height: int = 1024, text_tokens: int = 512, **estimate_options) -> str:
    """The explicit mode for `mode`: itself, or for "auto" the first of gpu / stream_uncond / cpu_offload whose
    computed peak fits AUTO_HEADROOM of the free device memory (`free_bytes`, default: what CUDA reports free plus
    what these branches already hold on the device). On a CPU device "auto" is "gpu": everything stays resident.
    """
    check_memory_mode(mode)
    device = torch.device(device)
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "gpu"
    cond_bytes, uncond_bytes = stored_bytes(cond_branch), stored_bytes(uncond_branch)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
        free_bytes += sum(_nbytes(s.get()) for b in (cond_branch, uncond_branch) for s in _slots(b)
                          if s.get().device == device)
    estimate_options.setdefault("compute_dtype", cond_branch.compute_dtype)
    for candidate in ("gpu", "stream_uncond"):
        peak = estimate_peak_bytes(candidate, cond_branch.config, cond_bytes, uncond_bytes, width, height,
                                   text_tokens, **estimate_options)
        if peak.total <= AUTO_HEADROOM * free_bytes:
            return candidate
    return "cpu_offload"


__all__ = [
    "DEFAULT_PREFETCH",
    "MEMORY_MODES",
    "BranchPlacement",
    "PeakEstimate",
    "Placement",
    "StreamStats",
    "branch_parameters",
    "check_memory_mode",
    "estimate_peak_bytes",
    "place_branches",
    "resolve_memory_mode",
    "stored_bytes",
]
