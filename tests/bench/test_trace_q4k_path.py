"""bench/trace_q4k_path.py: the traced Q4_K path reaches the dequant kernel through the layers docs/ARCHITECTURE.md
names, from `pipeline.load_model` or from the loader node, and counts only the pack's own files."""

import trace_q4k_path
from trace_q4k_path import trace


def test_the_trace_follows_the_q4k_path_to_the_dequant(demo_models):
    seen = trace(str(demo_models.dit))
    for layer in ("pipeline.py", "models/dit_loader.py", "models/dit.py", "ops/weights.py", "ops/linear.py",
                  "ops/dequant.py", "quant_tools/gguf_file.py", "quant_tools/layout.py"):
        assert seen.get(layer), layer
    assert not any(name.startswith((".venv", "tests", "bench", "..")) for name in seen)
    assert not any(name.startswith("nodes/") for name in seen)
    # the Q4_K decode itself ran (its per-block arithmetic lives in ops/dequant.py)
    assert len(seen["ops/dequant.py"]) >= 10


def test_the_trace_from_the_loader_node_adds_the_node_and_nothing_of_the_tests(demo_models, capsys):
    trace_q4k_path.main([str(demo_models.dit), "--from-node"])
    import json

    report = json.loads(capsys.readouterr().out)
    from_pipeline = trace(str(demo_models.dit))
    assert {"nodes/loader.py", "nodes/comfy_adapter.py"} <= set(report["per_file"])
    assert set(from_pipeline) <= set(report["per_file"])
    assert report["files"] == len(report["per_file"]) and report["lines"] == sum(report["per_file"].values())
    assert not any(name.startswith(("tests", "bench")) for name in report["per_file"])
