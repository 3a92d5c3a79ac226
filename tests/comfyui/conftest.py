"""One headless ComfyUI (>= 0.25, CPU) for all real-ComfyUI tests, with the pack, the test-only probe pack and the
tiny demo models.

Enabled when COMFYUI_DIR points at a ComfyUI checkout (`make test-comfyui` unpacks and sets it up); ComfyUI runs in
COMFYUI_PYTHON (default: the `comfy_venv` beside the checkout if there is one, else this Python). Without
COMFYUI_DIR the tests skip -- except under `make test-comfyui` (IDEOGRAM4_REQUIRE_COMFYUI=1), where that fails.
"""

import os
import time

import pytest

from ..nodes.fake_comfy_api import install
from .comfy_server import ComfyServer, comfyui_version
from .harness import (
    COMFYUI_DIR,
    MIN_VERSION,
    PACK,
    PROBE_PACK,
    ROOT,
    comfy_python,
    tiny_files,
)

install()


def unavailable(reason: str):
    """Skip, except under `make test-comfyui` (IDEOGRAM4_REQUIRE_COMFYUI=1), where a missing ComfyUI is a failure."""
    if os.environ.get("IDEOGRAM4_REQUIRE_COMFYUI") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, demo_models, demo_lora):
    if not COMFYUI_DIR:
        unavailable("real-ComfyUI tests: set COMFYUI_DIR to a ComfyUI >= 0.25 checkout (and COMFYUI_PYTHON to the "
                    "Python that runs it), or run `make test-comfyui`")
    version = comfyui_version(COMFYUI_DIR)
    if version is None:
        unavailable(f"COMFYUI_DIR={COMFYUI_DIR} has no comfyui_version.py: not a ComfyUI checkout")
    if version < MIN_VERSION:
        unavailable(f"COMFYUI_DIR={COMFYUI_DIR} is ComfyUI {'.'.join(map(str, version))}; these tests need >= 0.25")
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / PROBE_PACK).symlink_to(ROOT / "tests" / "comfyui" / "probe_pack",
                                                    target_is_directory=True)
    for folder, path in tiny_files(demo_models, paths=True, lora=demo_lora).items():
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / path.name).symlink_to(path)
    server = ComfyServer(COMFYUI_DIR, comfy_python(), base, ["--preview-method", "latent2rgb"])
    started = time.monotonic()
    try:
        server.start()
        print(f"ComfyUI {'.'.join(map(str, version))} ({COMFYUI_DIR}) answered after "
              f"{time.monotonic() - started:.1f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.get("/object_info")
