"""From an OpenAI request to vLLM and back: sampling params, leases, responses and SSE streams."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from steer_serve.api.errors import APIError
from steer_serve.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, SteeringFields
from steer_serve.registry import Lease


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None


def resolve_interventions(body: SteeringFields, model: str | None, state) -> list[tuple[str, float | None, str | None]]:
    """The (id, scale, positions) columns a request asks for, in application order."""
    requested: list[tuple[str, float | None, str | None]] = []
    if model and model != state.served_model_name:
        if model not in state.registry.entries:
            raise APIError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        requested.append((model, None, None))
    if body.intervention:
        requested.append((body.intervention, None, None))
    for ref in body.interventions or []:
        requested.append((ref.id, ref.scale, ref.positions))
    if body.intervention_scale is not None or body.intervention_positions is not None:
        requested = [(i, s if s is not None else body.intervention_scale, p or body.intervention_positions)
                     for i, s, p in requested]
    return requested


def sampling_params(body: SamplingFields, max_tokens: int, logprobs: int | None, stream: bool,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """vLLM sampling parameters for ``body``; combinations vLLM refuses become a 400."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    try:
        return SamplingParams(
            n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
            stop=stop, max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
    except ValueError as exc:
        raise APIError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from None


def max_new_tokens(requested: int | None, prompt_len: int, state, prompt_field: str = "messages") -> int:
    """The request's token budget, checked against the server's limit and the context length."""
    room = state.max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens; the prompt has "
                       f"{prompt_len}.", code="context_length_exceeded", param=prompt_field)
    if requested is None:
        return min(room, state.default_max_tokens, state.max_tokens_limit)
    if requested > state.max_tokens_limit:
        raise APIError(400, f"max_tokens {requested} exceeds this server's limit {state.max_tokens_limit}",
                       code="invalid_value", param="max_tokens")
    if requested > room:
        raise APIError(400, f"max_tokens {requested} plus the prompt's {prompt_len} tokens exceeds the maximum "
                       f"context length {state.max_model_len}", code="context_length_exceeded", param="max_tokens")
    return requested


def completion_prompts(body: CompletionRequest, tokenizer, vocab_size: int) -> list[Prompt]:
    raw = body.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(_tokenize(tokenizer, item, True), item))
        else:
            if any((not isinstance(t, int)) or t < 0 or t >= vocab_size for t in item):
                raise APIError(400, f"prompt token ids must be integers in [0, {vocab_size})", param="prompt",
                               code="invalid_value")
            prompts.append(Prompt(list(item), None))
    for p in prompts:
        if not p.token_ids:
            raise APIError(400, "prompt is empty after tokenization", param="prompt", code="invalid_value")
    return prompts


def chat_prompt(body: ChatCompletionRequest, tokenizer) -> Prompt:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors from the model's template
        raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
    return Prompt(_tokenize(tokenizer, text, False), text)


def _tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "text is not valid Unicode (lone surrogate escapes)", param="prompt",
                       code="invalid_value") from None
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def _finite(logprob: float) -> float:
    """-inf (a token the sampler ruled out) as vLLM's OpenAI server writes it: JSON has no infinity."""
    return max(logprob, -9999.0)


def completion_logprobs(token_ids: list[int], logprobs: list | None, tokenizer) -> dict | None:
    """OpenAI completion logprobs as vLLM's server writes them; a ``None`` step (the first prompt
    token under ``echo``) is a null logprob and null alternatives."""
    if logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = 0
    for token_id, candidates in zip(token_ids, logprobs):
        if candidates is None:
            token = tokenizer.decode([token_id])
            tokens.append(token)
            token_logprobs.append(None)
            top.append(None)
            offsets.append(offset)
            offset += len(token)
            continue
        chosen = candidates.get(token_id)
        token = chosen.decoded_token if chosen and chosen.decoded_token is not None else tokenizer.decode([token_id])
        tokens.append(token)
        token_logprobs.append(_finite(chosen.logprob) if chosen else None)
        top.append({(c.decoded_token if c.decoded_token is not None else tokenizer.decode([t])): _finite(c.logprob)
                    for t, c in candidates.items()})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(output, tokenizer, top_n: int) -> dict | None:
    if output.logprobs is None:
        return None
    content = []
    for token_id, candidates in zip(output.token_ids, output.logprobs):
        def entry(tid, lp):
            token = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([tid])
            return {"token": token, "logprob": _finite(lp.logprob), "bytes": list(token.encode("utf-8", "replace"))}
        chosen = candidates.get(token_id)
        item = entry(token_id, chosen) if chosen else {"token": tokenizer.decode([token_id]), "logprob": None, "bytes": None}
        ranked = sorted(candidates.items(), key=lambda kv: kv[1].rank or 0)
        item["top_logprobs"] = [entry(t, lp) for t, lp in ranked][:top_n]
        content.append(item)
    return {"content": content}


class GenerationRun:
    """One HTTP request's worth of engine requests (one per prompt), sharing one lease."""

    def __init__(self, state, prompts: list[Prompt], params: SamplingParams, lease: Lease | None, kind: str):
        self.state, self.prompts, self.params, self.lease, self.kind = state, prompts, params, lease, kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.request_ids = [f"{self.id}-{i}" for i in range(len(prompts))]
        self.finished = False  # set once its lease and concurrency place are given back

    async def stream(self) -> AsyncIterator[tuple[int, object]]:
        """Yield (prompt index, RequestOutput) from every prompt's engine request, interleaved."""
        queue: asyncio.Queue = asyncio.Queue()
        steering = self.lease.steering if self.lease else None
        salt = self.lease.cache_salt if self.lease else None
        lora = self.lease.lora if self.lease else None

        async def pump(index: int):
            try:
                async for out in self.state.engine.generate(self.prompts[index].token_ids, self.params.clone(),
                                                            self.request_ids[index], steering, salt, lora):
                    await queue.put((index, out))
            except BaseException as exc:  # surfaced to the consumer, for this request only
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.prompts))]
        finished = 0
        try:
            while finished < len(tasks):
                index, item = await queue.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for request_id in self.request_ids:
                await self.state.engine.abort(request_id)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
