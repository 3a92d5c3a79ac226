"""bench/gpu/session.sh, the script a lent GPU machine runs: it must name files that exist and bench options
that parse, because a mistake there is found only on the GPU machine, where every minute counts."""

import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

import bench_pipeline

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu" / "session.sh"
TEXT = SCRIPT.read_text()

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_named_test_files_exist():
    named = re.findall(r"\btests/[\w/.]+", TEXT)
    assert "tests/ops/test_cuda_kernels.py" in named
    for path in named:
        assert (ROOT / path).exists(), path


def test_bench_stages_parse(tmp_path):
    stages = re.findall(r"^\s*(\w+)\) stage \w+ bench (.+?) ;;$", TEXT, flags=re.M)
    assert {name for name, _ in stages} == {"bandwidth", "q4k", "dense", "memory", "card12", "card8"}
    for name, args in stages:
        argv = shlex.split(args.replace("$RESULTS", str(tmp_path)))
        parsed = bench_pipeline._parse(argv)
        assert parsed.json == tmp_path / f"{name}.json"
    parse = {name: bench_pipeline._parse(shlex.split(args.replace("$RESULTS", str(tmp_path)))) for name, args in stages}
    assert set(parse["dense"].formats) == {"q4_k", "bf16", "nf4"}  # the baselines run beside Q4_K in one run
    # the VRAM targets: both branches resident on a 12 GB card, the unconditional one streamed on an 8 GB card
    assert (parse["card12"].modes, parse["card12"].card_gb, parse["card12"].memory_sizes) == (["gpu"], 12, [1024])
    assert (parse["card8"].modes, parse["card8"].card_gb) == (["stream_uncond"], 8)


def test_unknown_stage_is_refused(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "nonsense"], cwd=tmp_path, capture_output=True, text=True,
                         env={"OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "unknown stage nonsense" in run.stdout


def test_results_come_back_as_two_files(tmp_path):
    # a device call returns at most 8 files from $OUT: every stage's log and JSON travel in one archive
    import tarfile

    out, results = tmp_path / "out", tmp_path / "results"
    for _ in range(2):  # a second stage replaces the archive and keeps the first stage's files in it
        run = subprocess.run(["bash", str(SCRIPT), "env"], cwd=ROOT, capture_output=True, text=True,
                             env={"OUT": str(out), "RESULTS": str(results), "PATH": "/usr/bin:/bin", "PY": "true"})
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "stages.txt"]
    with tarfile.open(out / "results.tar.gz") as archive:
        names = {name.lstrip("./") for name in archive.getnames()}
    assert {"env.log", "stages.txt"} <= names
    assert (out / "stages.txt").read_text().count("=== env: rc 0") == 2


def test_the_checkout_is_the_pack_the_stages_import(tmp_path):
    # nothing installs the pack on the GPU machine: the script links the checkout in as `ideogram4_gguf`
    # (python -S: no site-packages, so an installed copy cannot answer instead)
    import sys
    import tarfile

    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -S -c 'import os, ideogram4_gguf; "
                    "print(\"PACK\", os.path.realpath(ideogram4_gguf.__path__[0]))'\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), "env"], cwd=ROOT, capture_output=True, text=True,
                         env={"OUT": str(out), "RESULTS": str(tmp_path / "results"), "TMPDIR": str(tmp_path),
                              "PATH": "/usr/bin:/bin", "PY": str(stub)})
    assert run.returncode == 0, run.stderr
    with tarfile.open(out / "results.tar.gz") as archive:
        log = archive.extractfile("./env.log").read().decode()
    assert f"PACK {ROOT.resolve()}" in log
