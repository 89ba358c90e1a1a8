"""What each API call sends and how its answer is parsed, shared by the sync and async clients."""
from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from steer_client.errors import error_from_body
from steer_client.types import (
    ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, Intervention, Model,
)

RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_AFTER = 60.0


@dataclass
class Op:
    """One HTTP call: method, path, httpx keyword arguments, the parser of the JSON answer, streaming or not."""

    method: str
    path: str
    kwargs: dict
    parse: Callable
    stream: bool = False


def retry_delay(attempt: int, retry_after: str | None, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's Retry-After, else jittered 2^n backoff."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER)
        except ValueError:
            when = email.utils.parsedate_to_datetime(retry_after) if retry_after.strip() else None
            if when is not None:
                return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER)
    return min(cap, base * 2 ** attempt) * (0.5 + random.random() / 2)


def _refs(interventions) -> list[dict] | None:
    """``["a", {"id": "b", "scale": 0.5}]`` -> the request's ``interventions`` list."""
    if interventions is None:
        return None
    return [{"id": ref} if isinstance(ref, str) else {k: v for k, v in dict(ref).items() if v is not None}
            for ref in interventions]


def _steering(body: dict, intervention, interventions, model, stream: bool, kwargs: dict) -> dict:
    extra = kwargs.pop("extra_body", None) or {}
    fields = {"model": model, "intervention": intervention, "interventions": _refs(interventions)}
    body.update({k: v for k, v in fields.items() if v is not None})
    body.update(kwargs)
    body.update(extra)
    if stream:
        body["stream"] = True
    return body


def _messages(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m) for m in messages]


def chat(messages, intervention=None, interventions=None, model=None, stream=False, **kwargs) -> Op:
    """POST /v1/chat/completions; extra keyword arguments are OpenAI/vLLM request fields."""
    body = _steering({"messages": _messages(messages)}, intervention, interventions, model, stream, kwargs)
    parse = ChatCompletionChunk.from_dict if stream else ChatCompletion.from_dict
    return Op("POST", "/v1/chat/completions", {"json": body}, parse, stream)


def complete(prompt, intervention=None, interventions=None, model=None, stream=False, **kwargs) -> Op:
    """POST /v1/completions; ``prompt`` is text, token ids, or a batch of either."""
    body = _steering({"prompt": prompt}, intervention, interventions, model, stream, kwargs)
    parse = CompletionChunk.from_dict if stream else Completion.from_dict
    return Op("POST", "/v1/completions", {"json": body}, parse, stream)


def models() -> Op:
    """GET /v1/models -> list of ``Model``."""
    return Op("GET", "/v1/models", {}, lambda d: [Model.from_dict(m) for m in d.get("data", [])])


def health() -> Op:
    """GET /health -> its JSON."""
    return Op("GET", "/health", {}, lambda d: d)


def register(id: str, source: str, format: str = "auto", positions: str | None = None, scale: float | None = None,
             act_fn: str | None = None, replace: bool = False) -> Op:
    """POST /v1/interventions with a server-side source (path in an allowed dir, or hub id)."""
    body = {"id": id, "source": source, "format": format, "positions": positions, "scale": scale,
            "act_fn": act_fn, "replace": replace}
    return Op("POST", "/v1/interventions", {"json": {k: v for k, v in body.items() if v is not None}},
              Intervention.from_dict)


def upload(id: str, path: str | Path | None = None, *, intervention_json: bytes | None = None,
           weights: bytes | None = None, positions: str | None = None, scale: float | None = None,
           replace: bool = False) -> Op:
    """Multipart upload of a native intervention: a directory ``path`` or the two files' bytes."""
    if path is not None:
        intervention_json = (Path(path) / "intervention.json").read_bytes()
        weights = (Path(path) / "weights.safetensors").read_bytes()
    if intervention_json is None or weights is None:
        raise ValueError("upload needs a native directory or both intervention_json and weights")
    files = {"intervention.json": ("intervention.json", intervention_json, "application/json"),
             "weights.safetensors": ("weights.safetensors", weights, "application/octet-stream")}
    data = {"id": id, "positions": positions, "scale": None if scale is None else str(scale),
            "replace": "true" if replace else None}
    return Op("POST", "/v1/interventions", {"files": files, "data": {k: v for k, v in data.items() if v is not None}},
              Intervention.from_dict)


def list_interventions() -> Op:
    """GET /v1/interventions -> list of ``Intervention``."""
    return Op("GET", "/v1/interventions", {}, lambda d: [Intervention.from_dict(i) for i in d.get("data", [])])


def get(id: str) -> Op:
    """GET /v1/interventions/{id}."""
    return Op("GET", f"/v1/interventions/{id}", {}, Intervention.from_dict)


def patch(id: str, scale: float | None = None, positions: str | None = None) -> Op:
    """PATCH /v1/interventions/{id}: new default scale and/or positions."""
    body = {k: v for k, v in {"scale": scale, "positions": positions}.items() if v is not None}
    return Op("PATCH", f"/v1/interventions/{id}", {"json": body}, Intervention.from_dict)


def delete(id: str, force: bool = False) -> Op:
    """DELETE /v1/interventions/{id} (``force``: wait for in-flight requests instead of 409)."""
    return Op("DELETE", f"/v1/interventions/{id}", {"params": {"force": "true"} if force else {}},
              lambda d: bool(d.get("deleted")))


DONE = object()  # the end-of-stream marker parse_sse_line returns for "[DONE]"


def sse_events(lines: Iterable[str]):
    """Parsed ``data:`` payloads of a server-sent-events stream, up to ``[DONE]``; in-band errors raise."""
    for line in lines:
        event = parse_sse_line(line)
        if event is DONE:
            return
        if event is not None:
            yield event


def parse_sse_line(line: str):
    """One SSE line -> a JSON payload, ``DONE``, or ``None`` (blank, comment, non-data field)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return DONE
    data = json.loads(payload)
    if isinstance(data, dict) and "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {}
        status = 500 if error.get("type") in (None, "server_error") else 400
        raise error_from_body(status, data)
    return data
