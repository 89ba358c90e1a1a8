"""Steering vectors derived from contrastive prompts on the served model (what repeng / CAA users do by hand).

``POST /v1/interventions {"id", "derive": {"method", "positive", "negative", "layers", "component",
"positions"}}`` prefills every prompt once on the engine (one token, with a capture at each layer's
site) and takes each prompt's representation as the mean of its captured rows. ``mean_difference``:
``v_L = mean(positive) − mean(negative)`` (CAA). ``pca``: the first principal component of the centred
pair differences ``positive_i − negative_i`` (repeng), unit length, signed to agree with the mean
difference. The vectors are registered as one ``steering_vector`` per layer; the answer carries each
layer's norm and (``pca``) explained variance ratio. Nothing is registered unless every step succeeds.
"""
from __future__ import annotations

import asyncio
import uuid

import torch

from steer_serve.api.errors import APIError
from steer_serve.api.vllm_frontend import CLIENT_EXCEPTIONS, error_of
from steer_serve.engine.capture import CaptureRequest
from steer_serve.interventions.base import Edit, Intervention, Placement


def check(spec, geometry) -> None:
    """400s naming the field for prompt sets that cannot pair and sites the engine does not hook."""
    if len(spec.positive) != len(spec.negative):
        raise APIError(400, f"derive.positive has {len(spec.positive)} prompts and derive.negative "
                            f"{len(spec.negative)}: they pair one to one", code="invalid_value", param="derive.negative")
    if spec.method == "pca" and len(spec.positive) < 2:
        raise APIError(400, "derive.method pca needs at least two prompt pairs", code="invalid_value",
                       param="derive.positive")
    if spec.component not in geometry.components:
        raise APIError(400, f"derive.component {spec.component!r} is not hooked by this engine", code="invalid_value",
                       param="derive.component")
    for layer in spec.layers:
        if not 0 <= layer < geometry.num_layers:
            raise APIError(400, f"derive.layers: {layer} is not a layer of this model ({geometry.num_layers})",
                           code="invalid_value", param="derive.layers")


async def representations(engine, spec, prompts: list) -> torch.Tensor:
    """``[prompts, layers, width]``: each prompt's mean captured row at each layer."""
    sites = tuple((layer, spec.component, spec.positions) for layer in spec.layers)

    async def one(i: int, prompt):
        try:
            got = await engine.run_source(prompt, CaptureRequest(uuid.uuid4().hex, sites))
        except CLIENT_EXCEPTIONS as exc:   # what vLLM answers 4xx for: an empty prompt, one past the context
            raise APIError(400, f"derive prompt {i}: {error_of(exc)[1]}", code="invalid_value",
                           param="derive.positive") from None
        if any(len(got.get(n, ([],))[0]) == 0 for n in range(len(sites))):
            raise APIError(400, f"derive prompt {i} has none of the positions {spec.positions!r}", code="invalid_value",
                           param="derive.positions")
        return torch.stack([got[n][1].mean(0) for n in range(len(sites))])

    return torch.stack(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def vectors(method: str, positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """``[layers, width]`` vectors and per-layer numbers from ``[prompts, layers, width]`` representations."""
    mean_difference = positive.mean(0) - negative.mean(0)
    if method == "mean_difference":
        return mean_difference, [{"norm": float(v.norm())} for v in mean_difference]
    out, numbers = [], []
    for layer in range(positive.shape[1]):
        differences = positive[:, layer] - negative[:, layer]
        centred = differences - differences.mean(0)
        _, singular, vh = torch.linalg.svd(centred.double(), full_matrices=False)
        direction = vh[0].float()
        if direction @ mean_difference[layer] < 0:
            direction = -direction
        variance = singular.pow(2)
        out.append(direction)
        numbers.append({"norm": float(direction.norm()), "explained_variance": float(variance[0] / variance.sum())})
    return torch.stack(out), numbers


async def derive(engine, spec, hidden_size: int, width: int, positions: str | None, scale: float | None):
    """The intervention of per-layer steering vectors ``spec`` asks for, and the numbers for the answer."""
    positive = await representations(engine, spec, spec.positive)
    negative = await representations(engine, spec, spec.negative)
    found, numbers = vectors(spec.method, positive, negative)
    edits = [Edit("steering_vector", Placement(layer, spec.component), {"vector": v.contiguous()},
                  width=None if width == hidden_size else width) for layer, v in zip(spec.layers, found)]
    iv = Intervention(edits, hidden_size, positions=positions or "all", scale=1.0 if scale is None else scale,
                      source_format="derived")
    return iv, [{"layer": layer, **n} for layer, n in zip(spec.layers, numbers)]
