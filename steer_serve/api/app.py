"""The HTTP server: our own FastAPI app over :class:`SteerEngine`.

Why our own app and not vLLM's OpenAI server with plugins: the intervention fields must change how
a request is admitted (registry lookup, slot pinning, refcounts, cache salt) and released, the
error shapes and limits must be ours, and ``/v1/interventions`` is a first-class surface. vLLM's
server drops unknown fields and keeps its request lifecycle private, so wrapping it would mean
rewriting bodies in middleware and guessing when requests end. The engine underneath is the same
``AsyncLLM``; only the thin OpenAI layer is ours (``routes_openai``).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import Response

from steer_serve.api import routes_interventions, routes_openai
from steer_serve.api.errors import APIError, error_response, install_error_handlers
from steer_serve.api.metrics import Metrics
from steer_serve.api.schemas import InterventionCreate

access_log = logging.getLogger("steer_serve.access")


class Limiter:
    """Caps requests in flight; beyond it the server answers 429 with ``Retry-After``."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.max_in_flight:
            raise APIError(429, f"The server is at its limit of {self.max_in_flight} concurrent requests; retry shortly.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


@dataclass
class AppState:
    """Everything the routes need; built by the CLI (or a test) around a started engine."""

    engine: object
    registry: object
    tokenizer: object
    served_model_name: str
    model_path: str
    max_model_len: int
    vocab_size: int
    allowed_dirs: list[str] = field(default_factory=list)
    allow_hub: bool = True
    api_key: str | None = None
    admin_api_key: str | None = None
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_concurrent_requests: int = 256
    max_body_bytes: int = 2 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_placements: int = 256
    started: int = field(default_factory=lambda: int(time.time()))
    ready: bool = True
    metrics: Metrics = field(default_factory=Metrics)
    limiter: Limiter = None

    def __post_init__(self):
        self.limiter = self.limiter or Limiter(self.max_concurrent_requests)
        self.registry.on_load = self.metrics.load_latency.observe


def create_app(state: AppState, *, on_shutdown=None) -> FastAPI:
    """Build the FastAPI app around a ready :class:`AppState`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.ready = False
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="steer-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for many pyreft/pyvene interventions over one base model.")
    app.state.steer = state
    install_error_handlers(app, on_error=state.metrics.error)
    app.include_router(routes_openai.router)
    app.include_router(routes_interventions.router)

    @app.middleware("http")
    async def limits_and_access_log(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        started = time.perf_counter()
        length = request.headers.get("content-length")
        is_upload = request.headers.get("content-type", "").startswith("multipart/form-data")
        limit = state.max_upload_bytes * 2 if is_upload else state.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            state.metrics.error(413)
            response = error_response(413, f"request body larger than {limit} bytes", code="request_too_large")
        else:
            response = await call_next(request)
        response.headers["x-request-id"] = request_id
        access_log.info(json.dumps({"request_id": request_id, "method": request.method, "path": request.url.path,
                                    "status": response.status_code,
                                    "ms": round(1e3 * (time.perf_counter() - started), 1)}))
        return response

    @app.get("/health", tags=["ops"], summary="Liveness: the engine is running")
    async def health():
        try:
            await state.engine.check_health()
        except Exception as exc:
            return error_response(503, f"engine unhealthy: {exc}", code="engine_dead")
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: accepting requests")
    async def ready():
        if not state.ready:
            return error_response(503, "shutting down", code="not_ready")
        return {"status": "ready", "in_flight": state.limiter.in_flight}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics():
        return Response(state.metrics.render(state.registry, state.limiter.in_flight),
                        media_type="text/plain; version=0.0.4")

    original_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original_openapi()
            schema["components"]["schemas"]["InterventionCreate"] = InterventionCreate.model_json_schema(
                ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
