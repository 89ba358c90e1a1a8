"""Synchronous client: ``Client(base_url).chat(...)``, ``.complete(...)``, ``.interventions.*``."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx

from steer_client import _ops
from steer_client.errors import APIConnectionError, error_from_response

DEFAULT_URL = "http://127.0.0.1:8000"
_RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout)


def base_url_of(url: str | None) -> str:
    """Normalise a base URL: env ``STEER_SERVE_URL`` by default, no trailing ``/`` or ``/v1``."""
    url = (url or os.environ.get("STEER_SERVE_URL") or DEFAULT_URL).rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def headers_of(api_key: str | None) -> dict:
    """Authorization header for ``api_key`` (env ``STEER_SERVE_API_KEY`` when None)."""
    key = api_key if api_key is not None else os.environ.get("STEER_SERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


class Stream:
    """Iterator over a streamed response's chunks; closes the connection when exhausted or on ``close()``."""

    def __init__(self, response: httpx.Response, parse):
        self.response, self._parse = response, parse

    def __iter__(self) -> Iterator:
        try:
            for event in _ops.sse_events(self.response.iter_lines()):
                yield self._parse(event)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"stream broke: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Interventions:
    """``/v1/interventions``: register, upload, list, get, patch, delete."""

    def __init__(self, client: "Client"):
        self._client = client

    def register(self, id: str, source: str, **kwargs):
        """Register ``source`` (path in an allowed dir, or hub id) as ``id``; kwargs: format, positions, scale, act_fn, replace."""
        return self._client._call(_ops.register(id, source, **kwargs))

    def upload(self, id: str, path=None, **kwargs):
        """Upload a native intervention directory (or ``intervention_json=``/``weights=`` bytes) as ``id``."""
        return self._client._call(_ops.upload(id, path, **kwargs))

    def list(self):
        """Every registered intervention."""
        return self._client._call(_ops.list_interventions())

    def get(self, id: str):
        """One intervention's description (NotFoundError if unknown)."""
        return self._client._call(_ops.get(id))

    def patch(self, id: str, scale: float | None = None, positions: str | None = None):
        """Change an intervention's default scale and/or positions."""
        return self._client._call(_ops.patch(id, scale, positions))

    def delete(self, id: str, force: bool = False) -> bool:
        """Delete; ConflictError while in use unless ``force`` (which waits for running requests)."""
        return self._client._call(_ops.delete(id, force))


class Client:
    """Blocking client; retries 429/503 and refused connections up to ``max_retries`` times with backoff."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, transport: httpx.BaseTransport | None = None):
        self.base_url, self.max_retries = base_url_of(base_url), max_retries
        self._http = httpx.Client(base_url=self.base_url, headers=headers_of(api_key), timeout=timeout,
                                  transport=transport)
        self.interventions = Interventions(self)

    def chat(self, messages, intervention=None, interventions=None, model=None, stream=False, **kwargs):
        """Chat completion -> ``ChatCompletion``, or a ``Stream`` of ``ChatCompletionChunk`` when ``stream``."""
        return self._call(_ops.chat(messages, intervention, interventions, model, stream, **kwargs))

    def complete(self, prompt, intervention=None, interventions=None, model=None, stream=False, **kwargs):
        """Text completion -> ``Completion``, or a ``Stream`` of ``CompletionChunk`` when ``stream``."""
        return self._call(_ops.complete(prompt, intervention, interventions, model, stream, **kwargs))

    def models(self):
        """The base model and every intervention (usable as ``model=``)."""
        return self._call(_ops.models())

    def health(self) -> dict:
        """``GET /health`` (ServiceUnavailableError when the engine is unhealthy)."""
        return self._call(_ops.health())

    def _call(self, op: _ops.Op):
        response = self._send(op)
        if op.stream:
            return Stream(response, op.parse)
        return op.parse(response.json())

    def _send(self, op: _ops.Op) -> httpx.Response:
        attempt = 0
        while True:
            try:
                request = self._http.build_request(op.method, op.path, **op.kwargs)
                response = self._http.send(request, stream=op.stream)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries or not isinstance(exc, _RETRYABLE_TRANSPORT):
                    raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
                delay = _ops.retry_delay(attempt, None)
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                if attempt >= self.max_retries or response.status_code not in _ops.RETRY_STATUSES:
                    raise error_from_response(response)
                delay = _ops.retry_delay(attempt, response.headers.get("retry-after"))
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
