"""Request bodies of the OpenAI routes and the intervention routes (pydantic; drives OpenAPI)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from steer_serve.interventions.positions import parse_positions


def _check_positions(value: str | None) -> str | None:
    if value is not None:
        parse_positions(value)
    return value


class InterventionRef(BaseModel):
    """One intervention a request applies, with optional per-request scale and positions."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "honest", "scale": 0.8}]})
    id: str = Field(min_length=1, max_length=128)
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)
    positions: str | None = Field(default=None, max_length=32, description="f<n>, l<n>, f<n>+l<n>, prompt, generated, all")

    _positions = field_validator("positions")(_check_positions)


class SteeringFields(BaseModel):
    """steer-serve's extension fields (send them with the OpenAI SDK through ``extra_body``)."""

    intervention: str | None = Field(default=None, max_length=128, description="id of one registered intervention")
    interventions: list[InterventionRef] | None = Field(default=None, max_length=16,
                                                         description="several interventions, applied in order")
    intervention_scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)
    intervention_positions: str | None = Field(default=None, max_length=32,
                                               description="override positions for every named intervention")
    return_token_ids: bool = Field(default=False, description="add token_ids / prompt_token_ids to each choice")

    _positions = field_validator("intervention_positions")(_check_positions)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """OpenAI sampling fields (plus vLLM's ``ignore_eos``/``min_tokens``/``top_k``)."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=-1, ge=-1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 8 or any(len(s) == 0 or len(s) > 256 for s in items):
            raise ValueError("stop: at most 8 non-empty strings of at most 256 characters")
        return value


class CompletionRequest(SamplingFields, SteeringFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16,
         "temperature": 0, "intervention": "my-loreft"}]})
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="text, token ids, or a batch of either")
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and isinstance(value[0], list) and any(len(p) == 0 for p in value):
            raise ValueError("prompt token lists must not be empty")
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(SamplingFields, SteeringFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 32, "temperature": 0, "extra": "intervention: my-loreft"}]})
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class InterventionCreate(BaseModel):
    """Register an intervention from a local path (inside an allowed dir) or a hub id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "my-loreft", "source": "loreft-l15", "format": "auto", "positions": "l1", "scale": 1.0}]})
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    source: str = Field(min_length=1, max_length=1024, description="directory/file in an allowed dir, or a hub id")
    format: Literal["auto", "native", "pyreft", "pyvene"] = "auto"
    positions: str | None = Field(default=None, max_length=32)
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)
    act_fn: str | None = Field(default=None, max_length=32, description="pyreft act_fn (not saved by pyreft)")
    replace: bool = False

    _positions = field_validator("positions")(_check_positions)


class InterventionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    positions: str | None = Field(default=None, max_length=32)
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)

    _positions = field_validator("positions")(_check_positions)
