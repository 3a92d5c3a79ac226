"""The gguf pin (pyproject.toml, requirements.txt) against what the pack overrides in gguf-py.

The reader behind `ops.open_gguf` subclasses gguf-py's `GGUFReader` and overrides private methods for speed: `_get`
(a view of the mapped file) and `_get_field_parts` (one metadata value, arrays in one go). The tests take that class
from a file the pack opened, wherever it is defined. Private methods can change in any gguf release, so these tests
hold the overrides to the installed gguf-py:
- upstream's signatures and class attributes are still what the overrides assume, and upstream's parser still calls
  the overridden methods (else the override is dead code and the fast path silently gone);
- on real files -- the demo's DiT GGUF (written by quant_tools) and text-encoder GGUF (a tokenizer's string and
  number arrays), and gguf-py-written files with every metadata type, empty and nested arrays, a big-endian one --
  each overridden method returns what upstream's returns for the same arguments (the same views; for a metadata
  value the same values from the same bytes, cut into parts differently where nothing reads the parts:
  `_assert_same_value`), and the whole reader builds the same fields, tensors and views of the same bytes.
Upgrading gguf: run these with the new release; when only the pin test fails, move the pin in both files.
"""

import inspect
import re
from importlib.metadata import version

import numpy as np
import pytest
import tomllib
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from ideogram4_gguf.errors import GGUFFormatError
from ideogram4_gguf.ops import open_gguf
from packaging.specifiers import SpecifierSet

from ..conftest import ROOT
from .conftest import random_blocks

SCALARS = [t for t in GGUFValueType if t not in (GGUFValueType.STRING, GGUFValueType.ARRAY)]
SCALAR_VALUES = {
    GGUFValueType.UINT8: [0, 7, 255], GGUFValueType.INT8: [-128, 0, 127], GGUFValueType.UINT16: [1, 65535],
    GGUFValueType.INT16: [-32768, 5], GGUFValueType.UINT32: [3, 2**32 - 1], GGUFValueType.INT32: [-(2**31), 9],
    GGUFValueType.FLOAT32: [0.5, -1e-7, float("nan"), float("inf")], GGUFValueType.UINT64: [2**64 - 1, 0],
    GGUFValueType.INT64: [-(2**63), 2**40], GGUFValueType.FLOAT64: [1e308, -0.0], GGUFValueType.BOOL: [True, False],
}


# ---------------------------------------------------------------------------------------------------------------
# The pin itself


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
# What the overrides assume of GGUFReader

# The upstream methods the pack's reader may override, and what their signatures are in the pinned releases.
EMPTY = inspect.Parameter.empty
UPSTREAM_SIGNATURES = {
    "_get": [("self", EMPTY), ("offset", EMPTY), ("dtype", EMPTY), ("count", 1), ("override_order", None)],
    "_get_field_parts": [("self", EMPTY), ("orig_offs", EMPTY), ("raw_type", EMPTY)],
}


@pytest.fixture(scope="module")
def reader_class(demo_models):
    """The GGUFReader subclass the pack parses with, taken from a file it opened."""
    cls = type(open_gguf(demo_models.dit)._reader)
    assert issubclass(cls, GGUFReader) and cls is not GGUFReader
    return cls


def _overridden(cls) -> set[str]:
    below = cls.__mro__[:cls.__mro__.index(GGUFReader)]
    return {name for klass in below for name, value in vars(klass).items()
            if callable(value) and name in vars(GGUFReader)}


def _parameters(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_override_is_one_these_tests_compare(reader_class):
    overridden = _overridden(reader_class)
    assert overridden, "the pack's reader overrides nothing of gguf-py any more: this test file and the pin can go"
    assert overridden <= set(UPSTREAM_SIGNATURES), (
        f"{sorted(overridden - set(UPSTREAM_SIGNATURES))}: a new override of gguf-py; compare it with upstream here")


def test_upstream_signatures_are_what_the_overrides_take(reader_class):
    for name in _overridden(reader_class):
        assert _parameters(getattr(GGUFReader, name)) == UPSTREAM_SIGNATURES[name], name
        assert _parameters(getattr(reader_class, name)) == UPSTREAM_SIGNATURES[name], name


def test_upstream_attributes_are_what_the_overrides_read(tmp_path):
    # _get: self.data (the np.memmap of the file) and self.byte_order; _get_field_parts: gguf_scalar_to_np
    assert GGUFReader.byte_order == "I"
    assert set(GGUFReader.gguf_scalar_to_np) == set(SCALARS)
    assert all(issubclass(t, np.generic) for t in GGUFReader.gguf_scalar_to_np.values())
    assert "_plain" not in vars(GGUFReader)  # the name the override caches its ndarray view under is free
    reader = GGUFReader(_every_type_file(tmp_path, GGUFEndian.LITTLE))
    assert isinstance(reader.data, np.memmap) and reader.byte_order == "I" and "_plain" not in vars(reader)


def test_upstream_parser_still_calls_the_overrides(reader_class, tmp_path):
    calls = {"_get": 0, "array": 0}

    class Counting(reader_class):
        def _get(self, *args, **kwargs):
            calls["_get"] += 1
            return super()._get(*args, **kwargs)

        def _get_field_parts(self, orig_offs, raw_type):
            calls["array"] += raw_type == GGUFValueType.ARRAY
            return super()._get_field_parts(orig_offs, raw_type)

    reader = Counting(_every_type_file(tmp_path, GGUFEndian.LITTLE))
    arrays = sum(f.types[0] == GGUFValueType.ARRAY for f in reader.fields.values())
    assert arrays >= len(SCALARS) and calls["array"] >= arrays and calls["_get"] > len(reader.fields)


# ---------------------------------------------------------------------------------------------------------------
# Same results as upstream on real files


def _every_type_file(folder, endianess):
    """Every scalar type, strings, arrays of every type (strings, bytes, nested), custom alignment, tensors."""
    rng = np.random.default_rng(0)
    order = "big" if endianess == GGUFEndian.BIG else "little"
    path = folder / f"every-type-{order}.gguf"
    writer = GGUFWriter(str(path), "ideogram4", endianess=endianess)
    writer.add_custom_alignment(64)
    for vtype, values in SCALAR_VALUES.items():
        writer.add_key_value(f"scalar.{vtype.name.lower()}", values[0], vtype)
        writer.add_key_value(f"array.{vtype.name.lower()}", values, GGUFValueType.ARRAY, sub_type=vtype)
    writer.add_string("text.name", "Ünïcode \n with a newline")
    writer.add_array("array.strings", ["", "a", "<|im_end|>", "é" * 300])
    writer.add_array("array.bytes", b"\x00\x01\xff")
    writer.add_array("array.nested", [[1, 2], [3], [4, 5, 6]])
    writer.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.normal(size=(7,)).astype(np.float16))
    writer.add_tensor("q4_k", random_blocks(Q.Q4_K, 2, 512, rng), raw_dtype=Q.Q4_K)
    writer.add_tensor("q8_0", random_blocks(Q.Q8_0, 3, 64, rng), raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _with_empty_arrays(folder):
    """A little-endian file with empty arrays (a number array and a string array), which gguf-py cannot write."""
    from gguf_fuzz import ARR, KV, STR, U32, Layout, enc_array

    source = _every_type_file(folder, GGUFEndian.LITTLE)
    layout = Layout.parse(source.read_bytes())
    layout.kvs += [KV(b"array.empty_u32", ARR, enc_array(U32, [])), KV(b"array.empty_strings", ARR,
                                                                         enc_array(STR, []))]
    path = folder / "empty-arrays.gguf"
    path.write_bytes(layout.to_bytes())
    return path


@pytest.fixture(params=["demo-dit", "demo-text-encoder", "every-type", "empty-arrays", "big-endian"])
def real_file(request, demo_models, tmp_path):
    return {
        "demo-dit": lambda: demo_models.dit,
        "demo-text-encoder": lambda: demo_models.text_encoder,
        "every-type": lambda: _every_type_file(tmp_path, GGUFEndian.LITTLE),
        "empty-arrays": lambda: _with_empty_arrays(tmp_path),
        "big-endian": lambda: _every_type_file(tmp_path, GGUFEndian.BIG),
    }[request.param]()


def _address(array, reader) -> int:
    """Where a view starts in the mapped file."""
    return array.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def _assert_same_view(ours, theirs, our_reader, their_reader, what):
    # the same bytes of the file, read as the same dtype (byte order included) and shape; ours are plain ndarray
    # views where upstream's are np.memmap slices, by design
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    assert ours.tobytes() == theirs.tobytes(), what
    assert _address(ours, our_reader) == _address(theirs, their_reader), what


def _outcome(get, *args):
    try:
        return get(*args)
    except Exception as exc:  # noqa: BLE001  (whatever upstream raises, the override must raise too)
        return type(exc)


def test_get_returns_upstreams_views(reader_class, real_file):
    reader = reader_class(real_file)
    size = reader.data.size
    cases = [(0, np.uint32, 1, "<"), (4, np.uint32, 1, None), (8, np.uint64, 2, None),
             (8, np.uint64, np.uint64(2), None), (24, np.uint8, 0, None), (25, np.int16, 3, None),
             (31, np.float32, 4, "S"), (24, np.uint8, 100, "I"), (reader.data_offset, np.float32, 5, None),
             (size - 3, np.uint8, 3, None), (size - 3, np.uint8, 9, None),  # a count past the end: a shorter view
             (size - 3, np.uint32, 1, None)]  # fewer bytes left than one item: both refuse
    for offset, dtype, count, order in cases:
        what = (offset, np.dtype(dtype).name, count, order)
        ours = _outcome(reader_class._get, reader, offset, dtype, count, order)
        theirs = _outcome(GGUFReader._get, reader, offset, dtype, count, order)
        if isinstance(theirs, type):
            assert ours is theirs, what
        else:
            _assert_same_view(ours, theirs, reader, reader, what)
    # the defaults
    _assert_same_view(reader._get(16, np.uint64), GGUFReader._get(reader, 16, np.uint64), reader, reader, "defaults")


def _assert_same_value(ours, theirs, our_reader, their_reader, what):
    """Two (parts, data indices) decompositions of one metadata value: the same values read from the same bytes.

    The override cuts a value differently where nothing reads the pieces (`ReaderField.contents()` reads the data
    parts only): a number array is one view of all its items where gguf-py has one view per item, and a string's
    length is its 8 raw bytes where gguf-py has one uint64. So the parts that hold no data (types, counts, string
    lengths) are compared as the same bytes at the same place in the file, one by one, and the data parts as what
    they decode to: dtype, bytes, values, and where in the file they start."""
    (our_parts, our_idxs), (their_parts, their_idxs) = ours, theirs
    # (an empty number array: the override also keeps the empty view of its items, which holds no bytes)
    our_rest = [p for i, p in enumerate(our_parts) if i not in set(our_idxs) and p.nbytes]
    their_rest = [p for i, p in enumerate(their_parts) if i not in set(their_idxs) and p.nbytes]
    assert len(our_rest) == len(their_rest), what
    for index, (a, b) in enumerate(zip(our_rest, their_rest)):
        assert a.tobytes() == b.tobytes(), (what, "header part", index)
        assert _address(a, our_reader) == _address(b, their_reader), (what, "header part", index)
    our_data, their_data = [our_parts[i] for i in our_idxs], [their_parts[i] for i in their_idxs]
    assert {p.dtype for p in our_data} == {p.dtype for p in their_data}, what
    assert b"".join(p.tobytes() for p in our_data) == b"".join(p.tobytes() for p in their_data), what
    assert repr([v for p in our_data for v in p.tolist()]) == repr([v for p in their_data for v in p.tolist()]), what
    if their_data:
        assert _address(our_data[0], our_reader) == _address(their_data[0], their_reader), what
    assert sum(p.nbytes for p in our_parts) == sum(p.nbytes for p in their_parts), what


def _assert_same_types(ours, theirs, what):
    # gguf-py takes an array's item type from its first item, so an empty array is typed [ARRAY] alone; the
    # override reads it from the header, [ARRAY, item type]. Both decode to [] (`contents()`), and nothing reads it.
    if theirs == [GGUFValueType.ARRAY]:
        assert ours[:1] == theirs and len(ours) <= 2, what
    else:
        assert ours == theirs, what


def test_get_field_parts_returns_upstreams_values(reader_class, real_file):
    reader = reader_class(real_file)
    assert reader.fields
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        key_bytes = 8 + len(field.name.encode())
        value_offset = field.offset + key_bytes + 4
        raw_type = int(reader._get(field.offset + key_bytes, np.uint32)[0])
        ours = reader_class._get_field_parts(reader, value_offset, raw_type)
        theirs = GGUFReader._get_field_parts(reader, value_offset, raw_type)
        # (bytes read, parts, data indices into parts, value types)
        assert ours[0] == theirs[0], field.name
        _assert_same_types(ours[3], theirs[3], field.name)
        _assert_same_value(ours[1:3], theirs[1:3], reader, reader, field.name)


def test_the_reader_builds_what_upstream_builds(reader_class, real_file):
    ours, theirs = reader_class(real_file), GGUFReader(real_file)
    assert (ours.byte_order, ours.endianess, ours.alignment, ours.data_offset) == \
        (theirs.byte_order, theirs.endianess, theirs.alignment, theirs.data_offset)
    assert list(ours.fields) == list(theirs.fields)
    for name, theirs_field in theirs.fields.items():
        ours_field = ours.fields[name]
        assert ours_field.offset == theirs_field.offset, name
        _assert_same_types(ours_field.types, theirs_field.types, name)
        _assert_same_value((ours_field.parts, ours_field.data), (theirs_field.parts, theirs_field.data), ours,
                           theirs, name)
        assert repr(ours_field.contents()) == repr(theirs_field.contents()), name  # repr: NaN equals NaN
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset, a.field.offset) == \
            (b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset, b.field.offset), a.name
        _assert_same_view(a.data, b.data, ours, theirs, a.name)


def test_the_files_hold_what_the_comparison_needs(demo_models, tmp_path):
    # the comparison above is only as good as its files: string and number arrays, both byte orders, empty arrays
    text_encoder = GGUFReader(demo_models.text_encoder)
    assert len(text_encoder.fields["tokenizer.ggml.tokens"].data) > 100
    assert GGUFReader(_every_type_file(tmp_path, GGUFEndian.BIG)).byte_order == "S"
    empty = GGUFReader(_with_empty_arrays(tmp_path))
    assert empty.fields["array.empty_u32"].contents() == [] and empty.fields["array.empty_strings"].contents() == []
    assert GGUFReader(demo_models.dit).tensors


def test_big_endian_files_are_refused_before_the_reader_runs(tmp_path):
    with pytest.raises(GGUFFormatError, match="big-endian"):
        open_gguf(_every_type_file(tmp_path, GGUFEndian.BIG))


def test_big_endian_string_arrays(reader_class, tmp_path):
    # (big-endian files are refused before the reader runs; the override still reads them like upstream)
    path = _every_type_file(tmp_path, GGUFEndian.BIG)
    assert reader_class(path).fields["array.strings"].contents() == GGUFReader(path).fields["array.strings"].contents()
