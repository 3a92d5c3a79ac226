"""The pack's error hierarchy. Every message names the file or value at fault and what to do.

Torch-free so that every layer (and the ComfyUI adapter) can import it cheaply. The one error that needs torch,
`DeviceMemoryError` (out of GPU memory while sampling), lives beside the memory modes in `models/memory_plan.py`
(`pipeline` re-exports it): it is also a torch OutOfMemoryError, so that ComfyUI handles it as one.

What a user can meet and what to do about it: docs/errors.md.
"""

# How a message quotes what a file holds (one short line whatever the file holds): written once, in quant_tools
# (standalone, torch-free), whose shared reader and layout code quote the same way.
from .quant_tools.errors import QUOTE_LIMIT, quote  # noqa: F401


class Ideogram4Error(Exception):
    """Base class of every error this pack raises on purpose."""


class GGUFFormatError(Ideogram4Error, ValueError):
    """A file is not a valid GGUF, is truncated, or holds a tensor we cannot decode."""


class ModelFileError(Ideogram4Error, ValueError):
    """A weights file is readable but is not the model (or layout, or branch) that was expected."""


class PromptError(Ideogram4Error, ValueError):
    """A prompt cannot be encoded (too long, invalid JSON caption in strict mode, ...)."""


class SamplingError(Ideogram4Error, ValueError):
    """Invalid sampling settings (size, steps, guidance schedule, ...)."""


class UsageError(Ideogram4Error, ValueError):
    """An option given to a node or the command line cannot work here: a device this machine lacks, an output folder
    that cannot be written, a seed out of range, ..."""


class LatentFormatError(Ideogram4Error, ValueError):
    """A LATENT or latent tensor has the wrong shape, channel count or layout for the step it was given to."""


class DownloadError(Ideogram4Error):
    """A model download that cannot proceed (gated or missing repository, no network, no disk space, cancelled),
    with the fix in the message."""
