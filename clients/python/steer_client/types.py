"""Typed responses (dataclasses) mirroring the OpenAI SDK's attribute names; ``raw`` keeps the JSON."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


def _pick(cls, data: dict, **nested) -> dict:
    """The keys of ``data`` that are fields of ``cls`` (nested ones already converted by the caller)."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return {**{k: v for k, v in data.items() if k in names}, **nested}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_dict(cls, data: dict | None) -> "Usage | None":
        if not data:
            return None
        cached = (data.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return cls(**_pick(cls, data, cached_tokens=cached or 0))


@dataclass
class ChatMessage:
    role: str = "assistant"
    content: str | None = None


@dataclass
class ChatChoice:
    index: int = 0
    message: ChatMessage = field(default_factory=ChatMessage)
    finish_reason: str | None = None
    logprobs: dict | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass
class CompletionChoice:
    """A completion choice; in a stream chunk ``text`` and ``token_ids`` are the new part only."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: dict | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass
class Delta:
    role: str | None = None
    content: str | None = None


@dataclass
class ChunkChoice:
    index: int = 0
    delta: Delta = field(default_factory=Delta)
    finish_reason: str | None = None
    logprobs: dict | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


@dataclass
class _Response:
    id: str = ""
    object: str = ""
    created: int = 0
    model: str = ""
    usage: Usage | None = None
    raw: dict = field(default_factory=dict, repr=False)


@dataclass
class ChatCompletion(_Response):
    choices: list[ChatChoice] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "ChatCompletion":
        """From the server's JSON."""
        choices = [ChatChoice(**_pick(ChatChoice, c, message=ChatMessage(**_pick(ChatMessage, c.get("message") or {}))))
                   for c in data.get("choices", [])]
        return cls(**_pick(cls, data, choices=choices, usage=Usage.from_dict(data.get("usage"))), raw=data)


@dataclass
class Completion(_Response):
    choices: list[CompletionChoice] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "Completion":
        choices = [CompletionChoice(**_pick(CompletionChoice, c)) for c in data.get("choices", [])]
        return cls(**_pick(cls, data, choices=choices, usage=Usage.from_dict(data.get("usage"))), raw=data)


@dataclass
class ChatCompletionChunk(_Response):
    choices: list[ChunkChoice] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "ChatCompletionChunk":
        choices = [ChunkChoice(**_pick(ChunkChoice, c, delta=Delta(**_pick(Delta, c.get("delta") or {}))))
                   for c in data.get("choices", [])]
        return cls(**_pick(cls, data, choices=choices, usage=Usage.from_dict(data.get("usage"))), raw=data)


@dataclass
class CompletionChunk(_Response):
    choices: list[CompletionChoice] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> "CompletionChunk":
        choices = [CompletionChoice(**_pick(CompletionChoice, c)) for c in data.get("choices", [])]
        return cls(**_pick(cls, data, choices=choices, usage=Usage.from_dict(data.get("usage"))), raw=data)


@dataclass
class Model:
    """The base model (``parent`` is None) or a registered intervention served as a model name."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "Model":
        return cls(**_pick(cls, data))


@dataclass
class Intervention:
    """What ``/v1/interventions`` reports for one registered intervention."""

    id: str
    source: str = ""
    format: str = ""
    status: str = ""
    slot: int | None = None
    in_flight: int = 0
    content_hash: str | None = None
    created: int = 0
    positions: str | None = None
    scale: float | None = None
    families: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    num_parameters: int = 0
    hidden_size: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Intervention":
        return cls(**_pick(cls, data), raw=data)
