"""genserve's Python SDK: ``Client`` and ``AsyncClient`` for the genserve.v1 ``Generator`` service.

>>> from clients import Client
>>> with Client("127.0.0.1:50051") as client:
...     [m.name for m in client.list_models()]
...     digits = client.generate_images("vae", 16, seed=0)     # (16, 28, 28) uint8
...     text = client.generate_text("transformer", "ROMEO:", max_new_tokens=100)

The command line: ``python -m clients --help``.
"""

from clients._amqp import AmqpClient, AsyncAmqpClient
from clients._channel import RetryPolicy
from clients._client import AsyncClient
from clients._exceptions import (
    DeadlineExceeded,
    GenserveError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from clients._protocol import ImageOptions, TextOptions
from clients._session import Session
from clients._sync import Client, SyncSession
from clients._types import ImageResult, ImageSpec, ImageStep, ModelInfo, TextResult, TextSpec

__all__ = [
    "AmqpClient",
    "AsyncAmqpClient",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "GenserveError",
    "ImageOptions",
    "ImageResult",
    "ImageSpec",
    "ImageStep",
    "InvalidRequest",
    "ModelInfo",
    "ModelNotFound",
    "Overloaded",
    "RetryPolicy",
    "ServerError",
    "Session",
    "SyncSession",
    "TextOptions",
    "TextResult",
    "TextSpec",
    "Unauthenticated",
    "Unavailable",
]
