"""`download`: planning, placement in ComfyUI's models/ layout, resume/skip, gated-repo message. The Hugging Face
Hub is replaced by a local fake (no network in tests)."""

import types

import pytest

from ideogram4_gguf import download as dl


class FakeHub:
    def __init__(self, repos, gated=()):
        self.repos, self.gated, self.fetched = repos, set(gated), []

    def model_info(self, repo, files_metadata=False):
        from huggingface_hub.errors import GatedRepoError

        if repo in self.gated:
            raise GatedRepoError("403 gated", response=types.SimpleNamespace(status_code=403, headers={},
                                                                             request=None, url=""))
        files = self.repos[repo]
        return types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=n, size=len(d)) for n, d in files.items()])

    def fetch(self, repo_id, filename, local_dir):
        """What hf_hub_download(local_dir=...) does: writes local_dir/filename."""
        self.fetched.append((repo_id, filename))
        target = local_dir / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.repos[repo_id][filename])
        return str(target)


@pytest.fixture
def hub(rng):
    def blob(n):
        return bytes(rng.integers(0, 256, size=n, dtype="uint8"))

    return FakeHub({
        dl.DIT_REPO: {dl.DIT_FILE: blob(300), "README.md": blob(10), "gguf_loader.py": blob(20)},
        dl.BASE_REPO: {"transformer/diffusion_pytorch_model.safetensors": blob(500),
                       "text_encoder/model.safetensors": blob(200), "text_encoder/config.json": blob(5),
                       "tokenizer/tokenizer.json": blob(40), "vae/diffusion_pytorch_model.safetensors": blob(90),
                       "vae/config.json": blob(7), "model_index.json": blob(3)},
    })


def test_downloads_only_what_the_pack_needs_where_the_nodes_look(tmp_path, hub):
    lines = []
    paths = dl.download(tmp_path, yes=True, log=lines.append, api=hub, fetch=hub.fetch)
    expected = {
        tmp_path / "diffusion_models" / dl.DIT_FILE,
        tmp_path / "text_encoders" / "ideogram-4" / "text_encoder" / "model.safetensors",
        tmp_path / "text_encoders" / "ideogram-4" / "text_encoder" / "config.json",
        tmp_path / "text_encoders" / "ideogram-4" / "tokenizer" / "tokenizer.json",
        tmp_path / "vae" / "ideogram-4" / "vae" / "diffusion_pytorch_model.safetensors",
        tmp_path / "vae" / "ideogram-4" / "vae" / "config.json",
    }
    assert set(paths) == expected and all(p.is_file() for p in expected)
    assert not any("transformer/" in f for _, f in hub.fetched)  # the fp8 DiT folders are never fetched
    assert (tmp_path / "diffusion_models" / dl.DIT_FILE).read_bytes() == hub.repos[dl.DIT_REPO][dl.DIT_FILE]
    assert any("to download:" in line for line in lines)  # sizes are shown before fetching
    # a second run fetches nothing (complete files are recognised by size)
    hub.fetched.clear()
    dl.download(tmp_path, yes=True, log=lines.append, api=hub, fetch=hub.fetch)
    assert hub.fetched == [] and "everything is already downloaded." in lines


def test_partial_file_is_fetched_again(tmp_path, hub):
    target = tmp_path / "diffusion_models" / dl.DIT_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half")
    dl.download(tmp_path, include_base=False, yes=True, log=lambda *_: None, api=hub, fetch=hub.fetch)
    assert hub.fetched == [(dl.DIT_REPO, dl.DIT_FILE)]
    assert target.read_bytes() == hub.repos[dl.DIT_REPO][dl.DIT_FILE]


def test_gated_repo_says_what_to_do(tmp_path, hub):
    hub.gated.add(dl.BASE_REPO)
    with pytest.raises(dl.DownloadError, match="accept the licence.*hf auth login"):
        dl.download(tmp_path, yes=True, log=lambda *_: None, api=hub, fetch=hub.fetch)
    assert hub.fetched == []  # nothing fetched before the plan is complete


def test_declined_confirmation_fetches_nothing(tmp_path, hub):
    with pytest.raises(dl.DownloadError, match="cancelled"):
        dl.download(tmp_path, log=lambda *_: None, api=hub, fetch=hub.fetch, ask=lambda _: "n")
    assert hub.fetched == []


def test_download_errors_belong_to_the_pack_hierarchy(tmp_path, hub):
    from ideogram4_gguf import errors

    assert dl.DownloadError is errors.DownloadError and issubclass(dl.DownloadError, errors.Ideogram4Error)
    hub.gated.add(dl.DIT_REPO)
    with pytest.raises(errors.Ideogram4Error, match="gated"):
        dl.plan_downloads(tmp_path, include_base=False, api=hub)


def test_the_command_line_reports_a_download_error_in_one_line(tmp_path, monkeypatch, capsys):
    from ideogram4_gguf.cli import main

    def refuse(*args, **kwargs):
        raise dl.DownloadError("cancelled")

    monkeypatch.setattr(dl, "download", refuse)
    assert main(["download", "--models-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: cancelled\n"
