"""Start everything for ``steer-serve serve``: engine, registry, app, vLLM's handlers, uvicorn — one event loop."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from steer_serve.api.app import AppState, create_app
from steer_serve.api.http_protocol import guarded_protocol
from steer_serve.api.prompt_embeds import PromptEmbedder
from steer_serve.engine.engine import EngineSettings, SteerEngine
from steer_serve.model import cache_dir
from steer_serve.registry import InterventionRegistry, claim_registry_dir, open_store

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """HTTP-side settings (the engine's are in :class:`EngineSettings`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    allowed_dirs: list[str] = field(default_factory=list)
    preload: dict[str, str] = field(default_factory=dict)
    preload_positions: str | None = None
    api_key: str | None = None
    admin_api_key: str | None = None
    allow_hub: bool = True
    registry_dir: str | None = None
    shared_registry: bool = False          # replicas share --registry-dir (registry/store.py)
    registry_store: str | None = None       # a networked store shared by replicas (registry/redis_store.py)
    registry_poll_interval: float = 1.0    # how often a shared registry is checked for others' changes
    max_tokens_limit: int = 4096
    max_capture_sites: int = 8
    max_capture_bytes: int = 64 * 1024 * 1024
    max_concurrent_requests: int = 256
    max_concurrent_sequences: int = 256
    max_sequences_per_request: int = 64
    http_header_timeout: float = 10.0
    http_body_timeout: float = 60.0
    http_keep_alive_timeout: int = 75
    max_header_bytes: int = 16384
    max_body_bytes: int = 2 * 1024 * 1024
    max_upload_bytes: int = 64 * 1024 * 1024
    max_placements: int = 256
    cors_origins: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    engine_stall_timeout: float = 30.0
    vllm_args: object = None   # ``vllm serve``'s parsed flags (argparse.Namespace), for vLLM's handlers


def registry_path(settings: ServerSettings) -> Path:
    """Where this server persists its registry (``--registry-dir``, default under the cache dir)."""
    return Path(settings.registry_dir) if settings.registry_dir else cache_dir() / "registry"


async def build_state(engine: SteerEngine, settings: ServerSettings) -> AppState:
    """Registry (restored from disk, then preloads) around a started engine."""
    from steer_serve.formats import load_intervention

    model_path = engine.settings.model
    persist = registry_path(settings)
    registry = InterventionRegistry(engine, persist_dir=persist, shared=settings.shared_registry,
                                    store_url=settings.registry_store)
    restored = await registry.restore()
    if restored:
        logger.warning("restored %d intervention(s) from %s: %s", len(restored), persist, ", ".join(restored))
    for name, source in settings.preload.items():
        iv = await asyncio.to_thread(load_intervention, source, allowed_dirs=None, positions=settings.preload_positions,
                                     hidden_size=registry.geometry.hidden_size or None,
                                     num_layers=registry.geometry.num_layers or None,
                                     widths=registry.geometry.widths, heads=registry.geometry.heads)
        await registry.register(name, iv, source=source, format=iv.source_format, replace=True)
    model_config = engine.llm.model_config
    return AppState(
        engine=engine, registry=registry,
        served_model_name=engine.served_model_name,
        model_path=model_path, max_model_len=model_config.max_model_len,
        allowed_dirs=settings.allowed_dirs,
        allow_hub=settings.allow_hub, api_key=settings.api_key, admin_api_key=settings.admin_api_key,
        max_tokens_limit=settings.max_tokens_limit, max_capture_sites=settings.max_capture_sites,
        max_capture_bytes=settings.max_capture_bytes, max_concurrent_requests=settings.max_concurrent_requests,
        max_concurrent_sequences=settings.max_concurrent_sequences,
        max_sequences_per_request=settings.max_sequences_per_request,
        max_header_bytes=settings.max_header_bytes, max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        max_placements=settings.max_placements, cors_origins=settings.cors_origins,
        engine_stall_timeout=settings.engine_stall_timeout,
        prompt_embedder=PromptEmbedder(model_path, model_config.dtype) if model_config.enable_prompt_embeds else None)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app not ready (``/ready`` 503) as soon as SIGTERM/SIGINT arrives;
    uvicorn then stops accepting connections and lets in-flight requests finish (``drain_timeout``)."""

    def __init__(self, config: uvicorn.Config, state: AppState):
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig, frame) -> None:
        self.app_state.ready = False
        super().handle_exit(sig, frame)


ENGINE_WATCH_INTERVAL_S = 1.0
ENGINE_FAILURE_DRAIN_S = 2.0   # /ready 503 is seen and in-flight requests end before the exit


async def _watch_the_engine(engine: SteerEngine, state: AppState, server: uvicorn.Server) -> str | None:
    """vLLM's own server watches its engine the same way: once the engine core is dead (killed, OOM)
    or frozen (a round trip, answered between steps, outstanding for ``--engine-stall-timeout``),
    ``/ready`` and new requests answer 503, in-flight ones end with a 5xx (a frozen engine is shut
    killed for that), and after a short drain the server stops, so the process exits non-zero and a
    supervisor or load balancer reacts instead of it answering 500 or hanging for ever. Returns the
    reason, or None once a normal shutdown began (which stops the engine itself)."""
    probe, probe_started = None, 0.0
    while state.ready:
        reason = engine.failure()
        if reason is None and probe is not None and not probe.done() and \
                time.monotonic() - probe_started > state.engine_stall_timeout:
            reason = state.engine_frozen = f"the engine has not answered for {state.engine_stall_timeout:g} s (frozen)"
            probe.cancel()
        if reason is None:
            if probe is None or probe.done():
                if probe is not None and not probe.cancelled():
                    probe.exception()   # a failed probe means death, which the next turn sees
                probe, probe_started = asyncio.ensure_future(engine.llm.is_sleeping()), time.monotonic()
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
            continue
        logger.error("%s: shutting the server down", reason)
        state.ready = False
        if engine.failure() is None:
            engine.kill_processes()     # frozen: it cannot act on SIGTERM; its in-flight requests then fail
        await asyncio.sleep(ENGINE_FAILURE_DRAIN_S)
        server.should_exit = True
        return reason
    return None


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound before the engine starts (as vLLM's server does) so that nothing takes the
    port while the model loads; port 0 binds a free one (the log's "listening on" line names it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"steer-serve: cannot bind {host}:{port}: {exc.strerror}") from exc
    return sock


async def serve(engine_settings: EngineSettings, settings: ServerSettings) -> None:
    """Run until SIGINT/SIGTERM; in-flight requests drain for up to ``drain_timeout`` seconds."""
    # before the engine: a clash fails fast
    registry_lock = claim_registry_dir(registry_path(settings), shared=settings.shared_registry)
    if settings.registry_store:
        open_store(registry_path(settings), url=settings.registry_store).check()
    listening = bind_listening_socket(settings.host, settings.port)
    port = listening.getsockname()[1]
    logger.warning("steer-serve listening on http://%s:%d (the engine is starting)", settings.host, port)
    try:
        engine = await SteerEngine.start(engine_settings)
    except BaseException:
        listening.close()
        raise

    async def stop_engine() -> None:
        # runs inside uvicorn's lifespan shutdown, after in-flight requests drained: uvicorn
        # re-raises SIGTERM once serve() returns, so a `finally` after it would never run.
        engine.shutdown()

    try:
        from steer_serve.api.vllm_frontend import frontend_args, init_frontend

        state = await build_state(engine, settings)
        app = create_app(state, on_shutdown=stop_engine)
        vllm_args = settings.vllm_args or frontend_args(engine.settings.model, state.served_model_name, [])
        await init_frontend(app.state, engine.llm, vllm_args)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                access_log=False,  # ours is structured, with request ids (api/middleware.py)
                                http=guarded_protocol(header_timeout=settings.http_header_timeout,
                                                      body_timeout=settings.http_body_timeout),
                                h11_max_incomplete_event_size=settings.max_header_bytes,
                                timeout_keep_alive=settings.http_keep_alive_timeout,
                                timeout_graceful_shutdown=int(settings.drain_timeout))
        server = _DrainingServer(config, state)
        logger.warning("steer-serve ready on http://%s:%d (model %s)", settings.host, port,
                       state.served_model_name)
        watchdog = asyncio.create_task(_watch_the_engine(engine, state, server))
        follower = asyncio.create_task(state.registry.watch(settings.registry_poll_interval)) \
            if settings.shared_registry or settings.registry_store else None
        await server.serve(sockets=[listening])
        if watchdog.done() and watchdog.result():
            raise SystemExit(f"steer-serve: {watchdog.result()}; exiting so that a supervisor restarts the server")
        watchdog.cancel()
        if follower is not None:
            follower.cancel()
    finally:
        engine.shutdown()
        listening.close()
        registry_lock.close()
