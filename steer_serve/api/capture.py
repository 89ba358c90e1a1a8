"""The ``capture`` field of completions and chat requests: activations returned in the response.

``capture: [{"layer", "component", "positions", "dtype"}]`` asks for the activations at those sites
(after the request's own edits there and at earlier sites, as pyvene's ``CollectIntervention``
sees them). :func:`plan_capture` checks the sites against what the engine hooks and the server's
limits (sites per request, and bytes per response counted at the most positions a site can
match: ``n`` for ``f<n>``/``l<n>``, the context length for ``prompt``/``generated``/``all``) and
makes the :class:`CaptureRequest` the engine records by. A capturing request gets a cache salt
of its own, so no prompt token is skipped by the prefix cache: every captured row is computed by
this request's forward (and chunked prefill records each chunk's rows at their absolute
positions). When the request has finished, :func:`with_choice_field` fetches its rows from the
worker (``steer_take_capture``) and puts them into its choice, as ``captures``: for a stream,
into the chunk that carries the choice's ``finish_reason``.
"""
from __future__ import annotations

import base64
import json
import uuid

import torch
from fastapi.responses import JSONResponse, Response, StreamingResponse

from steer_serve.api.errors import APIError
from steer_serve.engine.capture import CaptureRequest
from steer_serve.interventions.positions import parse_positions

_ITEMSIZE = {"float32": 4, "bfloat16": 2}


def _max_rows(positions: str, max_model_len: int) -> int:
    spec = parse_positions(positions)
    if spec.kind != "window":
        return max_model_len
    return min(spec.first, max_model_len // 2) + min(spec.last, max_model_len // 2)   # windows take half the prompt


def plan_capture(body, kind: str, state) -> tuple[CaptureRequest, list[str]] | None:
    """The engine's capture request and each site's dtype, or None when the request asks for none (400s
    for sites the engine does not hook, past the limits, or on a request form that makes several choices)."""
    sites = getattr(body, "capture", None)
    if not sites:
        return None
    if kind == "responses":
        raise APIError(400, "capture is served on /v1/completions and /v1/chat/completions", code="unsupported_value",
                       param="capture")
    prompt = getattr(body, "prompt", None)
    batched = isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list))
    if batched or (getattr(body, "n", None) or 1) > 1 or getattr(body, "use_beam_search", False):
        raise APIError(400, "capture takes one prompt with n = 1 and no beam search (one choice per request)",
                       code="unsupported_value", param="capture")
    if len(sites) > state.max_capture_sites:
        raise APIError(400, f"capture asks for {len(sites)} sites; this server allows at most "
                            f"{state.max_capture_sites} per request", code="capture_too_large", param="capture")
    geometry = state.registry.geometry
    total = 0
    for i, site in enumerate(sites):
        if site.component not in geometry.components:
            raise APIError(400, f"capture[{i}].component {site.component!r} is not hooked by this engine (hooked: "
                                f"{', '.join(geometry.components) or 'none'})", code="invalid_value",
                           param=f"capture[{i}].component")
        if site.layer >= geometry.num_layers:
            raise APIError(400, f"capture[{i}].layer {site.layer} is past the model's {geometry.num_layers} layers",
                           code="invalid_value", param=f"capture[{i}].layer")
        total += _max_rows(site.positions, state.max_model_len) * geometry.widths[site.component] * _ITEMSIZE[site.dtype]
    if total > state.max_capture_bytes:
        raise APIError(400, f"capture may return up to {total} bytes (at most {state.max_capture_bytes} per response "
                            "on this server; prompt/generated/all count the context length): capture fewer sites "
                            "or positions (f<n>, l<n>)", code="capture_too_large", param="capture")
    request = CaptureRequest(uuid.uuid4().hex, tuple((s.layer, s.component, s.positions) for s in sites))
    return request, [s.dtype for s in sites]


def capture_salt(request: CaptureRequest) -> str:
    """A cache salt of the request's own: no cached block is reused, every captured row is computed."""
    return f"capture-{request.key}"


def _encode(layer: int, component: str, positions: list[int], data: torch.Tensor, dtype: str) -> dict:
    if dtype == "bfloat16":
        raw = data.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        raw = data.numpy().astype("<f4").tobytes()
    return {"layer": layer, "component": component, "positions": positions, "shape": list(data.shape),
            "dtype": dtype, "data": base64.b64encode(raw).decode("ascii")}


async def fetch_captures(engine, request: CaptureRequest, dtypes: list[str], widths: dict[str, int]) -> list[dict]:
    """The request's captures in the response's form, one entry per requested site, in request order."""
    got = await engine.take_capture(request.key)
    out = []
    for number, (layer, component, _) in enumerate(request.sites):
        positions, data = got.get(number, ([], torch.zeros(0, widths[component])))
        out.append(_encode(layer, component, positions, data, dtypes[number]))
    return out


def _json_body(response: Response) -> dict | None:
    if response.status_code != 200 or not isinstance(response, JSONResponse):
        return None
    return json.loads(response.body)


async def with_choice_field(response: Response, name: str, fetch) -> Response:
    """``response`` with ``name`` (its value from ``await fetch()``) in its choice: the JSON body's, or the
    stream's chunk that carries the choice's ``finish_reason``. Error responses pass unchanged."""
    if isinstance(response, StreamingResponse):
        response.body_iterator = _stream_with_field(response.body_iterator, name, fetch)
        return response
    body = _json_body(response)
    if body is None:
        return response
    value = await fetch()
    for choice in body.get("choices", []):
        choice[name] = value
    return JSONResponse(body, headers={k: v for k, v in response.headers.items() if k.lower() != "content-length"})


async def _stream_with_field(events, name: str, fetch):
    done = False
    async for item in events:
        text = item.decode() if isinstance(item, bytes) else item
        if done or "finish_reason" not in text:
            yield item
            continue
        out = []
        for event in text.split("\n\n"):
            if not done and event.startswith("data: {"):
                chunk = json.loads(event[len("data: "):])
                finished = [c for c in chunk.get("choices", []) if c.get("finish_reason") is not None]
                if finished:
                    value = await fetch()
                    for choice in finished:
                        choice[name] = value
                    event = "data: " + json.dumps(chunk, separators=(",", ":"))
                    done = True
            out.append(event)
        yield "\n\n".join(out)
