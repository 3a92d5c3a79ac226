"""One error hierarchy (errors.py, docs/errors.md): every error the pack raises on purpose is an Ideogram4Error, the
same mistake gets the same class and message wherever it is caught, and the command line shows those as one line
while anything unexpected keeps its traceback."""

import inspect

import pytest
import torch
from ideogram4_gguf import cli, errors, pipeline
from ideogram4_gguf.models import memory_plan, residency


def test_every_error_class_of_the_pack_is_an_ideogram4_error():
    classes = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__ == errors.__name__]
    assert {"DownloadError", "SamplingError", "GGUFFormatError"} <= {cls.__name__ for cls in classes}
    assert all(issubclass(cls, errors.Ideogram4Error) for cls in classes), classes
    assert issubclass(pipeline.DeviceMemoryError, errors.Ideogram4Error)


def test_an_unknown_memory_mode_is_one_sampling_error_everywhere():
    messages = set()
    for raise_it in (
        lambda: pipeline.load_model("never-opened.gguf", memory_mode="gpu_please"),  # refused before the file
        lambda: memory_plan.resolve_memory_mode("gpu_please", None, None, "cpu"),
        lambda: residency.place_branches(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), "cpu", mode="gpu_please"),
        lambda: memory_plan.check_memory_mode("gpu_please"),
    ):
        with pytest.raises(errors.SamplingError) as caught:
            raise_it()
        messages.add(str(caught.value))
    assert messages == {("memory_mode 'gpu_please' is not one of auto, gpu, stream_uncond, cpu_offload; pick one "
                         "of those (docs/memory.md).")}
    with pytest.raises(errors.SamplingError, match="memory_mode None is not one of"):
        memory_plan.check_memory_mode(None)
    assert [memory_plan.check_memory_mode(mode) for mode in memory_plan.MEMORY_MODES] == list(memory_plan.MEMORY_MODES)


@pytest.mark.parametrize("error", [errors.ModelFileError("x.gguf is not an Ideogram 4 DiT."),
                                   errors.DownloadError("cancelled"),
                                   FileNotFoundError(2, "No such file or directory", "x.gguf")],
                         ids=["pack-error", "download-error", "os-error"])
def test_the_command_line_shows_pack_and_os_errors_in_one_line(error, monkeypatch, capsys):
    def command(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "demo", command)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == f"error: {error}\n"


def test_the_command_line_lets_an_unexpected_error_show_its_traceback(monkeypatch):
    def command(args):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setitem(cli.COMMANDS, "demo", command)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo"])
