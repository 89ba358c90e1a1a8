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
    id: str = Field(min_length=1, max_length=128, description="a registered intervention id")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                description="multiplies the edit: h + scale·(f(h) − h); default: its registered scale")
    positions: str | None = Field(default=None, max_length=32, description="f<n>, l<n>, f<n>+l<n>, prompt, generated, all")

    _positions = field_validator("positions")(_check_positions)


class SteeringFields(BaseModel):
    """steer-serve's extension fields (send them with the OpenAI SDK through ``extra_body``)."""

    intervention: str | None = Field(default=None, max_length=128, description="id of one registered intervention")
    interventions: list[InterventionRef] | None = Field(default=None, max_length=16,
                                                         description="several interventions, applied in order")
    intervention_scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                             description="override the scale of every named intervention")
    intervention_positions: str | None = Field(default=None, max_length=32,
                                               description="override positions for every named intervention")
    return_token_ids: bool = Field(default=False, description="add token_ids / prompt_token_ids to each choice")

    _positions = field_validator("intervention_positions")(_check_positions)


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options`` (read only with ``stream: true``)."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(default=False, description="end the stream with a chunk holding `usage`")


class SamplingFields(BaseModel):
    """OpenAI sampling fields (plus vLLM's ``ignore_eos``/``min_tokens``/``top_k``)."""

    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate at most (server limit: "
                                                                    "--max-tokens-limit)")
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling mass")
    top_k: int = Field(default=-1, ge=-1, le=1 << 20, description="sample from the k likeliest tokens; -1 = all")
    n: int = Field(default=1, ge=1, le=16, description="completions per prompt")
    stop: str | list[str] | None = Field(default=None, description="up to 8 strings that end generation")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="per-request sampling seed")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False,
                                    description="penalise tokens that already appeared")
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2, allow_inf_nan=False,
                                     description="penalise tokens by how often they appeared")
    ignore_eos: bool = Field(default=False, description="vLLM: keep generating past end-of-sequence")
    min_tokens: int = Field(default=0, ge=0, description="vLLM: generate at least this many tokens")
    stream: bool = Field(default=False, description="answer as server-sent events")
    stream_options: StreamOptions | None = Field(default=None, description="used with `stream: true` (ignored "
                                                                          "otherwise)")
    user: str | None = Field(default=None, max_length=256, description="end-user id, written to the access log")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > 8 or any(len(s) == 0 or len(s) > 256 for s in items):
            raise ValueError("stop: at most 8 non-empty strings of at most 256 characters")
        return value


class CompletionRequest(SamplingFields, SteeringFields):
    """``POST /v1/completions``: OpenAI's fields plus the intervention fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 16,
         "temperature": 0, "intervention": "my-loreft"},
        {"model": "my-loreft", "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 8, "stream": True,
         "return_token_ids": True}]})
    model: str | None = Field(default=None, description="the base model's name, or an intervention id")
    prompt: str | list[int] | list[str] | list[list[int]] = Field(description="text, token ids, or a batch of either")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="log-probabilities of the top n tokens")
    echo: bool = Field(default=False, description="prepend the prompt to the text; with `logprobs`, also the prompt "
                                                  "tokens' log-probabilities (first one null), as vLLM (non-streaming)")
    max_tokens: int | None = Field(default=16, ge=0, description="tokens to generate at most; 0 only with `echo` "
                                                                 "(score the prompt, generate nothing)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and isinstance(value[0], list) and any(len(p) == 0 for p in value):
            raise ValueError("prompt token lists must not be empty")
        return value


class TextPart(BaseModel):
    """A content part of a chat message (this server's models read text only)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only `text` parts are accepted")
    text: str = Field(description="the text")


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(description="who speaks")
    content: str | list[TextPart] | None = Field(default=None, description="text, or a list of text parts")
    name: str | None = Field(default=None, max_length=256, description="optional speaker name")

    def text(self) -> str:
        """The message's text (parts concatenated)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields, SteeringFields):
    """``POST /v1/chat/completions``: OpenAI's fields plus the intervention fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
         "max_tokens": 32, "temperature": 0, "interventions": [{"id": "my-loreft", "scale": 0.8}]},
        {"model": "my-loreft", "messages": [{"role": "user", "content": "Tell me about yourself."}],
         "stream": True, "stream_options": {"include_usage": True}, "user": "user-1234"}]})
    model: str | None = Field(default=None, description="the base model's name, or an intervention id")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256, description="the conversation so far")
    logprobs: bool = Field(default=False, description="return log-probabilities of the chosen tokens")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token (needs logprobs)")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="OpenAI's newer name of max_tokens")


class InterventionCreate(BaseModel):
    """Register an intervention from a local path (inside an allowed dir) or a hub id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "my-loreft", "source": "loreft-l15", "format": "auto", "positions": "l1", "scale": 1.0}]})
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                    description="the name requests use (`intervention`, or `model`)")
    source: str = Field(min_length=1, max_length=1024, description="directory/file in an allowed dir, or a hub id")
    format: Literal["auto", "native", "pyreft", "pyvene"] = Field(default="auto", description="source format")
    positions: str | None = Field(default=None, max_length=32, description="default positions: f<n>, l<n>, "
                                                                           "f<n>+l<n>, prompt, generated, all")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False, description="default scale")
    act_fn: str | None = Field(default=None, max_length=32, description="pyreft act_fn (not saved by pyreft)")
    replace: bool = Field(default=False, description="swap out an existing id (409 without it)")

    _positions = field_validator("positions")(_check_positions)


class InterventionPatch(BaseModel):
    """New defaults for an intervention; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"scale": 0.5, "positions": "l2"}]})
    positions: str | None = Field(default=None, max_length=32, description="f<n>, l<n>, f<n>+l<n>, prompt, "
                                                                           "generated, all")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False, description="new default scale")

    _positions = field_validator("positions")(_check_positions)
