"""NF4 (bitsandbytes) version of a DiT branch, for the benchmark's NF4 comparison only (CUDA + bitsandbytes).

Every plain `nn.Linear` of a dense branch (loaded on the CPU from the bf16 folder) becomes a bitsandbytes
`Linear4bit` with quant_type "nf4" and the compute dtype of the branch; the weights are quantized when the layer
moves to the GPU (bitsandbytes' documented way: `load_state_dict` of the float weights, then `.to("cuda")`). Blocks of 64 weights
with an absmax each, no double quantization: the diffusers / transformers default (`bnb_4bit_use_double_quant=False`).
At more than one token per forward bitsandbytes decodes the 4-bit weight and multiplies (docs/spec.md §G6.2):
the same shape of work as our Q4_K path, which is why NF4 is the baseline the Q4_K timings are held against.
Older releases ran `dequantize_4bit` + `F.linear`; 0.50 runs one op, `torch.ops.bitsandbytes.gemm_4bit`, fused or
decode + `F.linear` by batch size, which the benchmark's breakdown splits accordingly (bench/instrument.py
`Breakdown._category`).

Everything else (norms, biases, the image indicator) moves to the device as it is. bitsandbytes >= 0.48 runs
these layers on the CPU as well, which is how CI exercises this module (tests/bench/test_pipeline.py); no machine
with a GPU has run it yet (docs/PERF.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def _no_random_init():
    """Construct Linears without their random initialisation: the weights are overwritten by load_state_dict
    right after, and initialising ~450 full-size float32 weights costs minutes on a small CPU (0.25 s each here)."""
    original = nn.Linear.reset_parameters
    nn.Linear.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters = original


def to_nf4(branch: nn.Module, device, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    device = torch.device(device)
    for name, module in list(branch.named_modules()):
        if type(module) is not nn.Linear:
            continue
        with _no_random_init():
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4")
        layer.load_state_dict(module.state_dict())  # the documented recipe: load the float weights, then move
        owner, _, attr = name.rpartition(".")
        setattr(branch.get_submodule(owner), attr, layer.to(device))  # quantization happens here
        del module
    # the rest (norm gains, biases of non-Linear modules, the image indicator) as it is
    for owner in branch.modules():
        if isinstance(owner, bnb.nn.Linear4bit):
            continue
        for key, param in list(owner._parameters.items()):
            if param is not None and param.device != device:
                owner._parameters[key] = nn.Parameter(param.data.to(device), requires_grad=False)
    return branch.eval()
