"""OpenAI-style errors: every failure is ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
          408: "invalid_request_error", 429: "rate_limit_error", 431: "request_too_large", 503: "service_unavailable"}
#: HTTP status of each registry error code (400 for the rest)
_REGISTRY_STATUS = {"intervention_not_found": 404, "conflict": 409, "registry_write_failed": 500}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class JSONBody(JSONResponse):
    """JSON with non-ASCII escaped: bodies echoing client text (lone surrogates included) always encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """Raise anywhere in a route to answer with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class BodyTooLarge(StarletteHTTPException):
    """Raised while a request body is read, once it passes the server's limit (also for chunked bodies)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error object for ``status`` (``type`` derived from the status)."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else
                                                              "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An OpenAI error body as a response."""
    return JSONBody(error_body(status, message, code, param), status_code=status, headers=headers)


def _reason(error: dict) -> str:
    """Pydantic's message, except for unknown fields: refused by name, never silently ignored."""
    if error.get("type") == "extra_forbidden":
        return "this server does not support this field (it is refused, not ignored)"
    return str(error.get("msg"))


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {_reason(e)}"
                        for e in errors[:5])
    return message or "invalid request", ".".join(loc) or None


def install_error_handlers(app: FastAPI, on_error=lambda status: None) -> None:
    """Map every exception type we raise (and FastAPI's own) onto the OpenAI error shape."""
    from steer_serve.formats.errors import InterventionFormatError
    from steer_serve.registry import RegistryError

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        on_error(exc.status)
        return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(RegistryError)
    async def _registry_error(request: Request, exc: RegistryError):
        status = _REGISTRY_STATUS.get(exc.code, 400)
        on_error(status)
        return error_response(status, str(exc), code=exc.code, param=exc.param)

    @app.exception_handler(InterventionFormatError)
    async def _format_error(request: Request, exc: InterventionFormatError):
        on_error(400)
        return error_response(400, str(exc), code=exc.code, param=exc.param or "source")

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError | ValidationError):
        on_error(400)
        message, param = _validation_message(exc.errors())
        return error_response(400, message, code="invalid_request", param=param)

    from steer_serve.api.vllm_frontend import CLIENT_EXCEPTIONS, error_of

    async def _vllm_error(request: Request, exc: Exception):
        status, message, param = error_of(exc)
        if status >= 500:
            logger.exception("error on %s %s", request.method, request.url.path, exc_info=exc)
        on_error(status)
        return error_response(status, message, code=_CODES.get(status), param=param)

    for exception_type in CLIENT_EXCEPTIONS:
        app.add_exception_handler(exception_type, _vllm_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        on_error(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=_CODES.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        if isinstance(exc, ClientDisconnect):   # the client left, or was closed for a too slow body: no answer
            on_error(499)
            logger.info("client disconnected during %s %s", request.method, request.url.path)
            return error_response(400, "the client disconnected", code="client_disconnected")
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        on_error(500)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
