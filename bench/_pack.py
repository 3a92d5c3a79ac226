"""Import the checkout as `ideogram4_gguf` when a bench script runs from a source tree (no pip install)."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_pack():
    if "ideogram4_gguf" not in sys.modules:
        try:
            import ideogram4_gguf  # noqa: F401  (installed with pip)
            return sys.modules["ideogram4_gguf"]
        except ImportError:
            spec = importlib.util.spec_from_file_location(
                "ideogram4_gguf", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["ideogram4_gguf"] = module
            spec.loader.exec_module(module)
    return sys.modules["ideogram4_gguf"]
