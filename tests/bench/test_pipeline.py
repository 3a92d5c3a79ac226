"""The pipeline benchmark harness (bench/bench_pipeline.py) end to end on the CPU with the tiny synthetic model.

Checks that every field of the JSON is present and sane (it never asserts timings): positive times, a breakdown
that fits inside its step, streamed modes bit-identical to the resident one, bf16 dense within bf16 rounding of
Q4_K, memory numbers for every mode, the GPU targets reported as unmeasured on a CPU.
"""

import contextlib
import io
import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q

import bench_pipeline

MODES = ("gpu", "stream_uncond", "cpu_offload")


def run_tiny_bench(folder, *options) -> dict:
    """The benchmark on the tiny model on the CPU (one thread, 16 text tokens): its JSON, plus what it printed."""
    out = folder / f"out{len(list(folder.glob('out*.json')))}.json"
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            bench_pipeline.main(["--model", "tiny", "--device", "cpu", "--threads", "1", "--text-tokens", "16",
                           "--cache-dir", str(folder / "cache"), "--json", str(out), *options])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    report["_printed"] = printed.getvalue()
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_tiny_bench(tmp_path_factory.mktemp("bench"), "--repeats", "1", "--dequant-ahead")


def test_header_files_and_skips(report):
    assert report["schema"] == bench_pipeline.SCHEMA
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["options"]["model"] == "tiny" and report["options"]["width"] == 256
    assert report["files"]["q4_k"]["bytes"] > 0 and report["files"]["bf16"]["bytes"] > 0
    # bitsandbytes (a test dependency on Linux x86-64) runs NF4 on the CPU too; without it NF4 is skipped, saying why
    assert ("nf4" in report["steps"]) == (not any("NF4" in why for why in report["skipped"]))


def test_bandwidth_and_load(report):
    bandwidth = report["bandwidth"]
    assert bandwidth["copy_GBps"] > 0
    torch_kernel = bandwidth["kernels"]["torch"]
    assert torch_kernel["GBps"] > 0 and torch_kernel["pct_of_copy"] > 0 and torch_kernel["seconds"] > 0
    load = report["load"]
    assert 0 < load["open_s"] <= load["ready_s"] and load["warm_page_cache"] and load["mode"] == "gpu"
    assert set(load["modes"]) == {"gpu"} and load["modes"]["gpu"]["ready_s"] == load["ready_s"]  # CPU: one mode


def test_steps_and_breakdown(report):
    steps = report["steps"]
    assert set(steps) - {"nf4"} == {"q4_k", "bf16"} and set(steps["q4_k"]) == {*MODES, "gpu+ahead", "gpu+ahead-hi"}
    assert all(set(steps[fmt]) == {"gpu"} for fmt in steps if fmt != "q4_k")
    for fmt, runs in steps.items():
        for mode, run in runs.items():
            assert run["step_s"] > 0 and len(run["step_times_s"]) == 1
            b = run["breakdown"]
            parts = b["dequant_s"] + b["gemm_s"] + b["attention_s"]
            assert b["total_s"] > 0 and b["gemm_s"] > 0 and b["attention_s"] > 0
            assert parts <= b["total_s"] and b["rest_s"] >= 0
            assert abs(parts + b["rest_s"] - b["total_s"]) < 1e-9
            assert 0 < run["cond_forward_s"] and 0 < run["uncond_forward_s"]
            assert run["cond_forward_s"] + run["uncond_forward_s"] <= b["total_s"]
            # 2 blocks x 6 Linears + the others, per branch; attention once per block per branch
            assert b["calls"]["attention"] == 4 and b["calls"]["gemm"] > 20
            # NF4: bitsandbytes' fused 4-bit matmul is one GEMM call per Linear, its decode inside it
            assert (b["calls"]["dequant"] > 0) == (fmt == "q4_k")
    for mode in ("stream_uncond", "cpu_offload"):
        assert steps["q4_k"][mode]["streamed_bytes"]["uncond"] > 0
    comparisons = report["comparisons"]
    assert comparisons["q4_k/stream_uncond_vs_q4_k/gpu_latent_rel_diff"] == 0
    assert comparisons["q4_k/cpu_offload_vs_q4_k/gpu_latent_rel_diff"] == 0
    # decoding the next Linear ahead (side stream on a GPU, in order here) hands every layer its own weight
    for label in ("gpu+ahead", "gpu+ahead-hi"):
        assert comparisons[f"q4_k/{label}_vs_q4_k/gpu_latent_rel_diff"] == 0
        assert steps["q4_k"][label]["decoded_ahead"] > 0
    # bf16 dense is the Q4_K file decoded and rounded to bf16: the same model up to that rounding
    assert 0 < comparisons["bf16/gpu_vs_q4_k/gpu_latent_rel_diff"] < 0.02
    assert comparisons["q4_k_vs_bf16_step"] > 0 and comparisons["stream_uncond_slowdown"] > 0
    if "nf4" in steps:
        # NF4 re-quantizes the same weights (blocks of 64, one absmax each): close to Q4_K's model, not equal to it;
        # a wrong weight mapping would give a difference near sqrt(2)
        assert 0 < comparisons["nf4/gpu_vs_q4_k/gpu_latent_rel_diff"] < 0.5
        assert comparisons["q4_k_vs_nf4_step"] > 0


def test_memory_rows(report):
    measured = {r["mode"]: r for r in report["memory"]["measured"]}
    assert set(measured) == set(MODES)
    for row in measured.values():
        assert row["side"] == 256 and row["with_decode"]
        assert row["peak_bytes"] > row["transient_peak_bytes"] > 0 and row["weights_on_device_bytes"] > 0
    # streaming moves weights off the device
    assert measured["gpu"]["weights_on_device_bytes"] > measured["stream_uncond"]["weights_on_device_bytes"] > \
        measured["cpu_offload"]["weights_on_device_bytes"]
    full = {(r["mode"], r["side"]): r for r in report["memory"]["computed"] if r["for"].startswith("full-size")}
    assert set(full) == {(m, s) for m in MODES for s in (1024, 2048)}
    for side in (1024, 2048):
        assert full["gpu", side]["peak_bytes"] > full["stream_uncond", side]["peak_bytes"] > \
            full["cpu_offload", side]["peak_bytes"] > 0
        assert full["gpu", side]["peak_bytes"] > 10.4e9  # both Q4_K branches alone are 10.44 GB - llm_cond_* of uncond
    assert report["host"]["peak_rss_bytes"] > 0


def test_targets_are_unmeasured_on_the_cpu(report):
    statuses = {t["target"]: t["status"] for t in report["targets"]}
    assert len(statuses) == 6  # the two VRAM targets share one "unmeasured" row on a CPU
    assert not any(s in ("met", "missed") for s in statuses.values())
    nf4 = statuses.pop("Q4_K step / NF4 step")
    assert nf4.startswith("unmeasured") if "nf4" in report["steps"] else nf4 == "not run"
    assert all(s.startswith("unmeasured") for s in statuses.values())


def test_table_is_printed_last(report):
    text = report["_printed"]
    assert text.rstrip().splitlines()[-1].startswith("  GGUF open + model ready")
    for needed in ("q4_k   stream_uncond", "bf16   gpu", "bandwidth", "load:", "computed, full-size", "targets:"):
        assert needed in text


def test_triton_launch_sweep(monkeypatch, report):
    # On a GPU the bandwidth section also times every Triton launch shape; here the kernel runs under Triton's
    # interpreter on the CPU (tiny size, two shapes) to exercise that path and its equality check.
    pytest.importorskip("triton")
    from ideogram4_gguf.ops import triton_dequant

    import instrument

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_dequant._kernels.cache_clear()
    monkeypatch.setattr(instrument, "TRITON_LAUNCHES", ((None, 2, 2), ("gather", 4, 4)))
    plain = instrument.dequant_kernels
    monkeypatch.setattr(instrument, "dequant_kernels", lambda device: {
        **plain(device), "triton": lambda packed, shape, dtype: triton_dequant.dequantize(packed, Q.Q4_K, shape, dtype)})
    try:
        result = instrument.dequant_bandwidth(torch.device("cpu"), torch.bfloat16, rows=8, cols=1024, repeats=1)
    finally:
        triton_dequant._kernels.cache_clear()
    launches = result["triton_launches"]
    assert [(r["variant"], r["blocks_per_program"], r["num_warps"]) for r in launches] == [
        ("default", 2, 2), ("gather", 4, 4)]
    assert all(r["GBps"] > 0 and r["seconds"] > 0 for r in launches)
    best = result["triton_best_launch"]
    assert set(result["kernels"]) == {"torch", "triton"}  # what ships; the target is judged on these
    assert best["GBps"] == max(r["GBps"] for r in launches)
    assert best["default"] == ("default", triton_dequant.BLOCKS_PER_PROGRAM, triton_dequant.NUM_WARPS)
    # the table names the sweep's winner next to what ships
    text = bench_pipeline.table({**report, "bandwidth": result})
    assert f"Triton sweep (2 kernel x launch shapes): best {best['variant']} kernel" in text
    assert f"shipped: default, {triton_dequant.BLOCKS_PER_PROGRAM} x {triton_dequant.NUM_WARPS}" in text


def test_simulated_card_steers_the_decode_plan(tmp_path):
    # --card-gb: on a GPU the allocator is capped there; on any device the decode plans for what such a card has
    # left after the resident weights. A card just large enough for the tiny model's weights forces tiles.
    def memory_rows(*extra):
        (row,) = run_tiny_bench(tmp_path, "--sections", "memory", "--modes", "gpu", *extra)["memory"]["measured"]
        return row

    roomy, small = memory_rows(), memory_rows("--card-gb", "0.02")
    assert roomy["card_bytes"] is None and not roomy["decode_tiled"]
    assert small["card_bytes"] == 20_000_000
    # 0.9 x (card - resident weights) is what the decode may use
    assert small["decode_free_bytes"] == int(0.9 * (20_000_000 - small["weights_on_device_bytes"]))
    assert small["decode_tiled"] and small["decode_tile_px"] > 0
    assert small["decode_estimated_peak_bytes"] < roomy["decode_estimated_peak_bytes"]
