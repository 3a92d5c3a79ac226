"""bench/bench_gguf_open.py: the files it times are what it says (a full two-branch table over a sparse data
region; a tokenizer-sized vocabulary), and both readers agree on them before anything is timed."""

import os

import bench_gguf_open
from gguf import GGUFReader
from ideogram4_gguf.quant_tools.gguf_file import GGUFHeader
from ideogram4_gguf.quant_tools.layout import Ideogram4Config


def test_the_dit_file_has_the_full_table_over_a_sparse_data_region(tmp_path):
    path = bench_gguf_open.dit_file(tmp_path / "dit.gguf")
    header = GGUFHeader(path)
    config = Ideogram4Config()
    assert len(header.tensors) == len(config.tensor_shapes(True)) + len(config.tensor_shapes(False))
    assert sum(t.nbytes for t in header.tensors.values()) > 10e9  # the full-size Q4_K file's data
    assert os.stat(path).st_blocks * 512 < 10e6  # ... of which only the header is on disk
    bench_gguf_open.check_same(path)


def test_the_text_encoder_file_holds_the_real_vocabulary(tmp_path):
    path = bench_gguf_open.text_encoder_file(tmp_path / "te.gguf")
    metadata = GGUFHeader(path).metadata
    assert len(metadata["tokenizer.ggml.tokens"]) == 151_643 and len(metadata["tokenizer.ggml.merges"]) > 150_000
    assert metadata["tokenizer.ggml.tokens"][:3] == GGUFReader(path).fields["tokenizer.ggml.tokens"].contents(
        slice(0, 3))
