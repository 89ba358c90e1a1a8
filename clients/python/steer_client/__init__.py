"""Python client for steer-serve: OpenAI-style chat/completions with per-request interventions.

>>> from steer_client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> client.chat([{"role": "user", "content": "Hi"}], intervention="honest").choices[0].message.content
"""
from steer_client.async_client import AsyncClient, AsyncStream
from steer_client.client import Client, Stream
from steer_client.errors import (
    APIConnectionError, AuthenticationError, BadRequestError, ConflictError, InternalServerError, NotFoundError,
    PermissionDeniedError, RateLimitError, RequestTooLargeError, ServiceUnavailableError, SteerServeError,
)
from steer_client.types import (
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatMessage, ChunkChoice, Completion, CompletionChoice,
    CompletionChunk, Delta, Intervention, Model, Usage,
)

__all__ = [
    "APIConnectionError", "AsyncClient", "AsyncStream", "AuthenticationError", "BadRequestError", "ChatChoice",
    "ChatCompletion", "ChatCompletionChunk", "ChatMessage", "ChunkChoice", "Client", "Completion",
    "CompletionChoice", "CompletionChunk", "ConflictError", "Delta", "InternalServerError", "Intervention", "Model",
    "NotFoundError", "PermissionDeniedError", "RateLimitError", "RequestTooLargeError", "ServiceUnavailableError",
    "SteerServeError", "Stream", "Usage",
]
