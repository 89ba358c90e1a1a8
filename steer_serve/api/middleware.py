"""Pure-ASGI middleware: request ids, the request body limit and structured access logs.

Pure ASGI rather than ``@app.middleware("http")``: it sees every body chunk (so a chunked upload
without ``Content-Length`` is cut off at the limit too) and it does not wrap streaming responses,
whose client disconnects must reach the route untouched.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.datastructures import Headers

from steer_serve.api.errors import BodyTooLarge, error_response

access_log = logging.getLogger("steer_serve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id_from(headers: Headers) -> str:
    """The client's ``X-Request-Id`` when it is short and plain, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


class RequestContext:
    """Tags each request with an id (``X-Request-Id`` in and out), limits its body, logs one JSON line.

    ``limit_for(scope, headers)`` gives the byte limit of a request (uploads get a larger one);
    ``max_header_bytes`` caps the request head (a head that arrived whole is not caught by the HTTP
    parser's incomplete-head limit): 431; ``on_error(status)`` counts rejections it answers itself.
    """

    def __init__(self, app, *, limit_for, max_header_bytes: int = 16384, on_error=lambda status: None):
        self.app, self.limit_for, self.on_error = app, limit_for, on_error
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_from(headers)
        context = scope.setdefault("state", {})
        context["request_id"] = request_id
        limit = self.limit_for(scope, headers)
        started = time.perf_counter()
        status = {"code": None}
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        try:
            length = headers.get("content-length")
            if head_bytes > self.max_header_bytes:
                self.on_error(431)
                response = error_response(431, f"request head (request line + headers) larger than "
                                               f"{self.max_header_bytes} bytes", code="request_header_too_large")
                await response(scope, receive, tagged_send)
            elif length is not None and (not length.isdigit() or int(length) > limit):
                self.on_error(413)
                response = error_response(413, f"request body larger than {limit} bytes", code="request_too_large")
                await response(scope, receive, tagged_send)
            else:
                await self.app(scope, limited_receive, tagged_send)
        finally:
            record = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                      "status": status["code"], "ms": round(1e3 * (time.perf_counter() - started), 1),
                      "client": (scope.get("client") or ("", 0))[0], "bytes_in": received}
            for key in ("user", "interventions", "stream"):
                if context.get(key) is not None:
                    record[key] = context[key]
            access_log.info(json.dumps(record))
