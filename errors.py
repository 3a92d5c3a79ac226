"""The pack's error hierarchy. Every message names the file or value at fault and what to do.

Torch-free so that every layer (and the ComfyUI adapter) can import it cheaply. The one error that needs torch,
`pipeline.DeviceMemoryError` (out of GPU memory while sampling), lives beside the code that raises it: it is also
a torch OutOfMemoryError, so that ComfyUI handles it as one.
"""


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


class LatentFormatError(Ideogram4Error, ValueError):
    """A LATENT or latent tensor has the wrong shape, channel count or layout for the step it was given to."""
