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

# Test-only data (the real Qwen tokenizer vocabulary, the official latent constants) lives beside the
# checkout in ../shared/data; a clone elsewhere can point IDEOGRAM4_SHARED_DATA at it.
def _find_shared_data():
    import os

    candidates = [os.environ.get("IDEOGRAM4_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"]
    for candidate in candidates:
        if candidate and pathlib.Path(candidate, "qwen25_tokenizer", "vocab.json").is_file():
            return pathlib.Path(candidate)
    return None


SHARED_DATA = _find_shared_data()


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
