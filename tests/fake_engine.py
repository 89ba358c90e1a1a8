"""An in-process stand-in for ``SteerEngine``: the real API app and registry, no vLLM.

Used where a live server cannot inject the fault (an engine error for one request) or where a
unit test needs the registry's persistence without an engine.
"""
from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field

from vllm.sampling_params import RequestOutputKind

from steer_serve.api.app import AppState, create_app
from steer_serve.registry import InterventionRegistry

#: A prompt starting with this token makes the fake engine fail after its first output token.
FAULT_TOKEN = 666


@dataclass
class Output:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | None = None
    logprobs: list | None = None


@dataclass
class Result:
    outputs: list[Output] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None


class FakeEngine:
    """The default model's geometry (576 wide, 30 layers); generates ``prompt[-1] + 1, + 2, ...``."""

    geometry = {"num_slots": 2, "max_rank": 8, "max_columns": 4, "components": ("block_output",),
                "num_layers": 30, "hidden_size": 576, "value_width": 192, "num_heads": 9}
    settings = types.SimpleNamespace(max_loras=0, max_lora_rank=16, model="/nonexistent")

    def __init__(self, step_seconds: float = 0.001):
        self.step_seconds = step_seconds
        self.aborted: list[str] = []
        self.slots: dict[int, object] = {}

    async def generate(self, prompt_token_ids, params, request_id, steering=None, cache_salt=None, lora=None):
        tokens = []
        for i in range(params.max_tokens):
            await asyncio.sleep(self.step_seconds)
            if prompt_token_ids[0] == FAULT_TOKEN and i == 1:
                raise RuntimeError("injected engine fault")
            token = prompt_token_ids[-1] + 1 + i
            tokens.append(token)
            done = i == params.max_tokens - 1
            if params.output_kind == RequestOutputKind.DELTA or done:
                delta = [token] if params.output_kind == RequestOutputKind.DELTA else tokens
                yield Result([Output(0, "".join(f" t{t}" for t in delta), list(delta),
                                     "length" if done else None)])

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def write_slot(self, slot, site_edits) -> None:
        self.slots[slot] = site_edits

    async def clear_slot(self, slot) -> None:
        self.slots.pop(slot, None)

    async def check_health(self) -> None:
        return None


class Tokenizer:
    """Whitespace 'tokenizer': one token per word."""

    def __call__(self, text, add_special_tokens=True):
        return types.SimpleNamespace(input_ids=[100 + len(w) for w in text.split()] or [100])

    def decode(self, ids):
        return "".join(f" t{t}" for t in ids)


def fake_app(engine: FakeEngine | None = None, **state_fields):
    """(app, state) around a fake engine; ``state_fields`` override :class:`AppState` fields."""
    engine = engine or FakeEngine()
    registry = InterventionRegistry(engine, persist_dir=state_fields.pop("persist_dir", None))
    state = AppState(engine=engine, registry=registry, tokenizer=Tokenizer(), served_model_name="fake",
                     model_path="/nonexistent", max_model_len=512, vocab_size=50000, **state_fields)
    return create_app(state), state
