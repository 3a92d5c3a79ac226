"""docs/ARCHITECTURE.md's "may import" column, held to the code: every import of every pack module (read with ast,
function-level imports included) is checked against the layer table below, which mirrors the document's table;
nothing below nodes/ imports ComfyUI, and quant_tools/ and errors.py stay torch-free."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_THE_PACK = {"bench", "tests", "docs", "workflows", "web", "data", ".venv", ".git", "build", "dist"}

# ComfyUI's own node modules: they translate into ComfyUI core types (MODEL, SIGMAS, GUIDER, ...) or are the one
# place that talks to ComfyUI's runtime, so they may use the layers below the pipeline directly.
CORE_ADAPTERS = {"pipeline", "errors", "nodes", "ops", "models", "sampler"}

# importing module (or package) -> the pack modules it may import; a name stands for its submodules too, and the
# most specific key decides (`nodes.core_model` before `nodes`).
MAY_IMPORT = {
    "__init__": {"nodes"},
    "__main__": {"cli"},
    "errors": {"quant_tools.errors"},
    "download": {"errors"},
    "cli": {"pipeline", "errors", "demo", "download"},
    "demo": {"pipeline", "models", "prompts", "quant_tools", "errors"},
    "pipeline": {"errors", "ops", "models", "prompts", "sampler"},
    "ops": {"ops", "errors", "quant_tools.gguf_file"},
    "models": {"models", "ops", "errors", "quant_tools.layout", "quant_tools.gguf_file"},
    "prompts": {"prompts", "models", "errors"},
    "sampler": {"sampler", "models", "errors"},
    "nodes": {"nodes", "pipeline", "errors"},
    "nodes.comfy_adapter": CORE_ADAPTERS,
    "nodes.core_model": CORE_ADAPTERS,
    "nodes.core_graph": CORE_ADAPTERS,
    "quant_tools": {"quant_tools"},
}
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview", "node_helpers",
           "server", "execution", "nodes"}


def pack_modules() -> dict[str, pathlib.Path]:
    """Dotted name inside the pack ("models.vae", "nodes", "__init__") -> file."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in NOT_THE_PACK or parts[0].endswith(".egg-info") or "__pycache__" in parts:
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__") if name != "__init__" else name] = path
    return modules


MODULES = pack_modules()


def imports(name: str, path: pathlib.Path):
    """(pack module imported, line) for each relative import, and (top-level name, line) for each absolute one."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    relative, absolute = [], []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            absolute += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.append((node.module.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from ..quant_tools import layout` imports the module quant_tools.layout
                submodule = f"{target}.{alias.name}" if target else alias.name
                relative.append((submodule if submodule in MODULES else target, node.lineno))
    return relative, absolute


def rule(name: str) -> set[str]:
    keys = [key for key in MAY_IMPORT if name == key or name.startswith(key + ".")]
    assert keys, f"{name} is in no layer of the table: add it here and to docs/ARCHITECTURE.md"
    return MAY_IMPORT[max(keys, key=len)]


def allowed(target: str, permitted: set[str]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in permitted)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_relative_import_follows_the_layer_table(name):
    relative, _ = imports(name, MODULES[name])
    permitted = rule(name)
    wrong = sorted({f"{target} (line {line})" for target, line in relative if not allowed(target, permitted)})
    assert not wrong, f"{name} may import only {sorted(permitted)} (docs/ARCHITECTURE.md), but imports {wrong}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "nodes" and not n.startswith("nodes.")))
def test_nothing_below_the_nodes_imports_comfyui(name):
    _, absolute = imports(name, MODULES[name])
    assert not [(top, line) for top, line in absolute if top in COMFYUI], name


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n == "errors" or n.startswith("quant_tools")))
def test_errors_and_quant_tools_stay_torch_free(name):
    _, absolute = imports(name, MODULES[name])
    assert not [(top, line) for top, line in absolute if top in ("torch", "triton")], name


def test_the_table_is_the_documents():
    """Each row of docs/ARCHITECTURE.md's table names, in its "may import" column, exactly the pack modules the
    table above lets that file or folder import (names of other libraries in the column are not checked)."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tops = {name.split(".")[0] for name in MODULES} - {"__init__", "__main__"}
    rows = {}
    for line in doc.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            for path in re.findall(r"`([^`]+)`", cells[0]):
                rows[path] = {n for n in re.findall(r"`([^`]+)`", cells[2]) if n.split(".")[0] in tops}
    for key, permitted in MAY_IMPORT.items():
        path = key.replace(".", "/")
        row = rows.get(f"{path}/", rows.get(f"{path}.py"))
        assert row is not None, f"docs/ARCHITECTURE.md has no row for {path}/ or {path}.py"
        own = key.split(".")[0]  # a folder's modules import each other: the row does not say so
        assert row - {own} == permitted - {own}, (
            f"docs/ARCHITECTURE.md: {path} may import {sorted(row)}, the rule above says {sorted(permitted)}")
