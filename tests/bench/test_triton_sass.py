"""The Triton kernels, the shipped ones and the benchmark's variants, compiled for real NVIDIA targets on a machine
without a GPU (bench/triton_sass.py).

Triton compiles with its own bundled ptxas, so CI catches what the interpreter cannot: a kernel that does not
compile for an architecture, or a default Q4_K kernel that lost the design it was chosen for (vector nibble loads,
the hardware's bf16 conversion).
"""

import pytest

pytest.importorskip("triton")

import triton_sass  # noqa: E402
import triton_variants  # noqa: E402

KERNELS = triton_variants.load_kernels(interpret=False)
ARCHS = {"sm_80": 80, "sm_86": 86, "sm_90": 90}


def _compile(name, arch, output="bf16", **launch):
    try:
        return triton_sass.compile_kernel(getattr(KERNELS, name), arch, output, **launch)
    except triton_sass.CannotCompile as exc:
        pytest.skip(f"this Triton install cannot compile for NVIDIA GPUs here: {exc}")


def _ops(name, arch, **launch):
    try:
        return triton_sass.sass_ops(_compile(name, arch, **launch))
    except triton_sass.CannotCompile as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(triton_variants.KERNELS.values()))
def test_every_kernel_compiles_for_nvidia_targets(name, arch):
    for output in ("bf16", "fp32") if arch != "sm_86" else ("bf16", "fp16"):
        compiled = _compile(name, ARCHS[arch], output)
        assert compiled.asm["cubin"] and f".target {arch}" in compiled.asm["ptx"]


def test_default_q4_k_kernel_loads_nibbles_as_vectors_and_converts_natively():
    ops = _ops("q4_k", 90)
    assert any(op in ("LDG.E.64", "LDG.E.128") for op in ops), sorted(set(ops))
    assert any(op.startswith("F2FP.BF16") for op in ops)
    assert not any(op.startswith("FSETP.NAN") for op in ops)  # the interpreter's by-hand rounding is compiled out
    gather = _ops("q4_k_gather", 90)
    assert not any(op in ("LDG.E.64", "LDG.E.128") for op in gather)
    assert ops.count("LDG.E.U8") < gather.count("LDG.E.U8")


def test_cost_table_rows():
    try:
        row = triton_sass.kernel_cost(KERNELS, "q4_k", 90, blocks=8, warps=4)
    except triton_sass.CannotCompile as exc:
        pytest.skip(str(exc))
    assert row["instructions_per_thread"] > 0 and row["loads"] and row["stores"]
    assert row["warp_instructions_per_weight"] == pytest.approx(row["instructions_per_thread"] * 4 / (8 * 256))


def test_every_launch_shape_of_the_gpu_sweep_compiles():
    # the bandwidth stage times these on the GPU; a shape that does not compile would end that stage there
    from gguf import GGMLQuantizationType as Q

    from instrument import TRITON_LAUNCHES

    for variant, blocks, warps in TRITON_LAUNCHES:
        compiled = _compile(triton_variants.KERNELS[Q.Q4_K, variant], 90, blocks=blocks, warps=warps)
        assert compiled.asm["cubin"], (variant, blocks, warps)
