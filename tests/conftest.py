"""Test set-up: import the checkout under test as `ideogram4_gguf`, whatever is installed.

The repository root is the package (ComfyUI loads it from custom_nodes/<folder>/), so a git worktree or a
clean clone would otherwise import whichever copy pip last installed in editable mode.
"""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Test-only data that is not part of the pack: the real Qwen tokenizer vocabulary (tests/data/README.md).
TEST_DATA = ROOT / "tests" / "data"
QWEN_TOKENIZER_DIR = TEST_DATA / "qwen25_tokenizer"


def qwen_tokenizer_dir() -> pathlib.Path:
    """The real Qwen tokenizer files; a checkout without them is broken, so this fails instead of skipping."""
    if not (QWEN_TOKENIZER_DIR / "vocab.json").is_file():
        pytest.fail(f"{QWEN_TOKENIZER_DIR} is missing: the test data is part of the repository (git checkout it)")
    return QWEN_TOKENIZER_DIR


def _import_checkout_as_package():
    existing = sys.modules.get("ideogram4_gguf")
    if existing is not None and pathlib.Path(existing.__file__).resolve().parent == ROOT:
        return
    spec = importlib.util.spec_from_file_location(
        "ideogram4_gguf", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["ideogram4_gguf"] = module
    spec.loader.exec_module(module)


_import_checkout_as_package()
# Shared test helpers (gguf_files, ...) import as top-level modules from every test folder.
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture
def interpreter(monkeypatch):
    """The Triton kernels under Triton's CPU interpreter (tests/ops, tests/bench). TRITON_INTERPRET is read when a
    kernel is defined, so the pack's cached kernels are rebuilt under it (and after the test); the benchmark's
    kernels are private copies per kind and need only the flag."""
    from ideogram4_gguf.ops import triton_dequant

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_dequant._kernels.cache_clear()
    yield
    triton_dequant._kernels.cache_clear()


@pytest.fixture
def rng():
    """A numpy Generator with a fresh seed each run; the seed is printed so a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % (1 << 32))
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def torch_gen(rng):
    """A torch CPU Generator seeded from `rng`."""
    import torch

    return torch.Generator().manual_seed(int(rng.integers(1 << 62)))


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """The tiny random-weight model set of `python -m ideogram4_gguf demo` (ComfyUI models/ layout)."""
    from ideogram4_gguf.demo import build_demo_models

    return build_demo_models(tmp_path_factory.mktemp("models"), log=lambda *a: None)


def write_lora_for(branch, path, rank=4, alpha=3.0, prefix="diffusion_model.", seed=0, scale=0.5):
    """An ai-toolkit-style LoRA (lora_down / lora_up / alpha) on every Linear of a loaded DiT branch."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in branch.named_modules():
        if name and hasattr(module, "in_features") and hasattr(module, "out_features"):
            tensors[f"{prefix}{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) / (
                module.in_features ** 0.5)
            tensors[f"{prefix}{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def demo_lora(demo_models, tmp_path_factory):
    """A tiny LoRA for the demo DiT's conditional branch (models/loras layout: a file name, in its own folder)."""
    from ideogram4_gguf.models.dit_loader import load_dit_branches

    cond, _, _ = load_dit_branches(demo_models.dit)
    folder = tmp_path_factory.mktemp("loras")
    return write_lora_for(cond, folder / "ideogram4-tiny-demo-lora.safetensors")
