"""The issue-8 benchmark harness (bench/pipeline.py) end to end on the CPU with the tiny synthetic model.

Checks that every field of the JSON is present and sane (it never asserts timings): positive times, a breakdown
that fits inside its step, streamed modes bit-identical to the resident one, bf16 dense within bf16 rounding of
Q4_K, memory numbers for every mode, the GPU targets reported as unmeasured on a CPU.
"""

import contextlib
import io
import json

import pytest
import torch
from ideogram4_gguf.bench import pipeline

MODES = ("gpu", "stream_uncond", "cpu_offload")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            pipeline.main(["--model", "tiny", "--device", "cpu", "--threads", "1", "--repeats", "1", "--text-tokens",
                           "16", "--cache-dir", str(folder / "cache"), "--json", str(folder / "out.json")])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((folder / "out.json").read_text())
    report["_printed"] = printed.getvalue()
    return report


def test_header_files_and_skips(report):
    assert report["schema"] == pipeline.SCHEMA
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["options"]["model"] == "tiny" and report["options"]["width"] == 256
    assert report["files"]["q4_k"]["bytes"] > 0 and report["files"]["bf16"]["bytes"] > 0
    assert any("NF4" in why for why in report["skipped"])  # no CUDA here


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
    assert set(steps) == {"q4_k", "bf16"} and set(steps["q4_k"]) == set(MODES) and set(steps["bf16"]) == {"gpu"}
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
            assert (b["calls"]["dequant"] > 0) == (fmt == "q4_k")
    for mode in ("stream_uncond", "cpu_offload"):
        assert steps["q4_k"][mode]["streamed_bytes"]["uncond"] > 0
    comparisons = report["comparisons"]
    assert comparisons["q4_k/stream_uncond_vs_q4_k/gpu_latent_rel_diff"] == 0
    assert comparisons["q4_k/cpu_offload_vs_q4_k/gpu_latent_rel_diff"] == 0
    # bf16 dense is the Q4_K file decoded and rounded to bf16: the same model up to that rounding
    assert 0 < comparisons["bf16/gpu_vs_q4_k/gpu_latent_rel_diff"] < 0.02
    assert comparisons["q4_k_vs_bf16_step"] > 0 and comparisons["stream_uncond_slowdown"] > 0


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
    assert statuses["Q4_K step / NF4 step"] == "not run"
    assert all(s.startswith("unmeasured") for name, s in statuses.items() if "NF4" not in name)


def test_table_is_printed_last(report):
    text = report["_printed"]
    assert text.rstrip().splitlines()[-1].startswith("  GGUF open + model ready")
    for needed in ("q4_k   stream_uncond", "bf16   gpu", "bandwidth", "load:", "computed, full-size", "targets:"):
        assert needed in text
