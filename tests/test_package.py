"""The pack as ComfyUI and pip see it: cheap, torch-free import; packaging metadata that comfy-cli accepts."""

import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

from .conftest import ROOT


def test_import_is_cheap_and_needs_neither_comfyui_nor_torch():
    probe = textwrap.dedent(f"""
        import importlib.util, sys, time
        start = time.perf_counter()
        spec = importlib.util.spec_from_file_location("ideogram4_gguf", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["ideogram4_gguf"] = mod
        spec.loader.exec_module(mod)
        assert callable(mod.comfy_entrypoint)
        assert not hasattr(mod, "NODE_CLASS_MAPPINGS"), "V3 packs must not also export V1 mappings"
        heavy = sorted(m for m in ("torch", "comfy", "comfy_api", "numpy", "gguf") if m in sys.modules)
        print(heavy)
    """)
    out = subprocess.check_output([sys.executable, "-c", probe], text=True).strip()
    assert out == "[]"


def test_pyproject_satisfies_comfy_node_validate():
    """What `comfy node validate` (comfy-cli 1.23) checks, plus the registry fields we rely on."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "ideogram4-gguf" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert comfy["DisplayName"] == "Ideogram 4 GGUF"
    # Publisher id, icon URL and repository URL are the publisher's to fill in (pyproject comment): nothing invented.
    assert comfy["PublisherId"] == "" and comfy["Icon"] == "" and "urls" not in project
    assert project["license"] == {"file": "LICENSE"} and "Apache License" in (ROOT / "LICENSE").read_text()
    assert re.fullmatch(r"(>=|<=|==|>|<|!=|~=)?\d+\.\d+\.\d+(,\s*(>=|<=|==|>|<|!=|~=)\d+\.\d+\.\d+)*",
                        comfy["requires-comfyui"])
    deps = " ".join(project["dependencies"]).lower()
    assert "torch" not in deps
    for needed in ("gguf", "numpy", "safetensors", "huggingface_hub", "tokenizers"):
        assert needed in deps
    requirements = (ROOT / "requirements.txt").read_text().lower()
    assert not re.search(r"^\s*torch", requirements, re.M)


def test_ruff_security_rules_of_comfy_node_validate():
    ruff = pytest.importorskip("ruff", reason="ruff is installed with the test extra")
    del ruff
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT), "--select", "S102,S307,E702",
                             "--output-format", "concise", "--no-cache"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_icon_is_an_svg_within_the_registry_size():
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "icon.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    width, height = float(root.get("width")), float(root.get("height"))
    assert 0 < width <= 800 and 0 < height <= 400
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
