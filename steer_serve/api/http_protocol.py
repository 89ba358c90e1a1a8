"""uvicorn's h11 HTTP/1.1 protocol with the limits a public server needs, and OpenAI-shaped errors.

* a request head (request line + headers) larger than uvicorn's ``h11_max_incomplete_event_size``
  (``--max-header-bytes``) or malformed: 400 with
  the OpenAI error body (uvicorn's own answer is plain text), then the connection closes;
* a client that has not sent the whole head ``header_timeout`` seconds after the connection opened
  (or after the first bytes of a later request on it), or the whole body ``body_timeout`` seconds
  after its head: 408 with the OpenAI error body, and the connection closes (slow-header and
  slow-body clients hold a connection and a buffer each). A request whose body is cut off this way
  sees a client disconnect, as if the client had left.
* between requests a keep-alive connection is idle, and only uvicorn's keep-alive timeout
  (``--http-keep-alive-timeout``) closes it. It is longer than the idle expiry of common clients
  (httpx and the openai SDK keep idle connections 5 s): a server closing an idle connection at the
  moment a client reuses it is answered "server disconnected" on the client side.

uvicorn takes the class as its ``http`` protocol (``uvicorn.Config(http=...)``); the limits are
bound with :func:`guarded_protocol`; the head size limit is uvicorn's config.
"""
from __future__ import annotations

import asyncio
import functools

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from steer_serve.api.errors import JSONBody, error_body


_BETWEEN_REQUESTS = object()   # the idle gap of a kept-alive connection (no read deadline of ours)


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = JSONBody(error_body(status, message, code)).body
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus head/body read deadlines and JSON error bodies (module docstring)."""

    def __init__(self, config, server_state, app_state=None, *, header_timeout: float, body_timeout: float,
                 **kwargs):
        super().__init__(config, server_state, app_state, **kwargs)
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self.max_header_bytes = config.h11_max_incomplete_event_size
        self._read_deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object = None     # the h11 state the deadline was armed for

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_next_read()

    def connection_lost(self, exc) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._expect_next_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_next_read()

    def _expect_next_read(self) -> None:
        """Arm the deadline for what the client owes next: the head (IDLE), the body (SEND_BODY), or
        nothing (between requests on a kept-alive connection, where uvicorn's keep-alive timer runs)."""
        state = self.conn.their_state
        if state is h11.IDLE and self._between_requests():
            state = _BETWEEN_REQUESTS
        if state is self._waiting_for:
            return
        self._cancel_deadline()
        self._waiting_for = state
        if self.transport.is_closing():
            return
        if state is h11.IDLE:
            self._read_deadline = self.loop.call_later(self.header_timeout, self._timed_out, "headers")
        elif state is h11.SEND_BODY:
            self._read_deadline = self.loop.call_later(self.body_timeout, self._timed_out, "body")

    def _between_requests(self) -> bool:
        """A response went out on this connection and nothing of the next request has arrived."""
        return self.cycle is not None and self.cycle.response_complete and not self.conn.trailing_data[0]

    def _cancel_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _timed_out(self, part: str) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        if part == "headers" and self.cycle is not None and not self.cycle.response_complete:
            return                      # a response is still being written: not waiting for a head
        limit = self.header_timeout if part == "headers" else self.body_timeout
        if part == "body" or self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_raw_response(408, "Request Timeout", f"the request {part} did not arrive "
                                                   f"within {limit:g} s", "request_timeout"))
        self.transport.close()          # an idle keep-alive connection is just closed

    def send_400_response(self, msg: str) -> None:
        self._cancel_deadline()
        self.transport.write(_raw_response(400, "Bad Request", "invalid HTTP request: malformed, or a request head "
                                           f"(request line + headers) larger than {self.max_header_bytes} bytes",
                                           "invalid_http_request"))
        self.transport.close()


def guarded_protocol(*, header_timeout: float, body_timeout: float):
    """The protocol factory for ``uvicorn.Config(http=...)`` with these deadlines bound."""
    return functools.partial(GuardedH11Protocol, header_timeout=header_timeout, body_timeout=body_timeout)
