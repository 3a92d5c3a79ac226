"""The loaded Ideogram 4 DiT pair: both branches (packed, memory-mapped on the CPU), where they run, and their LoRAs.

`pipeline.load_model` builds it; `pipeline.sample_latents` places it (`place`: a memory mode of memory_plan.py,
carried out by residency.py) and runs the sampler on its branches with its LoRAs installed (models/lora.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .dit_loader import DiTLoadInfo
from .lora import BRANCH_CHOICES, LoraFile, LoraHandles, bind, install
from .memory_plan import estimate_peak_bytes, module_stored_bytes, resolve_memory_mode
from .residency import place_branches

logger = logging.getLogger(__name__)


@dataclass
class _Residency:
    placement: object = None  # residency.Placement while placed


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA file on one branch ("cond" / "uncond") at a strength."""

    lora: LoraFile
    strength: float
    branch: str


@dataclass(eq=False)  # identity semantics: hashable, so caches can hold it weakly
class Ideogram4Model:
    """Both DiT branches, loaded packed on the CPU (memory-mapped GGUF), and where they run.

    Sampling places them on `device` in `memory_mode` (memory_plan.py / residency.py: both resident, the unconditional
    branch streamed layer by layer from pinned host memory, or both streamed); `offload()` undoes it. `loras` run
    beside the branches while sampling (lora.py); `with_lora` returns a model that shares the branches and
    their placement with this one.
    """

    cond_branch: torch.nn.Module
    uncond_branch: torch.nn.Module
    info: DiTLoadInfo
    device: torch.device
    memory_mode: str = "auto"
    loras: tuple[AppliedLora, ...] = ()
    residency: _Residency = field(default_factory=_Residency, repr=False)

    @property
    def placement(self):
        return self.residency.placement

    @placement.setter
    def placement(self, value):
        self.residency.placement = value

    def with_lora(self, lora: LoraFile, strength: float = 1.0, branch: str = "auto") -> Ideogram4Model:
        """This model plus a LoRA on `branch` ("auto": the branch the file was trained for; "both"); the
        branches, their placement and the packed weights are shared, nothing is merged."""
        if branch not in BRANCH_CHOICES:
            raise ValueError(f"LoRA branch must be one of {BRANCH_CHOICES}, got {branch!r}")
        if not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
        roles = ("cond", "uncond") if branch == "both" else (lora.branch if branch == "auto" else branch,)
        for role in roles:  # check the shapes now, not when sampling starts
            bind(lora, self.cond_branch if role == "cond" else self.uncond_branch, 1.0, f" ({role} branch)")
        return dataclasses.replace(self, loras=self.loras + tuple(AppliedLora(lora, strength, r) for r in roles))

    def lora_hooks(self) -> LoraHandles:
        """Install every LoRA's low-rank path on the placed branches (remove them with the returned handles)."""
        handles = LoraHandles()
        placement = self.placement
        for applied in self.loras:
            branch = self.cond_branch if applied.branch == "cond" else self.uncond_branch
            terms, _ = bind(applied.lora, branch, applied.strength)
            streamed = placement is not None and placement.is_streamed(applied.branch)
            install(terms, keep_on_device=not streamed, handles=handles)
        return handles

    def place(self, width: int = 1024, height: int = 1024, text_tokens: int = 512, free_bytes: int | None = None,
              make_room: Callable[[int], None] | None = None):
        """Place the branches for an image of this size (kept when the resolved mode is unchanged).

        make_room(bytes): called with the computed peak before anything moves (ComfyUI frees memory there)."""
        cond, uncond = self.cond_branch, self.uncond_branch
        mode = resolve_memory_mode(self.memory_mode, cond, uncond, self.device, free_bytes=free_bytes, width=width,
                                   height=height, text_tokens=text_tokens)
        if self.placement is not None and self.placement.mode == mode:
            return self.placement
        self.offload()
        if make_room is not None:
            make_room(self.peak_bytes(mode, width, height, text_tokens))
        self.placement = place_branches(cond, uncond, self.device, mode)
        logger.info("Ideogram 4 DiT: %s", self.placement.summary())
        return self.placement

    def peak_bytes(self, mode: str, width: int, height: int, text_tokens: int) -> int:
        """Computed device memory of one image in an explicit mode (docs/memory.md)."""
        return estimate_peak_bytes(mode, self.cond_branch.config, module_stored_bytes(self.cond_branch),
                                   module_stored_bytes(self.uncond_branch), width, height, text_tokens,
                                   compute_dtype=self.cond_branch.compute_dtype).total

    def offload(self) -> None:
        """Free the device copies (the packed weights stay memory-mapped on the CPU)."""
        if self.placement is not None:
            self.placement.release()
            logger.info("Ideogram 4 DiT: released its %s copies (memory mode %s)", self.placement.device,
                        self.placement.mode)
            self.placement = None

    def summary(self) -> str:
        where = self.placement.summary() if self.placement is not None else f"memory mode {self.memory_mode}"
        loras = "".join(f"; LoRA {Path(a.lora.path).name} x{a.strength:g} on {a.branch}" for a in self.loras)
        return f"{self.info.summary()}; runs on {self.device}, {where}{loras}"

    def __repr__(self):  # ComfyUI shows node inputs in error reports: one line, not two module trees
        return f"Ideogram4Model({self.summary()})"
