"""One exception hierarchy for everything hago_py reports to a user.

Every message names the thing at fault (file, node, field, input) and what to do about it.
The CLI prints ``str(err)`` on one line and exits with code 2 for these errors.
"""
from __future__ import annotations


class HagoError(Exception):
    """Base class: bad input or an impossible request, explained for the user."""

    exit_code = 2


class ModelError(HagoError):
    """The model file / ModelProto cannot be used (missing, not ONNX, checker failure, unsupported op)."""


class SpecError(HagoError):
    """A hardware spec is unknown, malformed, violates the schema, or lacks what was asked of it."""


class DataError(HagoError):
    """Calibration / validation data does not match the model or is unusable (empty, NaN, wrong shape)."""


class BackendError(HagoError):
    """A backend could not compile, run or time a model."""


class OptionError(HagoError):
    """An option passed to the API / CLI is invalid or inconsistent with the target."""


class OutputError(HagoError):
    """An output path cannot be written."""


class SearchError(HagoError):
    """A search could not satisfy its budget; carries the closest point found."""

    def __init__(self, message: str, closest=None):
        super().__init__(message)
        self.closest = closest
