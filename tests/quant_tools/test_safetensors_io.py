"""The numpy safetensors reader against torch + safetensors.torch (the files' writer and reference decoder)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ideogram4_gguf.quant_tools import QuantToolError
from ideogram4_gguf.quant_tools.safetensors_io import SafetensorsFile


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_float8_code_decodes_like_torch(tmp_path, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    save_file({"w": codes.view(dtype).reshape(16, 16)}, str(tmp_path / "f8.safetensors"))
    f = SafetensorsFile(tmp_path / "f8.safetensors")
    ours = f.read_f32("w").reshape(-1)
    reference = codes.view(dtype).float().numpy()
    assert np.array_equal(np.isnan(ours), np.isnan(reference))
    assert np.array_equal(ours[~np.isnan(ours)], reference[~np.isnan(reference)])
    f.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_types_and_row_ranges_decode_like_torch(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 23, generator=g) * 3).to(dtype)
    save_file({"a": torch.ones(3), "w": w, "s": torch.tensor(2.5)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.entries["w"].shape == (37, 23)
    assert np.array_equal(f.read_f32("w"), w.float().numpy())
    assert np.array_equal(f.read_f32("w", 5, 11), w[5:11].float().numpy())
    assert f.read_f32("s").shape == () and float(f.read_f32("s")) == 2.5
    f.close()


def test_truncated_file_is_refused(tmp_path):
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantToolError, match="truncated"):
        SafetensorsFile(tmp_path / "cut.safetensors")


def test_not_a_safetensors_file_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(QuantToolError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk.safetensors")
    header = b"{not json"
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(QuantToolError, match="header is not JSON"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_wrong_byte_count_in_header_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(60))
    with pytest.raises(QuantToolError, match="60 bytes for shape"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_unsupported_storage_names_the_tensor(tmp_path):
    save_file({"w": torch.ones(4, 4, dtype=torch.int8)}, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(tmp_path / "x.safetensors")
    with pytest.raises(QuantToolError, match="'w' is stored as I8"):
        f.read_f32("w")
    f.close()
