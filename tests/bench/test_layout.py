"""The benchmarks stand beside the pack, not in it (bench/README.md): plain modules that import the pack by its
installed name and each other as top-level modules; the pack never imports them and pip does not ship them."""

import ast
import pathlib

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
NOT_THE_PACK = {"bench", "tests", "docs", ".venv", ".git", "build", "dist"}


def _imports(path: pathlib.Path):
    """(module name, relative level) of every import in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def _pack_files():
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] not in NOT_THE_PACK and not parts[0].endswith(".egg-info"):
            yield path


def test_bench_is_not_a_package_and_ships_with_nothing():
    assert not (BENCH / "__init__.py").exists()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any("bench" in package for package in setuptools["packages"])
    assert not any("bench" in pattern for patterns in setuptools["package-data"].values() for pattern in patterns)


def test_bench_imports_the_pack_by_name_and_its_siblings_as_top_level_modules():
    siblings = {path.stem for path in BENCH.glob("*.py")}
    for path in BENCH.rglob("*.py"):
        source = path.read_text()
        assert "sys.path" not in source, f"{path.name} edits sys.path"
        for module, level in _imports(path):
            assert level == 0, f"{path.name}: relative import of {module!r}"
            assert "bench" not in module.split("."), f"{path.name}: imports {module!r} as a package"
            top = module.split(".")[0]
            assert top != "quant_tools" and top not in {"ops", "models", "sampler", "prompts", "nodes"}, (
                f"{path.name}: imports the pack's {module!r} without its name ideogram4_gguf")
    # a bench module never takes the name of a pack module: `import pipeline` must not be ambiguous
    pack_modules = {path.stem for path in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    assert not siblings & pack_modules, siblings & pack_modules


def test_the_pack_never_imports_the_benchmarks():
    bench_modules = {path.stem for path in BENCH.glob("*.py")}
    for path in _pack_files():
        for module, _ in _imports(path):
            parts = module.split(".")
            assert "bench" not in parts and parts[0] not in bench_modules, f"{path}: imports {module!r}"
