"""The quantizer tool's only error class.

quant_tools is standalone (it must not import the rest of the pack), so it carries its own error. It is a
`ValueError` so that callers catching the pack's errors by that base still catch it.
"""


class QuantToolError(ValueError):
    """Bad input for the quantizer tool: the message says which file or tensor, what was expected, what to do."""
