"""The gguf pin (pyproject.toml, requirements.txt), and the pack's GGUF reader against gguf-py's.

The pack parses GGUF files itself (quant_tools/gguf_file.py: one bounds-checked pass) and takes only gguf-py's type
tables (`GGMLQuantizationType`, `GGML_QUANT_SIZES`, `GGUFValueType`) and, in quant_tools, its writer. These tests hold
the reader to gguf-py's `GGUFReader` on the installed release: on the demo's DiT GGUF (written by quant_tools), its
text-encoder GGUF (a tokenizer's string and number arrays) and gguf-py-written files with every metadata type,
custom alignment and empty arrays, every metadata value is what `ReaderField.contents()` gives, and every tensor has
the same type, shape, place in the file and bytes. Upgrading gguf: run these with the new release; when only the pin
test fails, move the pin in both files.
"""

import re
from importlib.metadata import version

import numpy as np
import pytest
import tomllib
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from ideogram4_gguf.errors import GGUFFormatError
from ideogram4_gguf.ops import open_gguf
from ideogram4_gguf.quant_tools.gguf_file import GGUFHeader
from packaging.specifiers import SpecifierSet

from ..conftest import ROOT
from .conftest import random_blocks

SCALAR_VALUES = {
    GGUFValueType.UINT8: [0, 7, 255], GGUFValueType.INT8: [-128, 0, 127], GGUFValueType.UINT16: [1, 65535],
    GGUFValueType.INT16: [-32768, 5], GGUFValueType.UINT32: [3, 2**32 - 1], GGUFValueType.INT32: [-(2**31), 9],
    GGUFValueType.FLOAT32: [0.5, -1e-7, float("nan"), float("inf")], GGUFValueType.UINT64: [2**64 - 1, 0],
    GGUFValueType.INT64: [-(2**63), 2**40], GGUFValueType.FLOAT64: [1e308, -0.0], GGUFValueType.BOOL: [True, False],
}


def test_gguf_is_pinned_the_same_in_both_files_and_installed_within_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pinned,) = [d for d in project["dependencies"] if re.match(r"gguf\b", d)]
    (listed,) = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                 if re.match(r"gguf\b", line)]
    assert pinned == listed
    spec = SpecifierSet(pinned.removeprefix("gguf"))
    assert {s.operator for s in spec} >= {">=", "<"}, f"{pinned}: both a lower and an upper bound"
    installed = version("gguf")
    assert installed in spec, (f"gguf {installed} is installed, outside the tested {pinned}: if every other test "
                               "here passes with it, move the pin in pyproject.toml and requirements.txt")


# ---------------------------------------------------------------------------------------------------------------
# Files


def _write(path, fill, endianess=GGUFEndian.LITTLE):
    writer = GGUFWriter(str(path), "ideogram4", endianess=endianess)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _every_type(writer, rng=None, nested=False):
    """Every scalar type and arrays of each, strings, a byte array, custom alignment, tensors of several types."""
    rng = rng or np.random.default_rng(0)
    writer.add_custom_alignment(64)
    for vtype, values in SCALAR_VALUES.items():
        writer.add_key_value(f"scalar.{vtype.name.lower()}", values[0], vtype)
        writer.add_key_value(f"array.{vtype.name.lower()}", values, GGUFValueType.ARRAY, sub_type=vtype)
    writer.add_string("text.name", "Ünïcode \n with a newline")
    writer.add_array("array.strings", ["", "a", "<|im_end|>", "é" * 300])
    writer.add_array("array.bytes", b"\x00\x01\xff")
    if nested:
        writer.add_array("array.nested", [[1, 2], [3], [4, 5, 6]])
    writer.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.normal(size=(7,)).astype(np.float16))
    writer.add_tensor("i32", rng.integers(-9, 9, size=(2, 3)).astype(np.int32))
    writer.add_tensor("q4_k", random_blocks(Q.Q4_K, 2, 512, rng), raw_dtype=Q.Q4_K)
    writer.add_tensor("q8_0", random_blocks(Q.Q8_0, 3, 64, rng), raw_dtype=Q.Q8_0)
    writer.add_tensor("bf16", rng.integers(0, 255, size=(4, 8), dtype=np.uint8), raw_dtype=Q.BF16)


def _with_empty_arrays(folder):
    """Empty arrays (a number array and a string array), which gguf-py cannot write."""
    from gguf_fuzz import ARR, KV, STR, U32, Layout, enc_array

    layout = Layout.parse(_write(folder / "source.gguf", _every_type).read_bytes())
    layout.kvs += [KV(b"array.empty_u32", ARR, enc_array(U32, [])),
                   KV(b"array.empty_strings", ARR, enc_array(STR, []))]
    path = folder / "empty-arrays.gguf"
    path.write_bytes(layout.to_bytes())
    return path


@pytest.fixture(params=["demo-dit", "demo-text-encoder", "every-type", "empty-arrays", "random-words"])
def real_file(request, demo_models, tmp_path, rng):
    def random_words(writer):
        words = ["".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, size=rng.integers(0, 12))) for _ in range(999)]
        writer.add_array("tokenizer.ggml.tokens", words)
        writer.add_array("tokenizer.ggml.scores", [float(x) for x in rng.normal(size=999)])
        _every_type(writer, rng)

    return {
        "demo-dit": lambda: demo_models.dit,
        "demo-text-encoder": lambda: demo_models.text_encoder,
        "every-type": lambda: _write(tmp_path / "every-type.gguf", _every_type),
        "empty-arrays": lambda: _with_empty_arrays(tmp_path),
        "random-words": lambda: _write(tmp_path / "words.gguf", random_words),
    }[request.param]()


# ---------------------------------------------------------------------------------------------------------------
# Same results as gguf-py


def test_the_reader_reads_what_gguf_py_reads(real_file):
    ours, theirs = GGUFHeader(real_file), GGUFReader(real_file)
    expected = {name: f.contents() for name, f in theirs.fields.items() if not name.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected)
    for name, value in expected.items():
        assert repr(ours.metadata[name]) == repr(value), name  # repr: the same types, and NaN equals NaN
    assert ours.alignment == theirs.alignment and ours.size == theirs.data.size
    assert [t.name for t in ours.tensors.values()] == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == Q(int(t.tensor_type)), t.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        assert (mine.offset, mine.nbytes) == (t.data_offset, t.n_bytes), t.name
        assert mine.data.dtype == np.uint8 and mine.data.tobytes() == t.data.tobytes(), t.name


def test_the_files_hold_what_the_comparison_needs(demo_models, tmp_path):
    # the comparison above is only as good as its files: a tokenizer vocabulary, every value type, empty arrays
    text_encoder = GGUFReader(demo_models.text_encoder)
    assert len(text_encoder.fields["tokenizer.ggml.tokens"].data) > 100
    every = GGUFReader(_write(tmp_path / "every.gguf", _every_type))
    types = {f.types[-1] for f in every.fields.values() if f.types}
    assert types >= set(SCALAR_VALUES) | {GGUFValueType.STRING}
    assert every.alignment == 64 and {Q(int(t.tensor_type)) for t in every.tensors} >= {Q.F32, Q.Q4_K, Q.BF16, Q.I32}
    empty = GGUFReader(_with_empty_arrays(tmp_path))
    assert empty.fields["array.empty_u32"].contents() == [] and empty.fields["array.empty_strings"].contents() == []
    assert GGUFReader(demo_models.dit).tensors


def test_a_string_that_is_not_utf8_reads_as_none_where_gguf_py_raises(tmp_path):
    path = _write(tmp_path / "latin1.gguf", lambda w: (w.add_string("ok", "fine"), _every_type(w)))
    word = "Ünïcode"
    data = path.read_bytes().replace(word.encode(), word.encode("latin-1").ljust(len(word.encode()), b"!"))
    data = data.replace("é".encode() * 300, b"\xe9" * 600)
    path.write_bytes(data)
    theirs = GGUFReader(path)
    for name in ("text.name", "array.strings"):
        with pytest.raises(UnicodeDecodeError):
            theirs.fields[name].contents()
    ours = GGUFHeader(path).metadata
    assert ours["text.name"] is None and ours["array.strings"] is None and ours["ok"] == "fine"


def test_nested_arrays_and_big_endian_files_are_refused(tmp_path):
    # llama.cpp refuses both (ggml gguf.cpp); gguf-py reads them, the pack says what it cannot read
    nested = _write(tmp_path / "nested.gguf", lambda w: _every_type(w, nested=True))
    with pytest.raises(GGUFFormatError, match=r"nested\.gguf: .*'array\.nested' is an array of type 9"):
        open_gguf(nested)
    big = _write(tmp_path / "big.gguf", _every_type, GGUFEndian.BIG)
    with pytest.raises(GGUFFormatError, match="big-endian"):
        open_gguf(big)
