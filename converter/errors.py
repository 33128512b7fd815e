"""User-facing error types of the converter.

Everything derived from ``ConverterError`` is a problem with the user's input (file, flags, regex,
layer data): the CLI prints its message on one line to stderr and exits non-zero, without a
traceback. Anything else that escapes is a bug and keeps its traceback.

Codec errors (``formats.FormatError`` / ``NonFiniteError``) are ``ValueError``s defined by the codec
contract; the converter re-raises them as ``LayerError`` naming the file and the layer.
"""

from __future__ import annotations


class ConverterError(Exception):
    """A user error: bad input file, bad flag value, existing output, bad layer data."""

    exit_code = 2


class InputFileError(ConverterError):
    """The input is missing, unreadable, not safetensors, or truncated."""


class ModelLoadError(InputFileError):
    """A model file the loader nodes cannot load: not safetensors, a header or metadata that does not
    hold up (``safetensors_io`` / ``schema`` rules), a layer whose tensors do not match its format. The
    message names the file and, where it applies, the layer and what is wrong; it is a message for the
    user (ComfyUI shows it as the node's error), not a bug report."""


class OutputFileError(ConverterError):
    """The output exists (without --overwrite), equals the input, or cannot be written."""


class OptionError(ConverterError):
    """A flag value is invalid (regex, format name, layer-config file, conflicting flags)."""


class LayerError(ConverterError):
    """A layer cannot be quantized (NaN/Inf weights, a shape the format refuses)."""


class NoMatchingLayersError(ConverterError):
    """A request that needs matching layers found none (e.g. --tensor-scales, hybrid on a non-MXFP8 file)."""


class Cancelled(ConverterError):
    """The conversion was cancelled (Ctrl+C, SIGTERM or the caller's cancel callback)."""

    exit_code = 130
