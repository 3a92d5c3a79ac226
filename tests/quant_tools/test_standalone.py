"""quant_tools stands alone: it quantizes, inspects and verifies with torch made unimportable and nothing of the pack
loaded, although the runtime imports its layout, GGUF reader and `quote` (the pack's `errors.quote` is quant_tools'
own), so that what a file holds is worded the same everywhere."""

import subprocess
import sys
import textwrap


STANDALONE = textwrap.dedent("""
    import os, sys
    sys.modules["torch"] = None  # `import torch` anywhere now raises ImportError
    import numpy as np
    from safetensors.numpy import save_file

    from quant_tools.cli import main
    from quant_tools.layout import Ideogram4Config

    folder = sys.argv[1]
    source, out = os.path.join(folder, "cond.safetensors"), os.path.join(folder, "cond-q4_k.gguf")
    # a tiny branch straight from the tensor table (the release RoPE values fit head_dim 128)
    config = Ideogram4Config(hidden_size=256, num_layers=1, num_heads=2, head_dim=128, intermediate_size=256,
                             adaln_dim=256, in_channels=128, llm_features_dim=256)
    rng = np.random.default_rng(0)
    save_file({name: (rng.standard_normal(shape) * 0.02).astype(np.float32)
               for name, shape in config.tensor_shapes().items()}, source)
    assert main(["quantize", "--source", source, "--single-branch", "cond", "--out", out, "--no-progress"]) == 0
    assert main(["inspect", out]) == 0
    assert main(["verify", out, "--source", source, "--no-progress"]) == 0
    assert sys.modules["torch"] is None and not [m for m in sys.modules if m.startswith("torch.")]
    assert not [m for m in sys.modules if m.startswith("ideogram4_gguf")]
""")


def test_quantize_inspect_verify_without_torch(repo_root, tmp_path):
    result = subprocess.run([sys.executable, "-c", STANDALONE, str(tmp_path)], cwd=repo_root, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "verify ok" in result.stdout and "Q4_K" in result.stdout


def test_quote_is_the_packs_quote():
    # one function: the pack re-exports quant_tools' (its behaviour: tests/test_errors.py)
    from ideogram4_gguf.errors import QUOTE_LIMIT as PACK_LIMIT
    from ideogram4_gguf.errors import quote as pack_quote
    from ideogram4_gguf.quant_tools.errors import QUOTE_LIMIT, quote

    assert pack_quote is quote and PACK_LIMIT == QUOTE_LIMIT
