"""Per-request source terms of interchange interventions, inside the worker.

An interchange intervention (pyvene's ``VanillaIntervention``, ``RotatedSpaceIntervention``, …) is
affine in its source: ``f(h; s) = f(h; 0) + g(s)``. Its slot holds ``f(h; 0)`` (the source-free
edit, applied by the batched kernel like any other column); the API computes, for each base
position, ``scale · g(s_i)`` from the source run's representation ``s_i`` and sends the rows in the
request's extra args as a :class:`SourceTerms`. :meth:`InterchangeState.add` adds the i-th row to
the i-th base position of the request at that site, after the site's kernel call (the API makes
an interchange the last intervention of a request at its site). Positions are absolute, as
everywhere, so chunked prefill adds each row to the same token.

pyvene's ``subspaces`` choose which coordinates are interchanged per request, which changes the part of
the edit that multiplies ``h``: such a request does not use the slot, and its term carries the basis B
(``[width, m]``, the selected coordinates' axes) with its rows: at its positions ``h ← h − scale · (h B) Bᵀ``
(before the rows are added), one batched product per site for all such requests of the step.
"""
from __future__ import annotations

import base64
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steer_serve.interventions.positions import Positions, parse_positions

Site = tuple[int, str]


def _encode(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "data": base64.b64encode(t.to(torch.float32).contiguous().numpy().astype("<f4")
                                                             .tobytes()).decode()}


def _decode(data: dict) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(data["data"]), dtype="<f4").reshape(data["shape"]).copy())


@dataclass(frozen=True)
class SourceTerm:
    """Rows ``[k, width]`` (float32) added at the first k ``positions`` of ``(layer, component)``; with a
    ``basis`` B, ``scale · (h B) Bᵀ`` is first taken off h there (see the module docstring)."""

    layer: int
    component: str
    positions: str
    rows: torch.Tensor
    basis: torch.Tensor | None = None
    scale: float = 1.0

    def to_json(self) -> dict:
        out = {"layer": self.layer, "component": self.component, "positions": self.positions, **_encode(self.rows)}
        if self.basis is not None:
            out.update(basis=_encode(self.basis), scale=self.scale)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "SourceTerm":
        basis = _decode(data["basis"]) if "basis" in data else None
        return cls(int(data["layer"]), str(data["component"]), str(data["positions"]), _decode(data),
                   basis, float(data.get("scale", 1.0)))


EXTRA_ARGS_KEY = "steer_interchange"


def to_extra_args(terms: list[SourceTerm]) -> dict:
    return {EXTRA_ARGS_KEY: [t.to_json() for t in terms]}


def from_extra_args(extra_args: dict | None) -> list[SourceTerm]:
    return [SourceTerm.from_json(t) for t in (extra_args or {}).get(EXTRA_ARGS_KEY) or []]


class InterchangeState:
    """The source terms of the requests in flight, and this step's rows to add per site."""

    def __init__(self):
        self._terms: dict[str, list[tuple[Site, Positions, SourceTerm]]] = {}     # engine request id -> terms
        self._step: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}             # site -> (token index, rows)
        self._project: dict[Site, tuple[torch.Tensor, ...]] = {}                   # site -> (token index, scale·B, B)

    def _parse(self, req_id: str, extra_args_of: Callable[[str], dict | None]):
        if req_id not in self._terms:
            self._terms[req_id] = [((t.layer, t.component), parse_positions(t.positions), t)
                                   for t in from_extra_args(extra_args_of(req_id))]
        return self._terms[req_id]

    def prepare(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                live_req_ids: Collection[str] = ()) -> None:
        """Which token of this step gets which row, per site (arrays per request, flattened-token order)."""
        if len(self._terms) > 2 * len(live_req_ids) + 64:
            self._terms = {r: t for r, t in self._terms.items() if r in live_req_ids}
        wanted: dict[Site, list[tuple[np.ndarray, torch.Tensor]]] = {}
        projected: dict[Site, list[tuple[np.ndarray, SourceTerm]]] = {}
        offset = 0
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled[i])
            terms = self._parse(req_id, extra_args_of)
            if terms:
                computed, prompt = int(num_computed[i]), int(num_prompt[i])
                chunk = np.arange(computed, computed + n, dtype=np.int64)
                for site, spec, term in terms:
                    every = np.flatnonzero(spec.mask(np.arange(max(prompt, computed + n)), prompt))
                    ordinal = np.searchsorted(every, chunk[spec.mask(chunk, prompt)])
                    ordinal = ordinal[ordinal < term.rows.shape[0]]
                    if ordinal.size:
                        index = every[ordinal] - computed + offset
                        wanted.setdefault(site, []).append((index, term.rows[torch.from_numpy(ordinal)]))
                        if term.basis is not None:
                            projected.setdefault(site, []).append((index, term))
            offset += n
        self._step = {site: (torch.from_numpy(np.concatenate([t for t, _ in parts])), torch.cat([r for _, r in parts]))
                      for site, parts in wanted.items()}
        self._project = {site: _stacked(parts) for site, parts in projected.items()}

    def touches(self, site: Site) -> bool:
        """Whether this step adds source rows at ``site``."""
        return site in self._step

    def add(self, site: Site, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (``[step tokens, width]``, already edited at ``site``) plus this step's source rows there."""
        if site not in self._step:
            return tokens
        if site in self._project:
            index, scaled, basis = (t.to(tokens.device) for t in self._project[site])
            h = tokens[index].to(torch.float32).unsqueeze(1)
            taken = torch.bmm(torch.bmm(h, basis), scaled.transpose(1, 2)).squeeze(1)
            tokens = tokens.index_add(0, index, -taken.to(tokens.dtype))
        index, rows = self._step[site]
        return tokens.index_add(0, index.to(tokens.device), rows.to(tokens.device, tokens.dtype))


def _stacked(parts: list[tuple[np.ndarray, SourceTerm]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token index ``[T]``, ``scale · B`` and B per token ``[T, width, m]`` (bases zero-padded to one m)."""
    m = max(term.basis.shape[1] for _, term in parts)
    bases = [torch.nn.functional.pad(term.basis, (0, m - term.basis.shape[1])).expand(len(index), -1, -1)
             for index, term in parts]
    scales = torch.cat([torch.full((len(index), 1, 1), term.scale) for index, term in parts])
    basis = torch.cat(bases)
    return torch.from_numpy(np.concatenate([index for index, _ in parts])), scales * basis, basis
