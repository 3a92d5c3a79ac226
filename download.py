"""`python -m ideogram4_gguf download`: fetch the model files into ComfyUI's models/ layout.

Sources (Hugging Face):
- the two-branch Q4_K DiT: `transformerlab/ideogram-4-gguf-q4_k` (`ideogram4-q4_k.gguf`, 10.4 GB, public);
- the text encoder, tokenizer and VAE: the `text_encoder/`, `tokenizer/` and `vae/` folders of the gated base
  repo `ideogram-ai/ideogram-4-fp8` only (its two DiT folders are not needed with the GGUF).

The token comes from the environment (`HF_TOKEN`) or the `hf auth login` / `huggingface-cli login` store, as
huggingface_hub finds it. Sizes are listed before anything is fetched; interrupted downloads resume (files are
fetched through huggingface_hub's resumable `hf_hub_download`); files already complete are skipped.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError

DIT_REPO = "transformerlab/ideogram-4-gguf-q4_k"
DIT_FILE = "ideogram4-q4_k.gguf"
BASE_REPO = "ideogram-ai/ideogram-4-fp8"
BASE_PARTS = ("text_encoder/*", "tokenizer/*", "vae/*")
# Where the nodes look: the DiT in diffusion_models/, the rest under a folder per release.
BASE_FOLDER = "ideogram-4"


@dataclass(frozen=True)
class PlannedFile:
    repo: str
    filename: str  # path inside the repo
    size: int | None
    target: Path  # final path on disk

    @property
    def done(self) -> bool:
        return self.target.is_file() and self.size is not None and self.target.stat().st_size == self.size


def _destination(models_dir: Path, repo: str, filename: str) -> Path:
    if repo == DIT_REPO:
        return models_dir / "diffusion_models" / Path(filename).name
    folder = "vae" if filename.startswith("vae/") else "text_encoders"
    return models_dir / folder / BASE_FOLDER / filename


def _friendly(exc: Exception, repo: str) -> DownloadError:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return DownloadError(
            f"{repo} is gated and this Hugging Face account has no access yet. Open "
            f"https://huggingface.co/{repo}, accept the licence, then log in with `hf auth login` (or set "
            "HF_TOKEN) and run the command again.")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(
            f"{repo} was not found or needs a login: log in with `hf auth login` (or set HF_TOKEN); for the gated "
            f"base repo also accept its licence at https://huggingface.co/{repo}.")
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(f"Hugging Face refused {repo}: {exc}")
    if isinstance(exc, OSError):
        return DownloadError(f"could not reach Hugging Face for {repo} ({exc}); check the network and retry - "
                             "finished files are kept and partial ones resume.")
    return DownloadError(f"{repo}: {exc}")


def plan_downloads(models_dir, include_dit=True, include_base=True, api=None) -> list[PlannedFile]:
    """The files to fetch with their sizes (asks the Hub for the file list; no download yet)."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    models_dir = Path(models_dir)
    planned: list[PlannedFile] = []
    wanted = []
    if include_dit:
        wanted.append((DIT_REPO, (DIT_FILE,)))
    if include_base:
        wanted.append((BASE_REPO, BASE_PARTS))
    for repo, patterns in wanted:
        try:
            info = api.model_info(repo, files_metadata=True)
        except Exception as exc:  # huggingface_hub raises many types; turn each into a message with the fix
            raise _friendly(exc, repo) from exc
        for sibling in info.siblings or []:
            if any(fnmatch.fnmatch(sibling.rfilename, p) for p in patterns):
                planned.append(PlannedFile(repo, sibling.rfilename, sibling.size,
                                           _destination(models_dir, repo, sibling.rfilename)))
        if not any(f.repo == repo for f in planned):
            raise DownloadError(f"{repo} has none of the expected files ({', '.join(patterns)}); the repository "
                                "layout changed - please report it.")
    return planned


def _human(size: int | None) -> str:
    if size is None:
        return "size unknown"
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def download(models_dir, include_dit=True, include_base=True, yes=False, log=print, api=None, fetch=None,
             ask=input) -> list[Path]:
    """Plan, show sizes, confirm (unless `yes`), fetch. Returns the final paths."""
    from huggingface_hub import hf_hub_download

    models_dir = Path(models_dir)
    planned = plan_downloads(models_dir, include_dit, include_base, api)
    todo = [f for f in planned if not f.done]
    log(f"{len(planned)} files into {models_dir}:")
    for f in planned:
        log(f"  {'done ' if f.done else '     '}{_human(f.size):>10}  {f.repo}/{f.filename}  ->  {f.target}")
    total = sum(f.size or 0 for f in todo)
    if not todo:
        log("everything is already downloaded.")
        return [f.target for f in planned]
    free = _free_bytes(models_dir)
    if free is not None and free < total:
        raise DownloadError(f"{_human(total)} to download but only {_human(free)} free under {models_dir}; free "
                            "some space or pick another --models-dir.")
    log(f"to download: {_human(total)} in {len(todo)} files")
    if not yes and ask("continue? [y/N] ").strip().lower() not in ("y", "yes"):
        raise DownloadError("cancelled")
    fetch = fetch or hf_hub_download
    for f in todo:
        local_dir = f.target.parent
        for _ in Path(f.filename).parent.parts:  # hf_hub_download recreates the repo sub-folders itself
            local_dir = local_dir.parent
        local_dir.mkdir(parents=True, exist_ok=True)
        try:
            got = Path(fetch(repo_id=f.repo, filename=f.filename, local_dir=local_dir))
        except Exception as exc:
            raise _friendly(exc, f.repo) from exc
        if got.resolve() != f.target.resolve():
            os.replace(got, f.target)
        log(f"  fetched {f.target}")
    return [f.target for f in planned]


def _free_bytes(path: Path) -> int | None:
    import shutil

    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def node_inputs(models_dir) -> dict[str, str]:
    """What to pick in the nodes after a download (paths relative to each ComfyUI model folder)."""
    return {
        "Ideogram4 Q4_K Loader": DIT_FILE,
        "Qwen3-VL Encode": f"{BASE_FOLDER}/text_encoder/... (any shard or model.safetensors)",
        "VAE Decode (Ideogram4)": f"{BASE_FOLDER}/vae/diffusion_pytorch_model.safetensors",
    }
