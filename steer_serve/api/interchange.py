"""Interchange interventions with a source per request (pyvene's ``sources`` + ``unit_locations``).

``interventions: [{"id": "das", "positions": "l1", "source": {"prompt": "…", "positions": "l1"}}]``
(or ``"source": {"messages": [...], ...}``, rendered by the chat template): the source prompt is run on the same engine first (a one-token prefill, in the batch with
everything else, with a capture at the intervention's site and the source positions, on a cache
salt of its own so nothing of it is skipped), and the base request then gets, at its i-th base
position, the interchange with the source's i-th position (pyvene pairs ``sources->base``
locations by index). The intervention's math is affine in its source, ``f(h; s) = f(h; s₀) +
g(s) − g(s₀)`` with ``g`` the source's share of the low-rank form (``act(b)Uᵀ + v``, act linear);
the slot keeps ``f(h; s₀)`` (s₀: the stored source, or zero for a DAS saved without one), and the
rows ``scale · (g(sᵢ) − g(s₀))`` go to the worker (``engine/interchange.py``), which adds them after
the site's kernel call. So an interchange must be the last intervention of a request at its site.

``"subspaces": [i, …]`` on the entry is pyvene's ``subspaces`` for the unit: the coordinates of the
family's space (the original basis for vanilla, the rotated one for rotated and low-rank rotated
spaces) that are interchanged instead of the first ``interchange_dim``. The slot is not
used then: with B the selected axes, the term's rows are ``scale · (sᵢ B) Bᵀ`` and the worker first takes
``scale · (h B) Bᵀ`` off h, so ``h + scale · (sᵢ B − h B) Bᵀ`` as pyvene swaps them.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import NamedTuple

import torch

from steer_serve.api.errors import APIError
from steer_serve.api.vllm_frontend import CLIENT_EXCEPTIONS, error_of
from steer_serve.engine.capture import CaptureRequest
from steer_serve.engine.interchange import SourceTerm
from steer_serve.interventions import edit_config, get_family
from steer_serve.interventions.base import Edit, LowRankEdit
from steer_serve.interventions.positions import parse_positions


def _source_share(lowrank: LowRankEdit) -> torch.Tensor:
    """``act(b) Uᵀ + v``: the part of the edit that does not multiply ``h`` (linear act only)."""
    out = torch.zeros(lowrank.width)
    if lowrank.b is not None and lowrank.U is not None:
        out += lowrank.b @ lowrank.U.T
    if lowrank.v is not None:
        out += lowrank.v
    return out


def source_rows(edit: Edit, sources: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (g(sᵢ) − g(s₀))`` for each source row ``sᵢ`` (see the module docstring)."""
    family, config = get_family(edit.family), edit_config(edit)
    stored = _source_share(family.to_lowrank(edit.params, config))
    rows = [_source_share(family.to_lowrank({**edit.params, "source": s}, config)) - stored for s in sources]
    return scale * torch.stack(rows)


def subspace_axes(edit: Edit, subspaces: list[int], index: int) -> torch.Tensor:
    """The axes (``[width, len(subspaces)]``) pyvene's ``subspaces`` select for ``edit``; 400s naming the field
    for a family they are not served on, an empty list, or an index repeated or out of range."""
    param = f"interventions[{index}].subspaces"
    family = get_family(edit.family)
    if not family.takes_subspaces:
        raise APIError(400, f"{param}: subspaces are served on vanilla, rotated_space and low_rank_rotated_space "
                            f"interchanges, not on {edit.family}", code="unsupported_value", param=param)
    axes = family.subspace_axes(edit.params)
    if not subspaces:
        raise APIError(400, f"{param} is empty: list the dimensions to interchange", code="invalid_value", param=param)
    partition = edit.config.get("subspace_partition")
    count, what = (len(partition), "groups of its saved subspace_partition") if partition else (axes.shape[1],
                                                                                                "dimensions")
    bad = [i for i in subspaces if not 0 <= i < count]
    if bad:
        raise APIError(400, f"{param}: {bad[0]} is out of range: {edit.family} has {what} 0..{count - 1}",
                       code="invalid_value", param=param)
    dims = [d for i in subspaces for d in partition[i]] if partition else subspaces
    if len(set(dims)) != len(dims):
        raise APIError(400, f"{param} repeats a dimension", code="invalid_value", param=param)
    if not all(0 <= d < axes.shape[1] for d in dims):
        raise APIError(400, f"{param}: the saved subspace_partition names dimensions past {edit.family}'s "
                            f"{axes.shape[1]}", code="invalid_value", param=param)
    return axes[:, dims].contiguous()


def subspace_term(edit: Edit, axes: torch.Tensor, sources: torch.Tensor, scale: float, positions: str) -> SourceTerm:
    """The term of a request with ``subspaces`` (see the module docstring)."""
    rows = (sources.to(torch.float32) @ axes) @ axes.T
    return SourceTerm(edit.placement.layer, edit.placement.component, positions, scale * rows, axes, scale)


def _count(positions: str, param: str) -> int:
    spec = parse_positions(positions)
    if spec.kind != "window":
        raise APIError(400, f"{param} {positions!r}: an interchange pairs source and base positions one to one, so "
                            "both take f<n>, l<n> or f<n>+l<n>", code="invalid_value", param=param)
    return spec.first + spec.last


def interchange_edit(entry, index: int, has_source: bool) -> Edit | None:
    """The one edit of an interchange entry given a source (400 for anything else), or None without one (400 for
    an intervention saved without a source, which only an interchange can serve)."""
    edits = getattr(getattr(entry, "intervention", None), "edits", None) or []
    from_request = any(e.config.get("source") == "request" for e in edits)
    param = f"interventions[{index}].source"
    if not has_source:
        if from_request:
            raise APIError(400, f"intervention {entry.id!r} is an interchange saved without a source representation: "
                                "give its source per request (`source`: {prompt, positions})", code="missing_source",
                           param=param)
        return None
    if len(edits) != 1 or "source" not in edits[0].params or edits[0].placement.head is not None:
        raise APIError(400, f"intervention {entry.id!r} takes no source: a source is given to an interchange "
                            "intervention with one edit (vanilla, rotated_space, low_rank_rotated_space, "
                            "boundless_rotated_space, …) at a whole component", code="invalid_value", param=param)
    if get_family(edits[0].family).to_lowrank(edits[0].params, edit_config(edits[0])).act != "linear":
        raise APIError(400, f"intervention {entry.id!r} is not affine in its source", code="invalid_value", param=param)
    return edits[0]


def check_site_order(columns: list[tuple[object, Edit | None]]) -> None:
    """An interchange must be the last intervention of the request at its site (its rows are added last there)."""
    for i, (_, edit) in enumerate(columns):
        if edit is None:
            continue
        site = (edit.placement.layer, edit.placement.component)
        for later, _ in columns[i + 1:]:
            edits = getattr(getattr(later, "intervention", None), "edits", None) or []
            if any((e.placement.layer, e.placement.component) == site for e in edits):
                raise APIError(400, f"interventions[{i}] (an interchange) must be the last intervention at layer "
                                    f"{site[0]} {site[1]}; {later.id!r} comes after it there", code="invalid_value",
                               param="interventions")


def render_chat(engine, messages: list[dict], param: str) -> list[int]:
    """A chat-form source as token ids: the model's chat template with the generation prompt, tokenized
    without added special tokens, as vLLM renders a chat request's messages."""
    tokenizer = engine.llm.get_tokenizer()
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:   # the template's own checks (roles, alternation, a missing template)
        raise APIError(400, f"{param}: the chat template cannot render these messages: {str(exc)[:200]}",
                       code="invalid_value", param=param) from None
    return tokenizer.encode(text, add_special_tokens=False)


class Plan(NamedTuple):
    """One interchange of a request: its index in ``interventions``, edit, source, scale, base positions, and the
    axes of its ``subspaces`` (None without)."""

    index: int
    edit: Edit
    source: object
    scale: float
    positions: str
    axes: torch.Tensor | None


async def source_terms(engine, plans: list[Plan]) -> list[SourceTerm]:
    """Run every source (concurrently) and turn each into the term its base positions get."""
    async def one(index, edit, source, scale, base_positions, axes):
        param = f"interventions[{index}].source"
        wanted = _count(source.positions, f"{param}.positions")
        if wanted != _count(base_positions, f"interventions[{index}].positions"):
            raise APIError(400, f"{param}.positions {source.positions!r} and the base positions {base_positions!r} "
                                "pair unequal numbers of tokens", code="invalid_value", param=f"{param}.positions")
        site = (edit.placement.layer, edit.placement.component)
        capture = CaptureRequest(uuid.uuid4().hex, ((*site, source.positions),))
        prompt = source.prompt if source.messages is None else render_chat(engine, source.messages, f"{param}.messages")
        try:
            got = await engine.run_source(prompt, capture)
        except CLIENT_EXCEPTIONS as exc:   # what vLLM answers 4xx for: a prompt past the context, bad token ids
            raise APIError(400, f"{param}.prompt: {error_of(exc)[1]}", code="invalid_value",
                           param=f"{param}.prompt") from None
        positions, rows = got.get(0, ([], torch.zeros(0)))
        if len(positions) != wanted:
            raise APIError(400, f"{param}.prompt has {len(positions)} of the {wanted} positions {source.positions!r} "
                                "asks for (windows take at most half the prompt)", code="invalid_value",
                           param=f"{param}.prompt")
        if axes is not None:
            return subspace_term(edit, axes, rows, scale, base_positions)
        return SourceTerm(*site, base_positions, source_rows(edit, rows, scale))

    return list(await asyncio.gather(*(one(*plan) for plan in plans)))
