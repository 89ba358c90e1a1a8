"""The HTTP server: one FastAPI app with vLLM's OpenAI handlers and steer-serve's own surface.

The OpenAI routes are vLLM's handlers behind a thin steering layer (``routes_openai``, over
``vllm_frontend``, whose serving objects live on ``app.state`` as ``vllm serve`` builds them). The
app around them is ours: OpenAI-shaped errors everywhere, inference and admin keys, 429/413
limits, request ids and access logs, ``/v1/interventions``, ``/ready`` and ``/metrics``
(``steer_*`` next to vLLM's ``vllm:``).
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from steer_serve.api import openapi_docs, routes_interventions, routes_openai
from steer_serve.api.errors import APIError, JSONBody, error_response, install_error_handlers
from steer_serve.api.metrics import Metrics
from steer_serve.api.middleware import RequestContext


class Limiter:
    """Admission by work: caps the requests and the sequences (prompts × ``n``, or beams) in flight.

    A request asking for more sequences than one request may is a 400; beyond either concurrent cap
    the server answers 429 with ``Retry-After``. With the sequence cap at about the engine's batch
    size (the default), admitted sequences are scheduled at once, so a small request never waits in
    the engine's queue behind a huge fan-out.
    """

    def __init__(self, max_in_flight: int, max_sequences: int, max_sequences_per_request: int):
        self.max_in_flight, self.max_sequences = max_in_flight, max_sequences
        self.max_sequences_per_request = max_sequences_per_request
        self.in_flight = 0
        self.sequences = 0

    def enter(self, sequences: int = 1, param: str = "n") -> None:
        if sequences > self.max_sequences_per_request:
            raise APIError(400, f"this request asks for {sequences} sequences (prompts × n); one request may ask for "
                                f"at most {self.max_sequences_per_request} on this server", code="too_many_sequences",
                           param=param)
        if self.in_flight >= self.max_in_flight:
            raise APIError(429, f"The server is at its limit of {self.max_in_flight} concurrent requests; retry shortly.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        if self.sequences + sequences > self.max_sequences:
            raise APIError(429, f"The server is at its limit of {self.max_sequences} concurrent sequences "
                                f"({self.sequences} running, this request asks for {sequences}); retry shortly.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.sequences += sequences

    def leave(self, sequences: int = 1) -> None:
        self.in_flight -= 1
        self.sequences -= sequences


@dataclass
class AppState:
    """Everything the routes need; built by the CLI (or a test) around a started engine."""

    engine: object
    registry: object
    served_model_name: str
    model_path: str
    max_model_len: int
    allowed_dirs: list[str] = field(default_factory=list)
    allow_hub: bool = True
    api_key: str | None = None
    admin_api_key: str | None = None
    max_tokens_limit: int = 4096
    max_capture_sites: int = 8
    max_capture_bytes: int = 64 * 1024 * 1024
    max_concurrent_requests: int = 256
    max_concurrent_sequences: int = 256
    max_sequences_per_request: int = 64
    max_header_bytes: int = 16384
    max_body_bytes: int = 2 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_placements: int = 256
    cors_origins: list[str] = field(default_factory=list)
    engine_stall_timeout: float = 30.0
    started: int = field(default_factory=lambda: int(time.time()))
    ready: bool = True
    engine_frozen: str | None = None   # set by the watchdog (api/server.py) when the engine stops answering
    metrics: Metrics = field(default_factory=Metrics)
    limiter: Limiter = None
    handlers: dict = None  # kind -> vLLM route function (a test may put stand-ins here)
    prompt_embedder: object = None  # api.prompt_embeds.PromptEmbedder with --enable-prompt-embeds, else None

    def __post_init__(self):
        if self.handlers is None:
            from steer_serve.api.vllm_frontend import GENERATION_HANDLERS

            self.handlers = dict(GENERATION_HANDLERS)
        self.limiter = self.limiter or Limiter(self.max_concurrent_requests, self.max_concurrent_sequences,
                                               self.max_sequences_per_request)
        self.registry.slots.on_load = self.metrics.load_latency.observe

    def engine_failure(self) -> str | None:
        """Why the engine cannot serve (dead, or frozen past ``--engine-stall-timeout``), else None."""
        return self.engine_frozen or self.engine.failure()


def create_app(state: AppState, *, on_shutdown=None) -> FastAPI:
    """Build the FastAPI app around a ready :class:`AppState`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.ready = False
        if on_shutdown is not None:
            await on_shutdown()

    app = FastAPI(title="steer-serve", version="0.1.0", lifespan=lifespan, default_response_class=JSONBody,
                  description=openapi_docs.DESCRIPTION, openapi_tags=openapi_docs.TAGS)
    app.state.steer = state
    install_error_handlers(app, on_error=state.metrics.error)
    app.include_router(routes_openai.router)
    app.include_router(routes_interventions.router)

    def body_limit(scope, headers) -> int:
        """The upload limit only for a multipart registration; every other body gets the plain limit."""
        is_upload = (scope["method"] == "POST" and scope["path"] == "/v1/interventions"
                     and headers.get("content-type", "").startswith("multipart/form-data"))
        return state.max_upload_bytes * 2 + 65536 if is_upload else state.max_body_bytes

    app.add_middleware(RequestContext, limit_for=body_limit, max_header_bytes=state.max_header_bytes,
                       on_error=state.metrics.error)
    if state.cors_origins:  # off unless --cors-origin is given
        app.add_middleware(CORSMiddleware, allow_origins=state.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"])

    docs = openapi_docs

    @app.get("/health", tags=["ops"], summary="Liveness: the engine is running",
             responses={**docs.ok(docs.Health, {"status": "ok"}), **docs.errors(503)})
    async def health():
        try:
            await state.engine.check_health(state.engine_stall_timeout)
        except Exception as exc:
            return error_response(503, f"engine unhealthy: {exc}", code="engine_dead")
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], summary="Readiness: accepting requests (503 while shutting down)",
             responses={**docs.ok(docs.Ready, {"status": "ready", "in_flight": 3}), **docs.errors(503)})
    async def ready():
        if failure := state.engine_failure():
            return error_response(503, failure, code="engine_dead")
        if not state.ready:
            return error_response(503, "shutting down", code="not_ready")
        return {"status": "ready", "in_flight": state.limiter.in_flight, "sequences": state.limiter.sequences}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format: requests/tokens per intervention, TTFT and "
                                             "TPOT histograms, slot pool occupancy, evictions, load latency, "
                                             "errors by status code",
                              "content": {"text/plain": {"schema": {"type": "string"},
                                                         "example": docs.METRICS_EXAMPLE}}}})
    async def metrics():
        from steer_serve.api.vllm_frontend import vllm_metrics

        return Response(state.metrics.render(state.registry, state.limiter.in_flight)
                        + vllm_metrics(without=state.metrics.info.NAME),
                        media_type="text/plain; version=0.0.4")

    openapi_docs.install(app)
    return app
