"""One exception hierarchy for everything hago_py reports to a user.

Every message names the thing at fault (file, node, field, input) and what to do about it, on one line.
Long diagnostics (a backend's own error text, a traceback summary) go into ``details``: the CLI prints them
only with ``HAGO_DEBUG=1``. The CLI prints ``str(err)`` and exits with ``exit_code``: 2 for bad input, 1 for
:class:`InternalError` (hago_py's own output failed a check: a bug, never blamed on the user).
"""
from __future__ import annotations

from typing import Optional


class HagoError(Exception):
    """Base class: bad input or an impossible request, explained for the user."""

    exit_code = 2

    def __init__(self, message: str = "", *, details: Optional[str] = None):
        # one line: a message that spans lines is folded (the CLI and logs print it on one line)
        message = " ".join(str(message).split()) if "\n" in str(message) else str(message)
        super().__init__(message)
        self.details = details


class ModelError(HagoError):
    """The model file / ModelProto cannot be used (missing, not ONNX, checker failure, unsupported op)."""


class SpecError(HagoError):
    """A hardware spec is unknown, malformed, violates the schema, or lacks what was asked of it."""


class DataError(HagoError):
    """Calibration / validation data does not match the model or is unusable (empty, NaN, wrong shape)."""


class BackendError(HagoError):
    """A backend could not compile, run or time a model."""


class RemoteError(BackendError):
    """A remote device (TVM RPC tracker / server, rpc= option) cannot be reached or used: the setup, not a model
    (api.internal_errors passes it through instead of blaming hago_py)."""


class OptionError(HagoError):
    """An option passed to the API / CLI is invalid or inconsistent with the target."""


class OutputError(HagoError):
    """An output path cannot be written."""


class InternalError(HagoError):
    """hago_py produced something it must never produce (an output the backend cannot load or run, a plan that
    does not fit the model): a bug in hago_py, not bad input. Nothing is written; exit code 1."""

    exit_code = 1


class SearchError(HagoError):
    """A search could not satisfy its budget; carries the closest point found."""

    def __init__(self, message: str, closest=None):
        super().__init__(message)
        self.closest = closest
