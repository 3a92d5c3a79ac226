"""The Registry's own check of our packaging: comfy-cli's `comfy node validate` (pyproject, then ruff's security
rules) run on this checkout. comfy-cli comes from `make test-comfyui` (COMFY_CLI, its own cached venv)."""

import os
import subprocess

from .conftest import unavailable
from .harness import ROOT


def test_comfy_node_validate_passes(tmp_path):
    cli = os.environ.get("COMFY_CLI")
    if not cli:
        unavailable("COMFY_CLI is not set: run `make test-comfyui`, or point COMFY_CLI at a comfy-cli executable")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    # ruff must be on PATH for the security step (comfy-cli exits 1 without it); it sits beside comfy
    env["PATH"] = os.path.dirname(cli) + os.pathsep + env.get("PATH", "")
    result = subprocess.run([cli, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert "Warning" not in output and "warning" not in output, output
