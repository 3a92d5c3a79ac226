"""Peak resident memory of a quantize run stays far below the size of the model (streaming write).

The source holds one large tensor (llm_cond_proj, 256 x 425984 = 109 M weights: 436 MB in float32, 218 MB as
fp16 on disk). The child process's own peak RSS must stay below half the float32 size of that one tensor, which
a non-streaming writer would hold at least once. The peak is VmHWM from /proc/self/status, read inside the child:
getrusage's ru_maxrss would include the RSS of the forked pytest parent (Linux keeps it across execve).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

DIMS = dict(hidden=256, layers=1, head_dim=128, inter=512, adaln=256, in_channels=128, llm=13 * 32768)


def _shapes():
    h, a, m, llm = DIMS["hidden"], DIMS["adaln"], DIMS["inter"], DIMS["llm"]
    shapes = {"input_proj.weight": (h, DIMS["in_channels"]), "input_proj.bias": (h,),
              "llm_cond_norm.weight": (llm,), "llm_cond_proj.weight": (h, llm), "llm_cond_proj.bias": (h,),
              "t_embedding.mlp_in.weight": (h, h), "t_embedding.mlp_in.bias": (h,),
              "t_embedding.mlp_out.weight": (h, h), "t_embedding.mlp_out.bias": (h,),
              "adaln_proj.weight": (a, h), "adaln_proj.bias": (a,), "embed_image_indicator.weight": (2, h),
              "final_layer.linear.weight": (DIMS["in_channels"], h), "final_layer.linear.bias": (DIMS["in_channels"],),
              "final_layer.adaln_modulation.weight": (h, a), "final_layer.adaln_modulation.bias": (h,)}
    for i in range(DIMS["layers"]):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm1.weight": (h,), p + "attention_norm2.weight": (h,),
                       p + "ffn_norm1.weight": (h,), p + "ffn_norm2.weight": (h,),
                       p + "attention.norm_q.weight": (DIMS["head_dim"],), p + "attention.norm_k.weight": (DIMS["head_dim"],),
                       p + "attention.qkv.weight": (3 * h, h), p + "attention.o.weight": (h, h),
                       p + "feed_forward.w1.weight": (m, h), p + "feed_forward.w3.weight": (m, h),
                       p + "feed_forward.w2.weight": (h, m), p + "adaln_modulation.weight": (4 * h, a),
                       p + "adaln_modulation.bias": (4 * h,)})
    return shapes


def _write_fp16_safetensors(path, shapes, seed=0):
    """Stream a safetensors file without ever holding a big tensor in memory (header, then data in chunks)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            left = int(np.prod(shape))
            while left:
                n = min(left, 1 << 22)
                f.write((rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
                left -= n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_peak_rss_stays_below_one_tensor_in_float32(tmp_path, repo_root):
    shapes = _shapes()
    _write_fp16_safetensors(tmp_path / "cond.safetensors", shapes)
    recipe = json.loads((repo_root / "quant_tools" / "recipes" / "q8_0.json").read_text())
    recipe["rules"] = [{"pattern": r"\.weight$", "type": "Q8_0"}]  # fast encoder: the test is about memory
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    child = (
        "import sys\n"
        "from quant_tools.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "print('PEAK_RSS_KB', hwm)\n"
        "sys.exit(code)\n"
    )
    argv = ["quantize", "--source", str(tmp_path / "cond.safetensors"), "--single-branch", "cond",
            "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "big.gguf"), "--no-progress"]
    result = subprocess.run([sys.executable, "-c", child, *argv], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024
    big_tensor_f32_mb = 256 * 13 * 32768 * 4 / 2**20
    assert (tmp_path / "big.gguf").stat().st_size > 100e6
    assert peak_mb < 0.5 * big_tensor_f32_mb, f"peak RSS {peak_mb:.0f} MiB"
    print(f"peak RSS {peak_mb:.0f} MiB for a {big_tensor_f32_mb:.0f} MiB (float32) tensor")
