"""The ``condition`` field of completions and chat requests: conditional steering (CAST).

``condition: {"intervention", "layer", "threshold", "comparator", "aggregate"}`` makes the
request's interventions apply to its generated tokens only if its prompt meets the condition
(``engine/condition.py``). The condition direction is a registered steering vector's (a repeng
GGUF, a CAA tensor file, a derived vector, …) at ``layer``, at that edit's site. :func:`plan_condition`
checks it (400s naming the field) and makes the :class:`ConditionRequest` the engine decides by; the
request gets a cache salt of its own, so every prompt row reaches the condition site. When the
request has finished, the decision is fetched (``steer_take_condition``) and put into its choice
as ``"condition": {"similarity", "met"}`` (for a stream, in the chunk with its ``finish_reason``).
"""
from __future__ import annotations

import math
import uuid

from steer_serve.api.errors import APIError
from steer_serve.engine.condition import ConditionRequest
from steer_serve.interventions import edit_config, get_family
from steer_serve.registry import RegistryError


def _direction(entry, layer: int, param: str) -> tuple[str, list[float]]:
    """(component, direction) of the steering vector ``entry`` at ``layer``; 400 when it has none there."""
    edits = [e for e in getattr(getattr(entry, "intervention", None), "edits", None) or []
             if e.placement.layer == layer and e.placement.head is None]
    lowranks = [get_family(e.family).to_lowrank(e.params, edit_config(e)) for e in edits]
    if len(edits) != 1 or not _is_vector(lowranks[0]):
        raise APIError(400, f"condition.intervention {entry.id!r} has no steering vector at layer {layer} (a condition "
                            "direction is the one additive vector of a steering vector / control vector / addition "
                            "intervention at that layer)", code="invalid_value", param=param)
    direction = lowranks[0].v.to("cpu", dtype=float).flatten().tolist()
    if not all(map(math.isfinite, direction)) or not any(direction):
        raise APIError(400, f"condition.intervention {entry.id!r}: its vector at layer {layer} is zero or not finite",
                       code="invalid_value", param=param)
    return edits[0].placement.component, direction


def _is_vector(lowrank) -> bool:
    return lowrank.v is not None and all(getattr(lowrank, f) is None for f in ("W", "b", "P", "U", "z"))


async def plan_condition(body, kind: str, state, requested: list) -> ConditionRequest | None:
    """The engine's condition request, or None when the request has no ``condition`` (400s for a condition
    without interventions, on a form making several choices, under pipeline or data parallelism, or naming no
    vector)."""
    spec = getattr(body, "condition", None)
    if spec is None:
        return None
    if kind == "responses":
        raise APIError(400, "condition is served on /v1/completions and /v1/chat/completions",
                       code="unsupported_value", param="condition")
    if not requested:
        raise APIError(400, "condition gates the request's interventions: name at least one (intervention / "
                            "interventions / model)", code="invalid_value", param="condition")
    prompt = getattr(body, "prompt", None)
    batched = isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], (str, list))
    if batched or (getattr(body, "n", None) or 1) > 1 or getattr(body, "use_beam_search", False):
        raise APIError(400, "condition takes one prompt with n = 1 and no beam search (one decision per request)",
                       code="unsupported_value", param="condition")
    for ident, _, _ in requested:
        if (await state.registry.resolve(ident)).kind != "intervention":
            raise APIError(400, f"condition gates interventions applied at sites; {ident!r} is a weight or prompt "
                                "adapter, which a condition cannot gate", code="unsupported_value", param="condition")
    parallel = getattr(getattr(state.engine.llm, "vllm_config", None), "parallel_config", None)
    if getattr(parallel, "pipeline_parallel_size", 1) > 1 or getattr(parallel, "data_parallel_size", 1) > 1:
        raise APIError(400, "condition is not served under pipeline or data parallelism (the condition and the edits "
                            "it gates may sit on different stages; fetching a decision from the engine that ran the "
                            "request is untested)", code="unsupported_value", param="condition")
    geometry = state.registry.geometry
    if spec.layer >= geometry.num_layers:
        raise APIError(400, f"condition.layer {spec.layer} is past the model's {geometry.num_layers} layers",
                       code="invalid_value", param="condition.layer")
    try:
        entry = await state.registry.resolve(spec.intervention)
    except RegistryError as exc:
        exc.param = "condition.intervention"
        raise
    component, direction = _direction(entry, spec.layer, "condition.intervention")
    if component not in geometry.components:
        raise APIError(400, f"condition.intervention {spec.intervention!r} sits at {component}, which this engine "
                            f"does not hook (hooked: {', '.join(geometry.components)})", code="invalid_value",
                       param="condition.intervention")
    return ConditionRequest(uuid.uuid4().hex, spec.layer, component, tuple(direction), spec.threshold,
                            spec.comparator, spec.aggregate)


def condition_salt(request: ConditionRequest) -> str:
    """A cache salt of the request's own: no prompt row is skipped by the prefix cache."""
    return f"condition-{request.key}"
