"""Fuzz the GGUF parsing end to end: mutants of the demo's DiT and text-encoder GGUFs never escape as raw exceptions.

Each case (tests/gguf_fuzz.py: bit flips, truncations, structured header / metadata / tensor-info mutations) is
loaded the way the pack loads such a file: `ops.open_gguf` and a few tensors dequantized; for the DiT
`load_dit_branches` and one tiny forward of both branches; for the text encoder `load_text_encoder`, the tokenizer
from its metadata and one tiny forward. Every outcome must be a successful load or a pack error that is a
`ValueError` subclass of `Ideogram4Error`, one line under 1,000 characters naming the file.

The default run (seeded, a few thousand cases) takes about a minute on two cores; set IDEOGRAM4_FUZZ_CASES (cases
per file kind) and IDEOGRAM4_FUZZ_SEED for a larger or different run.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections import Counter

import pytest
import torch
from gguf_fuzz import Base, classify, mutate, run_cases

SEED = int(os.environ.get("IDEOGRAM4_FUZZ_SEED", "20260611"))
CASES_PER_KIND = int(os.environ.get("IDEOGRAM4_FUZZ_CASES", "1200"))
WORKERS = max(1, min(4, os.cpu_count() or 1))

DIT_KEYS = [f"ideogram4.{k}".encode() for k in (
    "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size", "adaln_dim", "in_channels",
    "llm_features_dim", "rope_theta", "mrope_section", "norm_eps", "branches", "branch_prefixes")] + [
    b"general.architecture", b"general.alignment"]
TE_KEYS = [b"general.architecture", b"general.alignment", b"qwen3vl.rope.freq_base",
           b"qwen3vl.attention.layer_norm_rms_epsilon", b"tokenizer.ggml.model", b"tokenizer.ggml.pre",
           b"tokenizer.ggml.tokens", b"tokenizer.ggml.token_type", b"tokenizer.ggml.merges"]


def _load_dit(path):
    from ideogram4_gguf.models.dit_loader import load_dit_branches

    cond, uncond, info = load_dit_branches(path, compute_dtype=torch.float32)
    info.summary()
    grid, config = (2, 2), cond.config
    latents = torch.zeros(1, grid[0] * grid[1], config.in_channels)
    t = torch.tensor([0.5])
    cond(latents, t, cond.project_text(torch.zeros(3, config.llm_features_dim)), grid)
    uncond(latents, t, None, grid)


def _load_text_encoder(path):
    from ideogram4_gguf.models.text_encoder_loader import load_text_encoder
    from ideogram4_gguf.models.tokenizer import encode_prompt_ids, tokenizer_from_gguf_metadata

    encoder = load_text_encoder(path, compute_dtype=torch.float32)
    tokenizer = tokenizer_from_gguf_metadata(encoder.tokenizer_metadata, str(path))
    ids = encode_prompt_ids(tokenizer, "a poster that says HELLO")
    encoder([i % encoder.config.vocab_size for i in ids[:4]])


def _dequantize_some(gguf, rng):
    from ideogram4_gguf.ops import GGUFSource

    source = GGUFSource(gguf)
    names = sorted(gguf.tensors)
    for name in rng.sample(names, min(3, len(names))):
        source.tensor(name)


LOADERS = {"dit": _load_dit, "text_encoder": _load_text_encoder}


def _case_runner(bases, folder):
    from ideogram4_gguf.errors import Ideogram4Error
    from ideogram4_gguf.ops import open_gguf

    def run_one(case):
        kind, index = case
        torch.set_num_threads(1)
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")
        mutation, blob = mutate(bases[kind], SEED, index)
        path = os.path.join(folder, f"fuzz-{kind}-{index}.gguf")
        with open(path, "wb") as f:
            f.write(blob)
        verdict, detail = "ok", ""
        try:
            steps = (lambda: _dequantize_some(open_gguf(path), random.Random(index)), lambda: LOADERS[kind](path))
            for step in steps:
                try:
                    step()
                except BaseException as exc:  # noqa: BLE001 - classified below
                    verdict, detail = classify(exc, path, Ideogram4Error)
                    if verdict != "pack error":
                        break
        finally:
            os.unlink(path)
        return {"verdict": verdict, "detail": detail, "mutation": mutation}

    return run_one


def fuzz(demo_models, folder, cases_per_kind=CASES_PER_KIND, seed=SEED):
    """{(kind, index): result} for `cases_per_kind` mutants of each demo file."""
    bases = {
        "dit": Base("dit", demo_models.dit.read_bytes(), DIT_KEYS),
        "text_encoder": Base("text_encoder", demo_models.text_encoder.read_bytes(), TE_KEYS),
    }
    cases = [(kind, i) for i in range(cases_per_kind) for kind in bases]
    return run_cases(cases, _case_runner(bases, folder), workers=WORKERS)


def summarize(results) -> str:
    verdicts = Counter(r["verdict"] for r in results.values())
    lines = [f"{len(results)} cases: " + ", ".join(f"{v} {n}" for v, n in verdicts.most_common())]
    escapes = Counter((r["verdict"], r["detail"].split(":")[0]) for r in results.values()
                      if r["verdict"].startswith("escape"))
    for (verdict, where), n in escapes.most_common():
        example = next(f"{case} {r['mutation']}: {r['detail']}" for case, r in results.items()
                       if r["verdict"] == verdict and r["detail"].split(":")[0] == where)
        lines.append(f"  {n:5d} {verdict} at {where}  e.g. {example}")
    return "\n".join(lines)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="each batch runs in a forked, memory-limited child")
def test_mutated_gguf_files_load_or_raise_a_pack_error(demo_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # children are forked: no Rust thread pools there
    results = fuzz(demo_models, str(tmp_path))
    report = summarize(results)
    print(report)
    assert len(results) == 2 * CASES_PER_KIND
    escapes = [r for r in results.values() if r["verdict"] != "ok" and r["verdict"] != "pack error"]
    assert not escapes, report
    # the mutations reach past the container: some cases load, some fail in each loader
    verdicts = Counter(r["verdict"] for r in results.values())
    assert verdicts["ok"] > 0.05 * len(results) and verdicts["pack error"] > 0.3 * len(results)


if __name__ == "__main__":  # python tests/test_fuzz_gguf.py [cases per kind]: the report only
    import sys
    import tempfile
    import time

    import conftest  # noqa: F401 - imports this checkout as ideogram4_gguf
    from ideogram4_gguf.demo import build_demo_models

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    n = int(sys.argv[1]) if len(sys.argv) > 1 else CASES_PER_KIND
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        found = fuzz(build_demo_models(os.path.join(tmp, "models"), log=lambda *a: None), tmp, n)
        print(summarize(found))
        print(f"{time.perf_counter() - started:.1f} s")
