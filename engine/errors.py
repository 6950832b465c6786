"""Every error the engine raises, in one flat list (as anyio keeps its own).

    Exception
    +-- ModelFileError           a model file cannot be used
    +-- LookupError
    |   +-- ModelNotFound        no served model has this name or version
    +-- ValueError
    |   +-- InvalidRequestError  a request can never succeed as sent
    |       +-- InvalidSamplingError
    |       +-- InvalidPromptError
    |       +-- InvalidImageRequest
    +-- RuntimeError
        +-- QueueFullError       a decode batch has no room now
        +-- EngineError          model code failed; the request may be retried
        +-- DeviceUnavailableError

The server maps them to gRPC statuses in one place (``server/pipeline/statuses.py``). This module imports
nothing heavy, so the server's mapping costs no torch import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def brief_repr(value: object, limit: int = 40) -> str:
    """repr of user input, cut short: error messages never echo unbounded input."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits refuses to print
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ModelFileError(Exception):
    """Raised when a model or checkpoint file cannot be used; the message names the file (and tensor)."""

    def __init__(self, path: str | os.PathLike[str], reason: str, tensor: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.tensor = tensor
        where = f"{self.path}: tensor {tensor!r}: " if tensor else f"{self.path}: "
        super().__init__(where + reason)


class ModelNotFound(LookupError):
    """Raised when no served model has this name (or this version); the message lists what is served."""

    def __init__(self, name: object, version: object | None, available: Sequence[str]) -> None:
        self.name = brief_repr(name)  # from a request: never echo unbounded input
        self.version = version
        self.available = list(available)
        if version is None:
            message = f"model {self.name} is not served; available: {', '.join(self.available) or 'none'}"
        else:
            message = f"model {self.name} has no version {brief_repr(version, 20)}; available versions: {', '.join(self.available)}"
        super().__init__(message)


class InvalidRequestError(ValueError):
    """Raised when a request can never succeed as sent (gRPC INVALID_ARGUMENT)."""


class InvalidSamplingError(InvalidRequestError):
    """Raised when a sampling setting is out of range or of the wrong type."""


class InvalidPromptError(InvalidRequestError):
    """Raised when the prompt cannot be encoded for the model (empty, or characters outside its vocabulary)."""


class InvalidImageRequest(InvalidRequestError):
    """Raised when an image request cannot be served as sent; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class QueueFullError(RuntimeError):
    """Raised when every decode slot is taken and the pending queue is full: retry later (RESOURCE_EXHAUSTED)."""


class EngineError(RuntimeError):
    """Raised when model code failed for a request (the request gets a retryable status)."""


class DeviceUnavailableError(RuntimeError):
    """Raised when the device asked for does not exist on this machine (or this torch build)."""
