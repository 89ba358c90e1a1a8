"""OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (with SSE streaming)."""
from __future__ import annotations

import time
from contextlib import aclosing

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from steer_serve.api import openapi_docs as docs
from steer_serve.api.auth import require_api_key
from steer_serve.api.errors import APIError, JSONBody, error_body
from steer_serve.api.generation import (
    GenerationRun, chat_logprobs, chat_prompt, completion_logprobs, completion_prompts, max_new_tokens,
    resolve_interventions, sampling_params, sse,
)
from steer_serve.api.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"],
                   responses=docs.errors(401, 500))
_GENERATION_ERRORS = docs.errors(400, 404, 413, 429)


class GuardedStream(StreamingResponse):
    """An SSE response whose ``on_close`` always runs once it ends: finished, failed, or client gone.

    Starlette cancels a streaming response when the client disconnects (and never iterates the
    body if the client left before the first byte); the cleanup here is shielded from that
    cancellation, so the engine request is aborted and the slot pins are given back every time.
    """

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.on_close()


@router.get("/models", summary="List the base model and every registered intervention",
            description="Interventions are listed with `parent` = the base model, so `model: \"<intervention id>\"` "
                        "works like a vLLM LoRA name.",
            responses=docs.ok(docs.ModelList, docs.MODELS_EXAMPLE))
async def list_models(request: Request):
    state = request.app.state.steer
    created = state.started
    data = [{"id": state.served_model_name, "object": "model", "created": created, "owned_by": "steer-serve",
             "root": state.model_path, "parent": None, "max_model_len": state.max_model_len}]
    for entry in state.registry.entries.values():
        if entry.deleting:
            continue
        data.append({"id": entry.id, "object": "model", "created": entry.created, "owned_by": "steer-serve",
                     "root": entry.source, "parent": state.served_model_name})
    return {"object": "list", "data": data}


@router.post("/completions", summary="OpenAI completions, optionally with interventions",
             description="OpenAI's completions API plus `intervention`, `interventions`, `intervention_scale`, "
                         "`intervention_positions` and `return_token_ids` (send them with the OpenAI SDK through "
                         "`extra_body`). With `stream: true` the answer is a server-sent event stream.",
             responses={**docs.ok(docs.Completion, docs.COMPLETION_EXAMPLE,
                                  stream_example=docs.COMPLETION_STREAM_EXAMPLE), **_GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.steer
    if body.echo and body.stream:
        raise APIError(400, "echo is not supported with stream=true on this server", param="echo",
                       code="unsupported_field")
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo=true (it scores the prompt and generates nothing)",
                       param="max_tokens", code="invalid_value")
    prompts = completion_prompts(body, state.tokenizer, state.vocab_size)
    requested = None if body.max_tokens is None else max(body.max_tokens, 1)  # 0: one token, dropped
    max_tokens = max(max_new_tokens(requested, len(p.token_ids), state, "prompt") for p in prompts)
    prompt_logprobs = body.logprobs if body.echo else None
    params = sampling_params(body, max_tokens, body.logprobs, body.stream, prompt_logprobs)
    return await _serve(request, body, prompts, params, "text_completion")


@router.post("/chat/completions", summary="OpenAI chat completions, optionally with interventions",
             description="OpenAI's chat completions API (the model's chat template) plus the intervention fields; "
                         "`stream_options.include_usage` adds a final chunk with `usage`.",
             responses={**docs.ok(docs.ChatCompletion, docs.CHAT_EXAMPLE, stream_example=docs.CHAT_STREAM_EXAMPLE),
                        **_GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.steer
    prompt = chat_prompt(body, state.tokenizer)
    requested_max = body.max_completion_tokens or body.max_tokens
    max_tokens = max_new_tokens(requested_max, len(prompt.token_ids), state)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs", code="invalid_value")
    params = sampling_params(body, max_tokens, logprobs, body.stream)
    return await _serve(request, body, [prompt], params, "chat")


async def _serve(request: Request, body, prompts, params, kind: str):
    state = request.app.state.steer
    requested = resolve_interventions(body, body.model, state)
    ids = [i for i, _, _ in requested] or [None]
    labels = ",".join(i for i in ids if i) or "none"
    request.state.user, request.state.interventions, request.state.stream = body.user, labels, body.stream
    state.limiter.enter()  # 429 when the server is full
    try:
        lease = await state.registry.acquire(requested) if requested else None
    except BaseException:
        state.limiter.leave()
        raise
    run = GenerationRun(state, prompts, params, lease, "chat" if kind == "chat" else "completion")
    state.metrics.request_started(labels)
    if body.stream:
        return GuardedStream(_stream(state, run, body, kind, labels), lambda: _finish(state, run),
                             media_type="text/event-stream")
    try:
        return JSONBody(await _collect(state, run, body, kind, labels))
    finally:
        await _finish(state, run)


async def _finish(state, run: GenerationRun) -> None:
    """Give back the request's slot pins and its place in the concurrency limit (exactly once)."""
    if run.finished:
        return
    run.finished = True
    if run.lease is not None:
        await state.registry.release(run.lease)
        run.lease = None
    state.limiter.leave()


def _scores_only(body) -> bool:
    """``max_tokens: 0`` (with ``echo``): the engine ran one token that the answer leaves out."""
    return body.max_tokens == 0


def _generated_ids(body, output) -> list[int]:
    return [] if _scores_only(body) else list(output.token_ids)


def _choice(state, body, kind: str, choice_index: int, prompt, output, *, first_chunk: bool | None = None,
            prompt_logprobs: list | None = None) -> dict:
    """One choice of a response (``first_chunk`` set: of a stream chunk, whose text is a delta).

    With ``echo`` (completions, not streamed) the prompt comes first, in the text and in the
    logprobs (``prompt_logprobs``: vLLM's, first entry None); ``max_tokens: 0`` drops the output."""
    streaming = first_chunk is not None
    if kind == "chat":
        logprobs = chat_logprobs(output, state.tokenizer, body.top_logprobs or 0)
    else:
        token_ids = _generated_ids(body, output)
        logprobs = list(output.logprobs or []) if token_ids else []
        if body.echo and not streaming:
            token_ids = prompt.token_ids + token_ids
            logprobs = (prompt_logprobs or []) + logprobs
        logprobs = completion_logprobs(token_ids, logprobs, state.tokenizer) if body.logprobs is not None else None
    if kind == "chat":
        if streaming:
            message = {"delta": {"role": "assistant", "content": output.text} if first_chunk else {"content": output.text}}
        else:
            message = {"message": {"role": "assistant", "content": output.text}}
        choice = {"index": choice_index, **message, "logprobs": logprobs, "finish_reason": output.finish_reason}
    else:
        text = output.text if not _scores_only(body) else ""
        if body.echo and not streaming:
            text = (prompt.text or state.tokenizer.decode(prompt.token_ids)) + text
        choice = {"index": choice_index, "text": text, "logprobs": logprobs,
                  "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
    if body.return_token_ids:
        choice["token_ids"] = _generated_ids(body, output)
        if not streaming or first_chunk:
            choice["prompt_token_ids"] = prompt.token_ids
    return choice


async def _collect(state, run: GenerationRun, body, kind: str, labels: str) -> dict:
    choices, completion_tokens, cached_tokens = {}, 0, 0
    started = time.perf_counter()
    first_token = None
    async with aclosing(run.stream()) as outputs:
        async for index, result in outputs:
            cached_tokens += result.num_cached_tokens or 0
            for output in result.outputs:
                if first_token is None and output.token_ids:
                    first_token = time.perf_counter()
                choice_index = index * body.n + output.index
                completion_tokens += len(_generated_ids(body, output))
                choices[choice_index] = _choice(state, body, kind, choice_index, run.prompts[index], output,
                                                prompt_logprobs=result.prompt_logprobs)
    prompt_tokens = sum(len(p.token_ids) for p in run.prompts)
    state.metrics.request_finished(labels, prompt_tokens, completion_tokens, started, first_token)
    return {"id": run.id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": run.created, "model": body.model or state.served_model_name,
            "choices": [choices[i] for i in sorted(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}}}


async def _stream(state, run: GenerationRun, body, kind: str, labels: str):
    model = body.model or state.served_model_name
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    completion_tokens = 0
    started = time.perf_counter()
    first_token = None
    started_choices: set[int] = set()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        async with aclosing(run.stream()) as outputs:
            async for index, result in outputs:
                for output in result.outputs:
                    if first_token is None and output.token_ids:
                        first_token = time.perf_counter()
                    choice_index = index * body.n + output.index
                    completion_tokens += len(output.token_ids)
                    first_chunk = choice_index not in started_choices
                    started_choices.add(choice_index)
                    choice = _choice(state, body, kind, choice_index, run.prompts[index], output,
                                     first_chunk=first_chunk)
                    chunk = {"id": run.id, "object": obj, "created": run.created, "model": model, "choices": [choice]}
                    if include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
        prompt_tokens = sum(len(p.token_ids) for p in run.prompts)
        if include_usage:
            yield sse({"id": run.id, "object": obj, "created": run.created, "model": model, "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}})
        state.metrics.request_finished(labels, prompt_tokens, completion_tokens, started, first_token)
        yield sse("[DONE]")
    except Exception as exc:  # the stream has started: report in-band, like OpenAI does
        state.metrics.error(500)
        yield sse(error_body(500, f"generation failed: {type(exc).__name__}: {exc}", code="internal_error"))
        yield sse("[DONE]")
