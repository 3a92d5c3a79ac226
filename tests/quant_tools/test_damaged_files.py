"""What quant_tools says about files that went wrong: a truncated GGUF given to `inspect`, and the `.partial` file a
run killed with SIGKILL leaves behind (the next run reports and removes it; a live run's is left alone)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from ideogram4_gguf.quant_tools.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def small_gguf(layouts, tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "small.gguf"
    assert main(["quantize", *layouts["fp16"], "--recipe", "q4_k", "--out", str(path), "--no-progress"]) == 0
    return path


@pytest.mark.parametrize("where", ["header", "metadata", "tensor table", "tensor data", "last byte"])
def test_inspect_says_a_truncated_file_is_truncated(capsys, small_gguf, tmp_path, where):
    import gguf

    data = small_gguf.read_bytes()
    reader = gguf.GGUFReader(small_gguf)
    first_info = min(field.offset for field in (t.field for t in reader.tensors))
    cut = {"header": 20, "metadata": first_info // 2, "tensor table": (first_info + reader.data_offset) // 2,
           "tensor data": (reader.data_offset + len(data)) // 2, "last byte": len(data) - 1}[where]
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(data[:cut])
    code, _, err = _run(capsys, "inspect", cut_file)
    assert code == 2 and f"{cut_file}: the file is truncated: " in err and "download or copy it again" in err
    assert "reshape" not in err and len(err.strip().splitlines()) == 1


def test_inspect_tells_damage_from_truncation(capsys, small_gguf, tmp_path):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = (77).to_bytes(4, "little")  # version 77: complete, but not a GGUF anyone reads
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    code, _, err = _run(capsys, "inspect", bad)
    assert code == 2 and "not a readable GGUF file" in err and "truncated" not in err


def test_a_stale_partial_file_is_reported_and_removed(capsys, layouts, tmp_path):
    out = tmp_path / "x.gguf"
    stale = tmp_path / "x.gguf.partial"
    stale.write_bytes(b"GGUF" + b"\0" * 5000)  # what a run killed midway leaves
    code, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress")
    assert code == 0
    assert f"found and removed a stale partial file {stale}" in err and "left by an interrupted run" in err
    assert out.read_bytes()[:4] == b"GGUF" and not stale.exists()


def test_a_partial_file_another_run_is_writing_is_left_alone(capsys, layouts, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="the lock is POSIX flock")
    out = tmp_path / "x.gguf"
    partial = tmp_path / "x.gguf.partial"
    with open(partial, "wb") as busy:
        busy.write(b"GGUF in progress")
        busy.flush()
        fcntl.flock(busy.fileno(), fcntl.LOCK_EX)
        code, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress")
    assert code == 2 and "being written by another quantize run" in err
    assert partial.read_bytes() == b"GGUF in progress" and not out.exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_after_sigkill_the_next_run_cleans_up(capsys, layouts, tmp_path, repo_root):
    # a real run, killed outright while it writes (its tensors slowed down so that it is caught midway)
    out = tmp_path / "x.gguf"
    code = ("import sys, time, runpy\n"
            "import quant_tools.build as build\n"
            "original = build._write_tensor\n"
            "def slow(*args):\n"
            "    for done in original(*args):\n"
            "        time.sleep(0.2)\n"
            "        yield done\n"
            "build._write_tensor = slow\n"
            "sys.argv = ['quant_tools', *sys.argv[1:]]\n"
            "runpy.run_module('quant_tools', run_name='__main__')\n")
    process = subprocess.Popen([sys.executable, "-c", code, "quantize", *layouts["fp16"], "--out", str(out),
                                "--no-progress"], cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "x.gguf.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 4096) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert partial.exists() and not out.exists()
    code, _, err = _run(capsys, "quantize", *layouts["fp16"], "--out", out, "--no-progress")
    assert code == 0 and f"found and removed a stale partial file {partial}" in err
    assert not partial.exists() and out.read_bytes()[:4] == b"GGUF"
