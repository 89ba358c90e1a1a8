"""Asynchronous client: ``await AsyncClient(base_url).chat(...)``; streams are ``async for`` iterators."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from steer_client import _ops
from steer_client.client import _RETRYABLE_TRANSPORT, base_url_of, headers_of
from steer_client.errors import APIConnectionError, error_from_response


class AsyncStream:
    """Async iterator over a streamed response's chunks; closes the connection when exhausted or on ``aclose()``."""

    def __init__(self, response: httpx.Response, parse):
        self.response, self._parse = response, parse

    async def __aiter__(self) -> AsyncIterator:
        try:
            async for line in self.response.aiter_lines():
                event = _ops.parse_sse_line(line)
                if event is _ops.DONE:
                    return
                if event is not None:
                    yield self._parse(event)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"stream broke: {exc}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncInterventions:
    """``/v1/interventions`` (async): register, upload, list, get, patch, delete."""

    def __init__(self, client: "AsyncClient"):
        self._client = client

    async def register(self, id: str, source: str, **kwargs):
        """Register ``source`` as ``id``; kwargs: format, positions, scale, act_fn, replace."""
        return await self._client._call(_ops.register(id, source, **kwargs))

    async def upload(self, id: str, path=None, **kwargs):
        """Upload a native intervention directory (or ``intervention_json=``/``weights=`` bytes) as ``id``."""
        return await self._client._call(_ops.upload(id, path, **kwargs))

    async def list(self):
        """Every registered intervention."""
        return await self._client._call(_ops.list_interventions())

    async def get(self, id: str):
        """One intervention's description (NotFoundError if unknown)."""
        return await self._client._call(_ops.get(id))

    async def patch(self, id: str, scale: float | None = None, positions: str | None = None):
        """Change an intervention's default scale and/or positions."""
        return await self._client._call(_ops.patch(id, scale, positions))

    async def delete(self, id: str, force: bool = False) -> bool:
        """Delete; ConflictError while in use unless ``force``."""
        return await self._client._call(_ops.delete(id, force))


class AsyncClient:
    """Non-blocking client with the same methods as :class:`steer_client.Client` (awaitable)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int | None = 256):
        self.base_url, self.max_retries = base_url_of(base_url), max_retries
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers_of(api_key), timeout=timeout,
                                       transport=transport, limits=limits)
        self.interventions = AsyncInterventions(self)

    async def chat(self, messages, intervention=None, interventions=None, model=None, stream=False, **kwargs):
        """Chat completion -> ``ChatCompletion``, or an ``AsyncStream`` of ``ChatCompletionChunk``."""
        return await self._call(_ops.chat(messages, intervention, interventions, model, stream, **kwargs))

    async def complete(self, prompt, intervention=None, interventions=None, model=None, stream=False, **kwargs):
        """Text completion -> ``Completion``, or an ``AsyncStream`` of ``CompletionChunk``."""
        return await self._call(_ops.complete(prompt, intervention, interventions, model, stream, **kwargs))

    async def models(self):
        """The base model and every intervention (usable as ``model=``)."""
        return await self._call(_ops.models())

    async def health(self) -> dict:
        """``GET /health``."""
        return await self._call(_ops.health())

    async def _call(self, op: _ops.Op):
        response = await self._send(op)
        if op.stream:
            return AsyncStream(response, op.parse)
        return op.parse(response.json())

    async def _send(self, op: _ops.Op) -> httpx.Response:
        attempt = 0
        while True:
            try:
                request = self._http.build_request(op.method, op.path, **op.kwargs)
                response = await self._http.send(request, stream=op.stream)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries or not isinstance(exc, _RETRYABLE_TRANSPORT):
                    raise APIConnectionError(f"{type(exc).__name__}: {exc}") from exc
                delay = _ops.retry_delay(attempt, None)
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                if attempt >= self.max_retries or response.status_code not in _ops.RETRY_STATUSES:
                    raise error_from_response(response)
                delay = _ops.retry_delay(attempt, response.headers.get("retry-after"))
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
