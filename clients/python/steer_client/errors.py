"""Exceptions carrying the server's OpenAI-shaped error (``{"error": {message, type, param, code}}``)."""
from __future__ import annotations

import httpx


class SteerServeError(Exception):
    """Base class: ``status`` (HTTP, ``None`` for connection errors), ``code``, ``param``, ``type``, ``message``."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None, body: object = None,
                 headers: dict | None = None):
        super().__init__(message if status is None else f"{status} {code or type or 'error'}: {message}")
        self.message, self.status, self.code, self.param, self.type = message, status, code, param, type
        self.body, self.headers = body, headers or {}


class APIConnectionError(SteerServeError):
    """The server could not be reached (or the connection broke before a response)."""


class BadRequestError(SteerServeError):
    """400 / 422: the request was invalid."""


class AuthenticationError(SteerServeError):
    """401: missing or wrong API key."""


class PermissionDeniedError(SteerServeError):
    """403: the key may not do this (e.g. intervention management without the admin key)."""


class NotFoundError(SteerServeError):
    """404: unknown intervention, model or route."""


class ConflictError(SteerServeError):
    """409: the intervention id exists already, or is in use."""


class RequestTooLargeError(SteerServeError):
    """413: the body or an uploaded file is above the server's limit."""


class RateLimitError(SteerServeError):
    """429: the server is full; retried automatically with backoff."""


class InternalServerError(SteerServeError):
    """5xx other than 503, or an error reported inside a started stream."""


class ServiceUnavailableError(SteerServeError):
    """503: not ready or unhealthy; retried automatically with backoff."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 413: RequestTooLargeError, 422: BadRequestError, 429: RateLimitError,
              503: ServiceUnavailableError}


def error_from_body(status: int, body: object, headers: dict | None = None) -> SteerServeError:
    """The exception for an error status and its (parsed JSON or text) body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"message": body if isinstance(body, str) and body else f"HTTP {status}"}
    cls = _BY_STATUS.get(status, InternalServerError if status >= 500 else SteerServeError)
    return cls(str(error.get("message") or f"HTTP {status}"), status=status, code=error.get("code"),
               param=error.get("param"), type=error.get("type"), body=body, headers=headers)


def error_from_response(response: httpx.Response) -> SteerServeError:
    """The exception for a non-2xx response whose body has been read."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return error_from_body(response.status_code, body, dict(response.headers))
