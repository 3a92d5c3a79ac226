"""The GGUF container: valid files open zero-copy; malformed ones raise GGUFFormatError, fast and small."""

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ideogram4_gguf.errors import GGUFFormatError
from ideogram4_gguf.ops import open_gguf

from ..conftest import ROOT
from gguf_files import write_gguf

from .conftest import random_blocks


@pytest.fixture
def valid_file(tmp_path, rng):
    tensors = {
        "layers.0.attention.qkv.weight": (Q.Q4_K, random_blocks(Q.Q4_K, 6, 512, rng)),
        "layers.0.feed_forward.w2.weight": (Q.Q8_0, random_blocks(Q.Q8_0, 4, 64, rng)),
        "input_proj.weight": (Q.F16, rng.normal(size=(8, 4)).astype(np.float16)),
        "input_proj.bias": rng.normal(size=(8,)).astype(np.float32),
        "final_layer.linear.weight": (Q.BF16, quants.quantize(rng.normal(size=(2, 32)).astype(np.float32), Q.BF16)),
    }
    path = write_gguf(tmp_path / "model.gguf", tensors, {"ideogram4.num_layers": 1, "note": "tëst",
                                                         "ideogram4.mrope_section": [24, 20, 20],
                                                         "tokenizer.ggml.tokens": ["a", "b", "<|im_end|>"]})
    return path, tensors


def test_opens_with_metadata_and_logical_shapes(valid_file):
    path, tensors = valid_file
    f = open_gguf(path)
    assert f.metadata["general.architecture"] == "ideogram4"
    assert f.metadata["ideogram4.num_layers"] == 1 and f.metadata["note"] == "tëst"
    assert f.metadata["ideogram4.mrope_section"] == [24, 20, 20]
    assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b", "<|im_end|>"]
    assert set(f.tensors) == set(tensors)
    qkv = f.tensors["layers.0.attention.qkv.weight"]
    assert qkv.qtype == Q.Q4_K and qkv.shape == (6, 512) and qkv.raw.dtype == torch.uint8
    assert qkv.raw.shape == (6, 2 * 144) and qkv.is_quantized
    assert torch.equal(qkv.raw, torch.from_numpy(tensors["layers.0.attention.qkv.weight"][1]))
    f16 = f.tensors["input_proj.weight"]
    assert f16.raw.dtype == torch.float16 and f16.shape == (8, 4)
    assert torch.equal(f16.raw, torch.from_numpy(tensors["input_proj.weight"][1]))
    bf16 = f.tensors["final_layer.linear.weight"]
    assert bf16.raw.dtype == torch.bfloat16 and bf16.shape == (2, 32)
    assert f.tensors["input_proj.bias"].raw.dtype == torch.float32


def test_tensors_are_zero_copy_views_of_the_mapping(valid_file):
    """Every tensor is a view of one memory map of the file, at its offset: no byte was copied."""
    from ideogram4_gguf.quant_tools.gguf_file import GGUFFile as ToolFile

    path, _ = valid_file
    f = open_gguf(path)
    offsets = {t.name: t.offset for t in ToolFile(path).tensors}
    starts = {t.raw.data_ptr() - offsets[name] for name, t in f.tensors.items()}
    assert len(starts) == 1  # one mapping, each tensor at its own offset in it
    (start,) = starts
    mapped = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
    ranges = [tuple(int(x, 16) for x in fields[0].split("-")) for fields in mapped]
    for name, t in f.tensors.items():
        assert any(lo <= t.raw.data_ptr() and t.raw.data_ptr() + t.nbytes <= hi for lo, hi in ranges), name
    assert any(lo == start for lo, _ in ranges)  # the mapping starts at the file's first byte


def _corrupt(path, tmp_path, name, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


def _header_end(path):
    """Byte offset where the tensor data begins (past the tensor infos and their padding)."""
    from ideogram4_gguf.quant_tools.gguf_file import GGUFFile as ToolFile

    return min(t.offset for t in ToolFile(path).tensors)


MALFORMED = {
    "not_gguf": lambda d: d.__setitem__(slice(0, 4), b"GGML"),
    "version": lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 99)),
    "big_endian": lambda d: d.__setitem__(slice(4, 8), struct.pack(">I", 3)),
    "huge_tensor_count": lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 60)),
    "huge_kv_count": lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", (1 << 64) - 1)),
    "huge_key_length": lambda d: d.__setitem__(slice(24, 32), struct.pack("<Q", 1 << 40)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header(case, valid_file, tmp_path):
    path, _ = valid_file
    bad = _corrupt(path, tmp_path, f"{case}.gguf", MALFORMED[case])
    with pytest.raises(GGUFFormatError, match=str(bad.name)):
        open_gguf(bad)


def _find(data, needle):
    index = bytes(data).find(needle)
    assert index > 0
    return index


def test_array_count_beyond_the_file(tmp_path, rng):
    # gguf-py alone would loop (and grow lists) for 2**62 iterations on this
    path = write_gguf(tmp_path / "a.gguf", {"w": rng.normal(size=(4,)).astype(np.float32)},
                      {"big.array": [1.0, 2.0, 3.0]})
    def edit(d):
        at = _find(d, b"big.array") + len(b"big.array") + 4 + 4  # key, value type, item type
        d[at:at + 8] = struct.pack("<Q", 1 << 62)
    bad = _corrupt(path, tmp_path, "array.gguf", edit)
    with pytest.raises(GGUFFormatError, match="big.array"):
        open_gguf(bad)


def test_unknown_type_and_bad_shapes(valid_file, tmp_path):
    path, _ = valid_file
    name = b"layers.0.attention.qkv.weight"

    def info_at(d):
        return _find(d, name) + len(name)  # then: n_dims u32, dims u64 x n, type u32, offset u64

    def unknown_type(d):
        at = info_at(d) + 4 + 16
        d[at:at + 4] = struct.pack("<I", 77)

    def bad_row(d):
        at = info_at(d) + 4
        d[at:at + 8] = struct.pack("<Q", 500)  # 500 values per row: not a multiple of 256

    def outside(d):
        at = info_at(d) + 4 + 16 + 4
        d[at:at + 8] = struct.pack("<Q", 1 << 40)

    def too_many_dims(d):
        at = info_at(d)
        d[at:at + 4] = struct.pack("<I", 1000)

    for label, edit, message in [
        ("type", unknown_type, "unknown ggml type id 77"),
        ("row", bad_row, "not a multiple of its block size 256"),
        ("outside", outside, "outside the file"),
        ("dims", too_many_dims, "1000 dimensions"),
    ]:
        bad = _corrupt(path, tmp_path, f"{label}.gguf", edit)
        with pytest.raises(GGUFFormatError, match=message):
            open_gguf(bad)


def test_truncated_anywhere(valid_file, tmp_path):
    path, _ = valid_file
    data = path.read_bytes()
    header_end = _header_end(path)
    cuts = sorted({0, 3, 10, 23, 40, header_end // 2, header_end - 3, header_end + 5, len(data) - 1})
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError):
            open_gguf(bad)


def test_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.ones(3)}, tmp_path / "model.safetensors")
    with pytest.raises(GGUFFormatError, match="safetensors"):
        open_gguf(tmp_path / "model.safetensors")
    with pytest.raises(GGUFFormatError, match="not found"):
        open_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GGUFFormatError, match="folder"):
        open_gguf(tmp_path)
    assert issubclass(GGUFFormatError, ValueError)


def test_opening_a_10_gb_file_reads_almost_nothing(tmp_path):
    """A sparse 10 GB GGUF (header written, data left as holes): RSS must not grow by more than ~200 MB."""
    script = textwrap.dedent(f"""
        import sys, gguf, numpy as np
        sys.path.insert(0, {str(ROOT.parent)!r})
        path = sys.argv[1]
        writer = gguf.GGUFWriter(path, "ideogram4")
        rows, cols = 4608, 53248  # llm_cond_proj-sized Q4_K tensors, 138 MB each
        nbytes = rows * cols // 256 * 144
        for i in range(72):
            writer.add_tensor_info(f"layers.{{i}}.w.weight", (rows, cols // 256 * 144), np.dtype(np.uint8),
                                   nbytes, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_ti_data_to_file()
        end = writer.fout[0].tell()
        writer.fout[0].close()
        size = -(-end // 32) * 32 + 72 * nbytes
        with open(path, "r+b") as f:
            f.truncate(size)
        print(size)
    """)
    path = tmp_path / "big.gguf"
    size = int(subprocess.check_output([sys.executable, "-c", script, str(path)], text=True))
    assert size > 9.9e9
    probe = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("ideogram4_gguf", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["ideogram4_gguf"] = mod; spec.loader.exec_module(mod)
        from ideogram4_gguf.ops import open_gguf
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        f = open_gguf(sys.argv[1])
        assert len(f.tensors) == 72
        print(rss() - before)
    """)
    grown = int(subprocess.check_output([sys.executable, "-c", probe, str(path)], text=True))
    assert grown < 200e6, f"RSS grew by {grown / 1e6:.0f} MB"
    os.remove(path)


def test_metadata_equals_gguf_py_reader(tmp_path, rng):
    """The fast array path gives exactly gguf-py's field contents (numbers, strings, empty arrays)."""
    import gguf

    words = ["".join(chr(int(c)) for c in rng.integers(32, 0x2FF, size=rng.integers(0, 9))) for _ in range(500)]
    writer = gguf.GGUFWriter(str(tmp_path / "meta.gguf"), "qwen3vl")
    writer.add_array("tokenizer.ggml.tokens", words)
    writer.add_array("tokenizer.ggml.token_type", [int(x) for x in rng.integers(1, 6, size=500)])
    writer.add_array("scores", [float(x) for x in rng.normal(size=7)])
    writer.add_array("flags", [True, False, True])
    writer.add_float32("x.scale", 0.5)
    writer.add_uint64("x.count", 1 << 40)
    writer.add_string("x.name", "Ünïcode")
    writer.add_tensor("w", rng.normal(size=(3, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = open_gguf(tmp_path / "meta.gguf").metadata
    reference = gguf.GGUFReader(tmp_path / "meta.gguf")
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours == expected
    assert ours["tokenizer.ggml.tokens"] == words


def test_quant_tools_reads_the_same_header_and_words_the_same_errors(valid_file, tmp_path):
    """One reading layer: quant_tools' torch-free reader and ours give the same table, metadata and messages."""
    from ideogram4_gguf.quant_tools import QuantToolError
    from ideogram4_gguf.quant_tools.gguf_file import GGUFFile as ToolFile

    path, _ = valid_file
    ours, theirs = open_gguf(path), ToolFile(path)
    assert theirs.metadata == ours.metadata
    assert {t.name: (t.qtype, t.shape, t.nbytes) for t in theirs.tensors} == {
        t.name: (t.qtype.name, t.shape, t.nbytes) for t in ours.tensors.values()}
    cases = {"cut.gguf": (path.read_bytes()[:-3], "the file is truncated: tensor "),
             "v9.gguf": (b"GGUF" + struct.pack("<I", 9) + bytes(20), "not a readable GGUF file: it has GGUF version 9")}
    for name, (data, message) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(GGUFFormatError, match=message) as pack_error:
            open_gguf(bad)
        with pytest.raises(QuantToolError) as tool_error:
            ToolFile(bad)
        assert str(pack_error.value) == str(tool_error.value)


# ---------------------------------------------------------------------------------------------------------------
# What llama.cpp's reader checks too (ggml gguf.cpp gguf_init_from_file_impl), each as one short line


def _edited(path, tmp_path, name, edit):
    from gguf_fuzz import Layout

    layout = Layout.parse(path.read_bytes())
    edit(layout)
    out = tmp_path / name
    out.write_bytes(layout.to_bytes())
    return out


def _tensor(layout, name):
    return next(t for t in layout.tensors if t.name == name.encode())


def _set_dims(name, dims):
    return lambda layout: setattr(_tensor(layout, name), "dims", list(dims))


CONTAINER = {
    # a dimension >= 2^63 used to pass when another one was 0, and fail in dequantize (OverflowError)
    "int64 dimension": (_set_dims("input_proj.bias", (0, 1 << 63)), r"dimension of 9223372036854775808"),
    "huge extent of an empty tensor": (_set_dims("input_proj.bias", (0, 1 << 62, 4)), r"more than the whole file"),
    "quantized without dimensions": (_set_dims("layers.0.attention.qkv.weight", ()), r"has no dimensions"),
    "duplicate key": (lambda l: l.kvs.append(l.kvs[-1]), r"metadata key 'tokenizer\.ggml\.tokens' appears twice"),
    "duplicate tensor": (lambda l: setattr(l.tensors[1], "name", l.tensors[0].name),
                         r"tensor 'layers\.0\.attention\.qkv\.weight' appears twice"),
    "non-UTF-8 key": (lambda l: setattr(l.kvs[1], "key", b"bad\xff\xfekey"), r"a metadata key .* is not valid UTF-8"),
    "non-UTF-8 name": (lambda l: setattr(l.tensors[0], "name", b"\xc3("), r"a tensor name .* is not valid UTF-8"),
    "alignment of another type": (lambda l: l.kvs.append(__import__("gguf_fuzz").KV(b"general.alignment", 10,
                                                                                     struct.pack("<Q", 64))),
                                  r"general\.alignment has value type 10, not uint32"),
}


@pytest.mark.parametrize("case", list(CONTAINER))
def test_container_checks(case, valid_file, tmp_path):
    path, _ = valid_file
    edit, match = CONTAINER[case]
    bad = _edited(path, tmp_path, "bad.gguf", edit)
    with pytest.raises(GGUFFormatError, match=match) as info:
        open_gguf(bad)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message and len(message) < 1000


def test_long_names_are_quoted_short(valid_file, tmp_path):
    path, _ = valid_file
    long_name = b"layers.0." + b"x" * 65000

    def edit(layout):
        t = _tensor(layout, "layers.0.attention.qkv.weight")
        t.name, t.dims = long_name, [500, 6]  # and rows that are not whole blocks

    bad = _edited(path, tmp_path, "long.gguf", edit)
    with pytest.raises(GGUFFormatError, match=r"tensor 'layers\.0\.xxx+\.\.\. \(65009 characters\) \(Q4_K\) has rows") \
            as info:
        open_gguf(bad)
    assert len(str(info.value)) < 400


def test_undecodable_tensor_types_fail_at_load_naming_file_and_tensor(valid_file, tmp_path):
    from ideogram4_gguf.ops import GGUFSource

    path, _ = valid_file
    # the Q8_0 tensor's bytes relabelled as I8 (1 byte per element: 4 x 68 elements fit its 4 x 68 bytes)
    bad = _edited(path, tmp_path, "int.gguf", lambda l: (setattr(_tensor(l, "layers.0.feed_forward.w2.weight"),
                                                                 "qtype", 24),
                                                         _set_dims("layers.0.feed_forward.w2.weight", (68, 4))(l)))
    source = GGUFSource(open_gguf(bad))  # a file may hold such a tensor: only using it fails
    for use in (lambda: source.tensor("layers.0.feed_forward.w2.weight"),
                lambda: source.linear("layers.0.feed_forward.w2")):
        with pytest.raises(GGUFFormatError, match=r"int\.gguf: tensor 'layers\.0\.feed_forward\.w2\.weight' is "
                                                  r"stored as I8, which neither this pack nor gguf-py can decode"):
            use()
