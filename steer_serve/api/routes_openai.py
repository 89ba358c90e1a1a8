"""The OpenAI routes: vLLM's own handlers behind a thin steering layer.

For each generation request the layer resolves the intervention fields (``intervention``,
``interventions``, ``intervention_scale``/``intervention_positions``, or ``model`` = an intervention
or adapter id), checks the server's limits, pins the interventions into device slots, and hands
the request to vLLM's handler with the slots in ``vllm_xargs`` (→ ``SamplingParams.extra_args``,
read by the engine's step hook), a ``cache_salt`` for the intervention set, and an adapter as the
LoRA ``model``. The pins are given back when the response ends, however it ends. Everything else
(prompt rendering, sampling fields, structured outputs, tools, logprobs, streaming formats) is vLLM's.
"""
from __future__ import annotations

import contextlib
import uuid

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from steer_serve.api import openapi_docs as docs
from steer_serve.api.capture import capture_salt, fetch_captures, plan_capture, with_choice_field
from steer_serve.api.condition import condition_salt, plan_condition
from steer_serve.api.interchange import Plan, check_site_order, interchange_edit, source_terms, subspace_axes
from steer_serve.api import vllm_frontend as vllm
from steer_serve.api.auth import require_api_key
from steer_serve.api.errors import APIError
from steer_serve.engine.capture import CaptureRequest
from steer_serve.engine.condition import ConditionRequest
from steer_serve.interventions.positions import parse_positions
from steer_serve.engine import interchange
from steer_serve.engine.config import RequestSteering
from steer_serve.registry import Lease, RegistryError

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"], responses=docs.errors(401, 500))
_GENERATION_ERRORS = docs.errors(400, 404, 413, 429)
_FIELDS = ("`intervention`, `interventions`, `intervention_scale` and `intervention_positions` (send them with "
           "the OpenAI SDK through `extra_body`), or `model` set to an intervention id")


class GuardedStream(StreamingResponse):
    """An SSE response whose ``on_close`` always runs once it ends: finished, failed, or client gone.

    Starlette cancels a streaming response when the client disconnects (and never iterates the
    body if the client left before the first byte); the cleanup here is shielded from that
    cancellation, so the engine request is aborted and the slot pins are given back every time.
    """

    def __init__(self, inner: StreamingResponse, on_close):
        super().__init__(inner.body_iterator, status_code=inner.status_code, headers=dict(inner.headers),
                         media_type=inner.media_type)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self.on_close()


async def resolve_interventions(body, state) -> list[tuple[str, float | None, str | None]]:
    """The (id, scale, positions) columns a request asks for, in application order."""
    requested: list[tuple[str, float | None, str | None]] = []
    model = body.model
    if model and model != state.served_model_name:
        try:
            await state.registry.resolve(model)
        except RegistryError:
            raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model") from None
        requested.append((model, None, None))
    if body.intervention:
        requested.append((body.intervention, None, None))
    for ref in body.interventions or []:
        requested.append((ref.id, ref.scale, ref.positions))
    if body.intervention_scale is not None or body.intervention_positions is not None:
        requested = [(i, s if s is not None else body.intervention_scale, p or body.intervention_positions)
                     for i, s, p in requested]
    return requested


async def interchange_plans(body, state, requested) -> tuple[list[Plan], list]:
    """A :class:`Plan` for each requested intervention given a ``source``, and the requested columns that take a
    slot (all but those with ``subspaces``, whose term carries the whole edit); 400s for a source on what is no
    interchange, a missing one, ``subspaces`` without a source or out of range, or a later edit at its site."""
    state.registry.require_steerable([ident for ident, _, _ in requested])
    refs = body.interventions or []
    offset = len(requested) - len(refs)
    columns, plans, slotted = [], [], []
    for j, (ident, scale, positions) in enumerate(requested):
        entry = await state.registry.resolve(ident)
        index = j - offset
        source = refs[index].source if index >= 0 else None
        subspaces = refs[index].subspaces if index >= 0 else None
        if subspaces is not None and source is None:
            raise APIError(400, f"interventions[{index}].subspaces select what an interchange takes from its source: "
                                "give `source` too", code="invalid_value", param=f"interventions[{index}].subspaces")
        edit = interchange_edit(entry, index, source is not None)
        columns.append((entry, edit))
        axes = subspace_axes(edit, subspaces, index) if subspaces is not None else None
        if edit is not None:
            plans.append(Plan(index, edit, source, entry.scale if scale is None else float(scale),
                              entry.positions if positions is None else positions, axes))
        if axes is None:
            slotted.append((ident, scale, positions))
    check_site_order(columns)
    if plans and getattr(body, "use_beam_search", False):
        raise APIError(400, "an interchange source is not served with beam search", code="unsupported_value",
                       param="interventions")
    return plans, slotted


def _requested_max_tokens(body, kind: str) -> tuple[str, int | None]:
    if kind == "responses":
        return "max_output_tokens", body.max_output_tokens
    if kind == "chat" and body.max_completion_tokens is not None:
        return "max_completion_tokens", body.max_completion_tokens
    return "max_tokens", body.max_tokens


def _apply_token_limit(body, kind: str, limit: int) -> None:
    """``--max-tokens-limit``: a larger request is a 400; an unset one gets the limit (vLLM clamps it
    further to the context left)."""
    field, requested = _requested_max_tokens(body, kind)
    if requested is None:
        setattr(body, field, limit)
    elif requested > limit:
        raise APIError(400, f"{field} {requested} exceeds this server's limit {limit}", code="invalid_value",
                       param=field)


def _refuse_batched_beam_search(body) -> None:
    """vLLM runs the beam searches of a batched ``prompt`` under one request id, so their steps could not
    be told apart to count each one's positions from its own prompt: one prompt per request."""
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list)):
        raise APIError(400, "use_beam_search with an intervention takes one prompt per request, not a batch",
                       code="unsupported_value", param="prompt")


def sequences_of(body, kind: str) -> tuple[int, str]:
    """The sequences a request makes the engine run (prompts × ``n``; beams for beam search), and the
    field to name when there are too many."""
    prompt = getattr(body, "prompt", None)
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    n = (getattr(body, "n", None) or 1) if kind != "responses" else 1
    return prompts * n, ("prompt" if prompts > 1 and n == 1 else "n")


def _prepend_virtual_tokens(body, lease: Lease, kind: str, state) -> None:
    """A prompt-space adapter: the completion's prompt becomes ``prompt_embeds`` behind the virtual tokens."""
    if kind != "completion":
        raise APIError(400, "prompt-space adapters (prompt tuning, P-tuning, multitask prompt tuning) are served "
                       "on /v1/completions only: vLLM takes prompt embeddings there", code="unsupported_value",
                       param="interventions")
    if state.prompt_embedder is None:
        raise APIError(400, "this server was started without --enable-prompt-embeds, so it cannot serve "
                       "prompt-space adapters", code="prompt_embeds_disabled", param="interventions")
    if getattr(body, "use_beam_search", False):
        raise APIError(400, "use_beam_search cannot be combined with a prompt-space adapter", code="unsupported_value",
                       param="use_beam_search")
    state.prompt_embedder.apply(body, lease.prompt)


def _count_back_from_max_tokens(body, kind: str, steering: RequestSteering) -> None:
    """Give the steering the answer's allowed length when a position counts back from it (``g-8:``); 400
    when the request leaves it to the server."""
    if not any(parse_positions(p).needs_max_tokens for p in steering.positions):
        return
    param, value = _requested_max_tokens(body, kind)
    if value is None:
        raise APIError(400, f"positions counting back from the end of the answer (g-<n>:) need `{param}`",
                       code="invalid_value", param=param)
    steering.max_new_tokens = int(value)


def _hand_over(body, lease: Lease | None, request: Request, kind: str, capture: CaptureRequest | None = None,
               terms: list | None = None, condition: ConditionRequest | None = None) -> None:
    """Put the lease, the capture, the condition and the interchange source rows where vLLM carries per-request
    data: extra args, cache salt (one of the request's own with a capture, a condition or a source), LoRA model
    name, and a prompt-space adapter's virtual tokens in front of the prompt's embeddings."""
    state = request.app.state.steer
    body.model = state.served_model_name
    if capture is not None or terms or condition is not None:
        extra = {**(capture.to_extra_args() if capture else {}), **(interchange.to_extra_args(terms) if terms else {}),
                 **(condition.to_extra_args() if condition else {})}
        body.vllm_xargs = {**(body.vllm_xargs or {}), **extra}
        salt = (capture_salt(capture) if capture else condition_salt(condition) if condition
                else f"interchange-{uuid.uuid4().hex}")
        body.cache_salt = f"{salt}:{body.cache_salt}" if body.cache_salt else salt
    if lease is None:
        return
    if lease.steering.slots:
        _count_back_from_max_tokens(body, kind, lease.steering)
        body.vllm_xargs = {**(body.vllm_xargs or {}), **lease.steering.to_extra_args()}
        if getattr(body, "use_beam_search", False):
            _refuse_batched_beam_search(body)
            vllm.steer_beam_search(lease.steering)
    if lease.cache_salt:
        body.cache_salt = f"{lease.cache_salt}:{body.cache_salt}" if body.cache_salt else lease.cache_salt
    if lease.lora is not None:
        name, int_id, path = lease.lora
        vllm.offer_lora(request.app.state, name, int_id, path)
        body.model = name
    if lease.prompt is not None:
        _prepend_virtual_tokens(body, lease, kind, state)


async def _steered(request: Request, body, kind: str) -> Response:
    state = request.app.state.steer
    if failure := state.engine_failure():
        raise APIError(503, f"{failure}; the server is shutting down", code="engine_dead")
    for key in (RequestSteering.EXTRA_ARGS_KEY, CaptureRequest.EXTRA_ARGS_KEY, interchange.EXTRA_ARGS_KEY,
                ConditionRequest.EXTRA_ARGS_KEY):
        if key in (getattr(body, "vllm_xargs", None) or {}):
            raise APIError(400, f"vllm_xargs.{key} is reserved: name interventions with " + _FIELDS + " and captures "
                           "with `capture`", code="invalid_value", param="vllm_xargs")
    requested = await resolve_interventions(body, state)
    capture = plan_capture(body, kind, state)
    plans, slotted = await interchange_plans(body, state, requested)
    condition = await plan_condition(body, kind, state, requested)
    _apply_token_limit(body, kind, state.max_tokens_limit)
    labels = [i for i, _, _ in requested] or ["none"]
    request.state.user = getattr(body, "user", None)
    request.state.interventions, request.state.stream = ",".join(labels), bool(body.stream)
    sequences, param = sequences_of(body, kind)
    state.limiter.enter(sequences, param)  # 400 past the per-request cap, 429 when the server is full
    lease, captured, decided = None, None, None

    async def fetch() -> list[dict]:
        nonlocal captured
        if captured is None:
            captured = await fetch_captures(state.engine, capture[0], capture[1], state.registry.geometry.widths)
        return captured

    async def decision() -> dict | None:
        nonlocal decided
        if decided is None:
            decided = {"decision": await state.engine.take_condition(condition.key)}
        return decided["decision"]

    async def finish() -> None:
        nonlocal lease
        if lease is not None:
            await state.registry.release(lease)
            lease = None
        state.limiter.leave(sequences)
        if capture is not None and captured is None and not state.engine_failure():
            with contextlib.suppress(Exception):  # drop what a failed or departed request recorded
                await state.engine.take_capture(capture[0].key)
        if condition is not None and decided is None and not state.engine_failure():
            with contextlib.suppress(Exception):
                await state.engine.take_condition(condition.key)

    try:
        terms = await source_terms(state.engine, plans) if plans else None
        lease = await state.registry.acquire(slotted) if slotted else None
        _hand_over(body, lease, request, kind, capture[0] if capture else None, terms, condition)
        state.metrics.request_started(labels)
        response = await state.handlers[kind](body, request)
        if capture is not None:
            response = await with_choice_field(response, "captures", fetch)
        if condition is not None:
            response = await with_choice_field(response, "condition", decision)
    except BaseException:
        await finish()
        raise
    if isinstance(response, StreamingResponse):
        return GuardedStream(response, finish)
    await finish()
    return response


@router.get("/v1/models", summary="List the base model and every registered intervention",
            description="Interventions are listed with `parent` = the base model, so `model: \"<intervention id>\"` "
                        "works like a vLLM LoRA name.",
            responses=docs.ok(docs.ModelList, docs.MODELS_EXAMPLE))
async def list_models(request: Request):
    state = request.app.state.steer
    return {"object": "list", "data": _model_cards(state)}


@router.get("/v1/models/{model_id:path}", summary="One model card: the base model or an intervention",
            responses={**docs.ok(docs.ModelCard, docs.MODELS_EXAMPLE["data"][0]), **docs.errors(404)})
async def get_model(model_id: str, request: Request):
    card = next((c for c in _model_cards(request.app.state.steer) if c["id"] == model_id), None)
    if card is None:
        raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model")
    return card


def _model_cards(state) -> list[dict]:
    cards = [{"id": state.served_model_name, "object": "model", "created": state.started, "owned_by": "steer-serve",
              "root": state.model_path, "parent": None, "max_model_len": state.max_model_len}]
    for entry in state.registry.entries.values():
        if not entry.deleting:
            cards.append({"id": entry.id, "object": "model", "created": entry.created, "owned_by": "steer-serve",
                          "root": entry.source, "parent": state.served_model_name})
    return cards


@router.post("/v1/completions", summary="OpenAI completions (vLLM's), optionally with interventions",
             description=f"vLLM's completions API, every field as vLLM reads it, plus {_FIELDS}.",
             responses={**docs.ok(docs.Completion, docs.COMPLETION_EXAMPLE,
                                  stream_example=docs.COMPLETION_STREAM_EXAMPLE), **_GENERATION_ERRORS})
async def completions(body: vllm.SteerCompletionRequest, request: Request):
    return await _steered(request, body, "completion")


@router.post("/v1/chat/completions", summary="OpenAI chat completions (vLLM's), optionally with interventions",
             description=f"vLLM's chat completions API (chat template, tools, structured outputs, ...) plus {_FIELDS}.",
             responses={**docs.ok(docs.ChatCompletion, docs.CHAT_EXAMPLE, stream_example=docs.CHAT_STREAM_EXAMPLE),
                        **_GENERATION_ERRORS})
async def chat_completions(body: vllm.SteerChatCompletionRequest, request: Request):
    return await _steered(request, body, "chat")


@router.post("/v1/responses", summary="OpenAI Responses API (vLLM's), optionally with interventions",
             description=f"vLLM's Responses API plus {_FIELDS}.",
             responses={**docs.ok(vllm.ResponsesResponse, docs.RESPONSE_EXAMPLE), **_GENERATION_ERRORS})
async def responses(body: vllm.SteerResponsesRequest, request: Request):
    return await _steered(request, body, "responses")


@router.get("/v1/responses/{response_id}", summary="A stored response (vLLM's)",
            responses={**docs.ok(vllm.ResponsesResponse, docs.RESPONSE_EXAMPLE), **docs.errors(404)})
async def retrieve_response(response_id: str, request: Request, starting_after: int | None = None,
                            stream: bool | None = False):
    return await vllm.RETRIEVE_RESPONSE(response_id, request, starting_after=starting_after, stream=stream)


@router.post("/v1/responses/{response_id}/cancel", summary="Cancel a background response (vLLM's)",
             responses={**docs.ok(vllm.ResponsesResponse, docs.RESPONSE_EXAMPLE), **docs.errors(404)})
async def cancel_response(response_id: str, request: Request):
    return await vllm.CANCEL_RESPONSE(response_id, request)


@router.post("/tokenize", summary="Tokenize a prompt or a chat (vLLM's)",
             responses={**docs.ok(vllm.TokenizeResponse, docs.TOKENIZE_EXAMPLE), **docs.errors(400)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "oneOf": [{"$ref": "#/components/schemas/SteerTokenizeCompletionRequest"},
                           {"$ref": "#/components/schemas/SteerTokenizeChatRequest"}]}}}}})
async def tokenize(request: Request):
    try:
        payload = await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    return await vllm.TOKENIZE(vllm.tokenize_request(payload), request)


@router.post("/detokenize", summary="Token ids to text (vLLM's)",
             responses={**docs.ok(vllm.DetokenizeResponse, {"prompt": "Hello world"}), **docs.errors(400)})
async def detokenize(body: vllm.SteerDetokenizeRequest, request: Request):
    return await vllm.DETOKENIZE(body, request)


@router.get("/version", summary="vLLM's version", responses=docs.ok(docs.Version, {"version": "0.32.0"}))
async def version():
    return await vllm.VERSION()


_PING_DOC = {200: {"description": "the engine is alive (empty body)",
                   "content": {"text/plain": {"schema": {"type": "string"}, "example": ""}}}}


@router.get("/ping", summary="Liveness, as vLLM's GET /ping", response_class=Response, responses=_PING_DOC)
@router.post("/ping", summary="Liveness, as vLLM's POST /ping", response_class=Response, responses=_PING_DOC,
             operation_id="ping_post")
async def ping(request: Request):
    state = request.app.state.steer
    await state.engine.check_health(state.engine_stall_timeout)
    return Response(status_code=200)
