"""The quantizer tool's only error class, and how its messages quote what a file holds.

quant_tools is standalone (it must not import the rest of the pack), so it carries its own error. It is a
`ValueError` so that callers catching the pack's errors by that base still catch it. The code quant_tools shares
with the runtime (`layout`, `gguf_file`) raises whichever class its caller passes, so the runtime still raises
the pack's own errors through it.
"""

QUOTE_LIMIT = 80  # characters of a file's own text (a name, a metadata value) that one message quotes


class QuantToolError(ValueError):
    """Bad input for the quantizer tool: the message says which file or tensor, what was expected, what to do."""


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """`repr` of a value read from a file, cut to about `limit` characters and always on one line.

    Names, metadata strings and arrays come from the file and can be 64 KiB long (or hold newlines). The pack's
    `errors.quote` is this function (quant_tools cannot import the pack; the pack imports this), so the messages of
    the shared code and of the runtime quote alike.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        shown = ", ".join(quote(v, max(8, limit // 4)) for v in value[:4])
        if len(value) > 4:
            shown += f", ... ({len(value)} items)"
        text = f"({shown})" if isinstance(value, tuple) else f"[{shown}]"
    else:
        text = repr(value)  # escapes newlines and control characters
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return text[: max(1, limit - 3)] + "..." + size
