"""What ``/openapi.json`` says beyond the request models: response shapes, error shapes, examples.

The intervention routes return plain dicts (no response validation on the hot path); the models here
only document them; the OpenAI routes' shapes are vLLM's own response models. :func:`install` also replaces FastAPI's default 422 entries, which this server
never sends (validation failures are 400 in OpenAI's error shape).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from steer_serve.api.vllm_frontend import ChatCompletionResponse as ChatCompletion  # noqa: F401 (documented shapes)
from steer_serve.api.vllm_frontend import CompletionResponse as Completion  # noqa: F401

DESCRIPTION = """OpenAI-compatible server for many pyreft/pyvene interventions over one base model.

Every generation request may name its own intervention (`intervention`, `interventions`, or `model`
set to an intervention id); requests with different interventions share one continuous batch.
Errors always use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
`/v1/*` needs `Authorization: Bearer <api key>` when the server has `--api-key`; registering,
patching and deleting interventions needs the `--admin-api-key` when one is set."""

TAGS = [
    {"name": "openai", "description": "OpenAI-compatible inference routes (plus the intervention fields)."},
    {"name": "interventions", "description": "Register, list, describe, patch and delete interventions."},
    {"name": "ops", "description": "Liveness, readiness and Prometheus metrics."},
]


class ErrorObject(BaseModel):
    message: str = Field(description="human-readable explanation")
    type: str = Field(description="OpenAI error type, e.g. invalid_request_error, rate_limit_error")
    param: str | None = Field(description="the request field at fault, if any")
    code: str | None = Field(description="machine-readable error code, e.g. intervention_not_found")


class ErrorResponse(BaseModel):
    """Every non-2xx answer of this server."""

    error: ErrorObject


_ERRORS = {
    400: ("Invalid request (bad field, unreadable or unservable intervention)",
          {"message": "max_tokens: Input should be greater than or equal to 1", "type": "invalid_request_error",
           "param": "max_tokens", "code": "invalid_request"}),
    401: ("Missing or wrong API key",
          {"message": "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
           "type": "authentication_error", "param": None, "code": "invalid_api_key"}),
    403: ("The key may not manage interventions",
          {"message": "This key may not manage interventions; use the admin API key.", "type": "permission_error",
           "param": None, "code": "insufficient_permissions"}),
    404: ("Unknown intervention or model",
          {"message": "The intervention `honest` does not exist.", "type": "not_found_error",
           "param": "intervention", "code": "intervention_not_found"}),
    409: ("Conflict: the id exists, or the intervention is in use",
          {"message": "intervention 'honest' is in use by 3 request(s); retry later or pass force=true to wait "
                      "for them", "type": "conflict_error", "param": None, "code": "conflict"}),
    413: ("Request body (or uploaded file) too large",
          {"message": "request body larger than 2097152 bytes", "type": "request_too_large", "param": None,
           "code": "request_too_large"}),
    429: ("The server is at its concurrent-request limit; retry after `Retry-After` seconds",
          {"message": "The server is at its limit of 256 concurrent requests; retry shortly.",
           "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}),
    500: ("Internal error (this request only)",
          {"message": "internal error: RuntimeError", "type": "server_error", "param": None,
           "code": "internal_error"}),
    503: ("Engine unhealthy or shutting down",
          {"message": "shutting down", "type": "service_unavailable", "param": None, "code": "not_ready"}),
}


def errors(*statuses: int) -> dict[int, dict[str, Any]]:
    """``responses=`` entries documenting the OpenAI error body for each status."""
    out = {}
    for status in statuses:
        description, example = _ERRORS[status]
        entry: dict[str, Any] = {"model": ErrorResponse, "description": description,
                                 "content": {"application/json": {"example": {"error": example}}}}
        if status == 429:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        out[status] = entry
    return out


def ok(model: type[BaseModel], example: dict, description: str = "Success", *, stream_example: str | None = None,
       status: int = 200) -> dict[int, dict[str, Any]]:
    """A documented success response with an example (and the SSE form for streaming routes)."""
    content: dict[str, Any] = {"application/json": {"example": example}}
    if stream_example is not None:
        content["text/event-stream"] = {"schema": {"type": "string"}, "example": stream_example}
    return {status: {"model": model, "description": description, "content": content}}


# ----- success bodies ------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str = Field(description="base model name, or an intervention id usable as `model`")
    object: str = Field("model", description="always `model`")
    created: int = Field(description="unix time")
    owned_by: str = "steer-serve"
    root: str | None = Field(None, description="model path, or the intervention's source")
    parent: str | None = Field(None, description="the base model for interventions, null for the base model")
    max_model_len: int | None = Field(None, description="context length (base model only)")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class InterventionObject(BaseModel):
    """One registered intervention as ``GET /v1/interventions/{id}`` describes it."""

    id: str
    object: str = "intervention"
    kind: str = Field(description="`intervention` (hidden-state edit), `adapter` (weight-space, PEFT LoRA) or "
                                  "`prompt` (virtual tokens: PEFT prompt tuning)")
    created: int
    source: str = Field(description="where it was registered from (`upload` for uploads)")
    format: str = Field(description="native, pyreft, pyvene, peft_lora, ...")
    base_model: str = Field(description="the model this server serves it on")
    trained_on: str | None = Field(None, description="the base model its file names, if any")
    status: str = Field(description="`loaded` (in a device slot), `cached` (CPU only), `adapter` or `prompt`")
    slot: int | None = Field(description="device slot when loaded")
    in_flight: int = Field(description="requests using it right now")
    content_hash: str = Field(description="hash of the weights (prefix-cache identity)")
    families: list[str] | None = None
    num_edits: int | None = None
    layers: list[int] | None = None
    num_parameters: int
    positions: str | None = None
    scale: float | None = None
    hidden_size: int | None = None
    dtype: str | None = None
    edits: list[dict] | None = Field(None, description="family, placement {layer, component, head}, param shapes, "
                                                   "window (first/last half of f<n>+l<n> positions, or null)")


class InterventionList(BaseModel):
    object: str = "list"
    data: list[InterventionObject]


class Deleted(BaseModel):
    id: str
    object: str = "intervention"
    deleted: bool = True


class Version(BaseModel):
    version: str = Field(description="vLLM's version")


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    status: str = "ready"
    in_flight: int


INTERVENTION_EXAMPLE = {
    "id": "honest", "object": "intervention", "kind": "intervention", "created": 1767225600,
    "source": "honest-reft", "format": "pyreft", "base_model": "SmolLM2-135M-Instruct",
    "trained_on": "HuggingFaceTB/SmolLM2-135M-Instruct", "status": "loaded",
    "slot": 1, "in_flight": 0, "content_hash": "3f9c1e0b6d2a4c8e9f1a2b3c4d5e6f70", "families": ["loreft"],
    "num_edits": 1, "layers": [15], "num_parameters": 4612, "positions": "f1+l1", "scale": 1.0, "hidden_size": 576,
    "dtype": "float32",
    "edits": [{"family": "loreft", "placement": {"layer": 15, "component": "block_output", "head": None},
               "params": {"rotate_layer": {"shape": [576, 4], "dtype": "float32"},
                          "weight": {"shape": [4, 576], "dtype": "float32"},
                          "bias": {"shape": [4], "dtype": "float32"}},
               "num_parameters": 4612, "config": {}}],
}

COMPLETION_EXAMPLE = {
    "id": "cmpl-6f1c", "object": "text_completion", "created": 1767225600, "model": "SmolLM2-135M-Instruct",
    "choices": [{"index": 0, "text": " Paris.", "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
              "prompt_tokens_details": {"cached_tokens": 0}}}
CHAT_EXAMPLE = {
    "id": "chatcmpl-6f1c", "object": "chat.completion", "created": 1767225600, "model": "honest",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 36, "completion_tokens": 8, "total_tokens": 44,
              "prompt_tokens_details": {"cached_tokens": 0}}}
COMPLETION_STREAM_EXAMPLE = (
    'data: {"id":"cmpl-6f1c","object":"text_completion","created":1767225600,"model":"SmolLM2-135M-Instruct",'
    '"choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
    'data: [DONE]\n\n')
CHAT_STREAM_EXAMPLE = (
    'data: {"id":"chatcmpl-6f1c","object":"chat.completion.chunk","created":1767225600,"model":"honest",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Paris"},"logprobs":null,"finish_reason":null}],'
    '"usage":null}\n\n'
    'data: {"id":"chatcmpl-6f1c","object":"chat.completion.chunk","created":1767225600,"model":"honest",'
    '"choices":[],"usage":{"prompt_tokens":36,"completion_tokens":1,"total_tokens":37}}\n\n'
    'data: [DONE]\n\n')
MODELS_EXAMPLE = {"object": "list", "data": [
    {"id": "SmolLM2-135M-Instruct", "object": "model", "created": 1767225600, "owned_by": "steer-serve",
     "root": "~/.cache/steer-serve/models/SmolLM2-135M-Instruct", "parent": None, "max_model_len": 2048},
    {"id": "honest", "object": "model", "created": 1767225600, "owned_by": "steer-serve", "root": "honest-reft",
     "parent": "SmolLM2-135M-Instruct"}]}
RESPONSE_EXAMPLE = {
    "id": "resp_6f1c", "object": "response", "created_at": 1767225600, "model": "SmolLM2-135M-Instruct",
    "status": "completed", "output": [{"id": "msg_6f1c", "type": "message", "role": "assistant", "status": "completed",
                                       "content": [{"type": "output_text", "text": "I am a helpful assistant.",
                                                    "annotations": []}]}],
    "usage": {"input_tokens": 31, "output_tokens": 7, "total_tokens": 38}}
TOKENIZE_EXAMPLE = {"count": 2, "max_model_len": 2048, "tokens": [19556, 905], "token_strs": None}
METRICS_EXAMPLE = ('# TYPE steer_requests_total counter\nsteer_requests_total{intervention="honest"} 12.0\n'
                   '# TYPE steer_errors_total counter\nsteer_errors_total{code="429"} 1.0\n'
                   'steer_slot_refcount_total 0.0\n')


def install(app: FastAPI) -> None:
    """Post-process the generated schema: upload/JSON bodies, no 422s, examples everywhere."""
    from steer_serve.api.schemas import InterventionCreate
    from steer_serve.api.vllm_frontend import SteerTokenizeChatRequest, SteerTokenizeCompletionRequest

    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            components = schema["components"]["schemas"]
            for model in (InterventionCreate, SteerTokenizeCompletionRequest, SteerTokenizeChatRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
