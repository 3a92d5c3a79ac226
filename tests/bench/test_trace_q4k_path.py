"""bench/trace_q4k_path.py: the traced Q4_K path reaches the dequant kernel through the layers docs/ARCHITECTURE.md
names, and counts only the pack's own files."""

from trace_q4k_path import trace


def test_the_trace_follows_the_q4k_path_to_the_dequant(demo_models):
    seen = trace(str(demo_models.dit))
    for layer in ("pipeline.py", "models/dit_loader.py", "models/dit.py", "ops/weights.py", "ops/linear.py",
                  "ops/dequant.py", "quant_tools/gguf_file.py"):
        assert seen.get(layer), layer
    assert not any(name.startswith((".venv", "tests", "bench", "..")) for name in seen)
    # the Q4_K decode itself ran (its per-block arithmetic lives in ops/dequant.py)
    assert len(seen["ops/dequant.py"]) >= 10
