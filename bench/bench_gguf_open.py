"""GGUF open time: the pack's reader (quant_tools/gguf_file.py, one checked pass) next to gguf-py's `GGUFReader`.

Usage: python bench/bench_gguf_open.py [--repeats 5] [--folder DIR]

Writes two files the size of the real ones' headers and opens each with both readers in one process:
- a text-encoder-like GGUF: the real Qwen2.5 vocabulary (151,643 tokens + 151,387 merges, tests/data), token types,
  and one small tensor (the header is what costs: ~300 k metadata strings);
- a DiT-like GGUF: the full two-branch tensor table (916 Q4_K / F32 tensor infos at full size, 10.4 GB of data
  that is never written: a sparse file, so only the header is on disk).
Each reader's result is checked equal (metadata, tensor table, bytes of the small tensors) before it is timed.
Prints the best of --repeats in milliseconds.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from ideogram4_gguf.quant_tools.gguf_file import GGUFHeader
from ideogram4_gguf.quant_tools.layout import BRANCH_PREFIXES, Ideogram4Config

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "data" / "qwen25_tokenizer"


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def text_encoder_file(path):
    vocab = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.get)
    merges = [line for line in (TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    writer = GGUFWriter(str(path), "qwen3vl")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(merges)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32))
    _finish(writer)
    return path


def dit_file(path):
    """The real two-branch table; the data region is a hole (sparse file), sized past the last tensor."""
    writer = GGUFWriter(str(path), "ideogram4")
    config = Ideogram4Config()
    for role, prefix in BRANCH_PREFIXES.items():
        for name, shape in config.tensor_shapes(with_text=role == "conditional").items():
            quantized = len(shape) == 2 and shape[-1] % 256 == 0
            qtype = Q.Q4_K if quantized else Q.F32
            block, size = GGML_QUANT_SIZES[qtype]
            stored = (shape[0], shape[1] // block * size) if quantized else shape
            writer.add_tensor_info(prefix + name, stored, np.dtype(np.uint8 if quantized else np.float32),
                                   int(np.prod(shape)) // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    os.truncate(path, 11 << 30)  # 10.4 GB of tensors fit below this
    return path


def ours(path):
    return GGUFHeader(path)


def gguf_py(path):
    return GGUFReader(path)


def check_same(path):
    a, b = ours(path), gguf_py(path)
    expected = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert a.metadata == expected, path
    assert [(t.name, t.offset, t.nbytes) for t in a.tensors.values()] == \
        [(t.name, int(t.data_offset), int(t.n_bytes)) for t in b.tensors], path


def best_ms(fn, path, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", help="where to write the two files (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        files = {"text encoder (Qwen vocabulary)": text_encoder_file(folder / "te.gguf"),
                 "DiT (full two-branch table)": dit_file(folder / "dit.gguf")}
        for label, path in files.items():
            check_same(path)
            mine, theirs = best_ms(ours, path, args.repeats), best_ms(gguf_py, path, args.repeats)
            print(f"{label}: pack {mine:.1f} ms, gguf-py GGUFReader {theirs:.1f} ms ({theirs / mine:.1f}x)")


if __name__ == "__main__":
    main()
