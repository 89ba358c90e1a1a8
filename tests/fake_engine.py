"""An in-process stand-in for ``SteerEngine`` and vLLM's completions handler: the real API app,
steering layer and registry, no vLLM.

Used where a live server cannot inject the fault (a handler error for one request), where timing
must be controlled (slow steps), or where a unit test needs the registry without an engine.
"""
from __future__ import annotations

import asyncio
import json
import types
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from steer_serve.api.app import AppState, create_app
from steer_serve.registry import InterventionRegistry

#: A prompt starting with this token makes the fake engine fail after its first output token.
FAULT_TOKEN = 666


class FakeEngine:
    """The default model's geometry (576 wide, 30 layers); generates ``prompt[-1] + 1, + 2, ...``."""

    geometry = {"num_slots": 2, "max_rank": 8, "max_columns": 4, "components": ("block_output",),
                "num_layers": 30, "hidden_size": 576, "widths": {"block_output": 576}, "heads": {}}
    settings = types.SimpleNamespace(max_loras=0, max_lora_rank=16, model="/nonexistent")

    def __init__(self, step_seconds: float = 0.001):
        self.step_seconds = step_seconds
        self.aborted: list[str] = []
        self.extra_args: list[dict | None] = []   # what each request carried to the engine
        self.slots: dict[int, object] = {}

    async def generate(self, prompt_token_ids: list[int], max_tokens: int, request_id: str, extra_args=None):
        """Yield one token id per step; aborted (recorded) when the consumer leaves early."""
        self.extra_args.append(extra_args)
        finished = False
        try:
            for i in range(max_tokens):
                await asyncio.sleep(self.step_seconds)
                if prompt_token_ids[0] == FAULT_TOKEN and i == 1:
                    raise RuntimeError("injected engine fault")
                yield prompt_token_ids[-1] + 1 + i
            finished = True
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def write_slot(self, slot, site_edits) -> None:
        self.slots[slot] = site_edits

    async def clear_slot(self, slot) -> None:
        self.slots.pop(slot, None)

    def failure(self) -> str | None:
        return None

    async def check_health(self, stall_timeout: float) -> None:
        return None


async def fake_completion_handler(body, raw_request):
    """Stands in for vLLM's completions route over :class:`FakeEngine` (token-id prompts only)."""
    engine = raw_request.app.state.steer.engine
    request_id = f"cmpl-{uuid.uuid4().hex[:8]}"
    tokens = engine.generate(list(body.prompt), body.max_tokens, request_id, body.vllm_xargs)
    if not body.stream:
        ids = [t async for t in tokens]
        return JSONResponse({"id": request_id, "choices": [{"index": 0, "token_ids": ids}]})

    async def events():
        async for token in tokens:
            yield f"data: {json.dumps({'id': request_id, 'choices': [{'index': 0, 'token_ids': [token]}]})}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def fake_app(engine: FakeEngine | None = None, **state_fields):
    """(app, state) around a fake engine; ``state_fields`` override :class:`AppState` fields."""
    engine = engine or FakeEngine()
    registry = InterventionRegistry(engine, persist_dir=state_fields.pop("persist_dir", None))
    state = AppState(engine=engine, registry=registry, served_model_name="fake",
                     model_path="/nonexistent", max_model_len=512,
                     handlers={"completion": fake_completion_handler}, **state_fields)
    return create_app(state), state
