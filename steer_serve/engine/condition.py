"""Conditional steering (CAST) per request, inside the worker.

A request carrying a :class:`ConditionRequest` has its interventions applied to its generated
tokens only if a condition on its prompt holds (Lee et al., "Programming Refusal with Conditional
Activation Steering", as IBM's ``activation-steering`` computes it): at the condition site the
prompt's representation ``h`` (the mean over the prompt's tokens, or the last prompt token's
row) is compared with its projection onto the condition direction ``c``::

    sim = cos(h, tanh(P h)),  P = c cᵀ / (cᵀ c)
    met = sim < threshold   (comparator "larger": the threshold is larger)
          sim > threshold   (comparator "smaller")

Everything happens on the device, with no host synchronisation inside a step: during prefill the
site's hook adds the prompt rows (weighted 1/n for the mean) into the request's accumulator; a
generated token only exists once the prompt is done, so at every site where its request's edits
run, :meth:`ConditionState.gate` keeps the edited rows of the request's generated tokens where
``met`` and the unedited ones elsewhere (``torch.where``; on the CPU, where the decision is already
host memory, only the rows whose condition fails are touched). Positions are absolute and each prompt
position is added once (the accumulator remembers how far it summed), so chunked prefill and
preemption give the same ``h``; the API gives a conditional request a cache salt of its own, so
the prefix cache skips none of its prompt. The API fetches the decision (``steer_take_condition``)
when the request has finished and reports it in the response.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Site = tuple[int, str]
COMPARATORS = ("larger", "smaller")
AGGREGATES = ("mean", "last")


@dataclass(frozen=True)
class ConditionRequest:
    """One request's condition: a key the API fetches the decision by, the site, direction and test."""

    key: str
    layer: int
    component: str
    direction: tuple[float, ...]
    threshold: float
    comparator: str = "larger"
    aggregate: str = "mean"

    EXTRA_ARGS_KEY = "steer_condition"

    def to_extra_args(self) -> dict:
        return {self.EXTRA_ARGS_KEY: {"key": self.key, "layer": self.layer, "component": self.component,
                                      "direction": list(self.direction), "threshold": self.threshold,
                                      "comparator": self.comparator, "aggregate": self.aggregate}}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "ConditionRequest | None":
        data = (extra_args or {}).get(cls.EXTRA_ARGS_KEY)
        if not data:
            return None
        return cls(str(data["key"]), int(data["layer"]), str(data["component"]),
                   tuple(float(x) for x in data["direction"]), float(data["threshold"]),
                   str(data["comparator"]), str(data["aggregate"]))


def condition_similarity(h: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """CAST's similarity of a prompt representation ``h`` to the condition ``direction`` (a 0-d tensor)."""
    projected = torch.tanh(direction * (direction @ h) / (direction @ direction))
    return (h @ projected) / (h.norm() * projected.norm())


def condition_met(similarity: torch.Tensor, threshold: float, comparator: str) -> torch.Tensor:
    return similarity < threshold if comparator == "larger" else similarity > threshold


@dataclass
class _Accumulator:
    """One request's running prompt representation (on the device) and how far it has summed."""

    request: ConditionRequest
    direction: torch.Tensor | None = None
    total: torch.Tensor | None = None
    summed_to: int = 0                 # prompt positions below this are in ``total``
    met: torch.Tensor | None = None    # the decision, once asked for (the prompt is complete by then)

    def decision(self, device) -> torch.Tensor:
        """Whether the condition holds (0-d bool on the device; not met when no prompt row reached the site).
        Asked for only once a generated token exists, so the prompt's sum is final and the decision is kept:
        a recomputed (preempted) prompt adds no row twice, so it could not change it."""
        if self.met is None:
            self.met = torch.zeros((), dtype=torch.bool, device=device) if self.total is None else \
                condition_met(condition_similarity(self.total, self.direction), self.request.threshold,
                              self.request.comparator)
        return self.met


class ConditionState:
    """The conditions of the requests in flight: this step's prompt rows to add, and tokens to gate."""

    def __init__(self):
        self._parsed: dict[str, ConditionRequest | None] = {}          # engine request id -> its condition
        self._accumulators: dict[str, _Accumulator] = {}               # condition key -> accumulator
        self._adds: dict[Site, list[tuple[_Accumulator, np.ndarray, float]]] = {}
        self._gated: list[tuple[_Accumulator, np.ndarray]] = []
        self._gate: tuple[torch.Tensor, torch.Tensor] | None = None    # this step's (token index, met), built once

    def _parse(self, req_id: str, extra_args_of: Callable[[str], dict | None]) -> ConditionRequest | None:
        if req_id not in self._parsed:
            self._parsed[req_id] = ConditionRequest.from_extra_args(extra_args_of(req_id))
        return self._parsed[req_id]

    def prepare(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                live_req_ids: Collection[str] = ()) -> None:
        """This step's prompt rows to add per site and generated tokens to gate (arrays per request,
        flattened-token order)."""
        if len(self._parsed) > 2 * len(live_req_ids) + 64:
            self._parsed = {r: p for r, p in self._parsed.items() if r in live_req_ids}
        self._adds, self._gated, self._gate = {}, [], None
        offset = 0
        for i, req_id in enumerate(req_ids):
            n, request = int(num_scheduled[i]), self._parse(req_id, extra_args_of)
            if request is not None:
                acc = self._accumulators.setdefault(request.key, _Accumulator(request))
                computed, prompt = int(num_computed[i]), int(num_prompt[i])
                positions = np.arange(computed, computed + n, dtype=np.int64)
                first = prompt - 1 if request.aggregate == "last" else 0
                adds = (positions >= max(acc.summed_to, first)) & (positions < prompt)
                if adds.any():
                    weight = 1.0 / prompt if request.aggregate == "mean" else 1.0
                    self._adds.setdefault((request.layer, request.component), []).append(
                        (acc, np.flatnonzero(adds) + offset, weight))
                    acc.summed_to = max(acc.summed_to, min(computed + n, prompt))
                generated = np.flatnonzero(positions >= prompt)
                if generated.size:
                    self._gated.append((acc, generated + offset))
            offset += n

    def wants(self, site: Site) -> bool:
        return site in self._adds

    def accumulate(self, site: Site, tokens: torch.Tensor) -> None:
        """Add this step's prompt rows of ``site`` (``tokens``: ``[step tokens, width]``) to their requests' sums."""
        for acc, index, weight in self._adds[site]:
            rows = tokens.index_select(0, torch.from_numpy(index).to(tokens.device)).to(torch.float32)
            if acc.total is None:
                acc.total = torch.zeros(tokens.shape[-1], dtype=torch.float32, device=tokens.device)
                acc.direction = torch.tensor(acc.request.direction, dtype=torch.float32, device=tokens.device)
            acc.total += rows.sum(0) * weight

    def gate(self, before: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        """``edited`` with the gated tokens' rows put back to ``before`` where their condition is not met."""
        index, met = self._step_gate(edited.device)
        chosen = torch.where(met[:, None], edited.index_select(0, index), before)
        return edited.index_copy(0, index, chosen.to(edited.dtype))

    def gate_index(self, device) -> torch.Tensor | None:
        """The step's gated token indices (flattened-token order) on ``device``; None when there is none."""
        if not self._gated:
            return None
        index = self._step_gate(device)[0]
        return index if index.numel() else None

    def _step_gate(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's gated token indices and each one's decision, built at the step's first gated site and
        reused at every other (the prompts are complete, so the decisions cannot change within the step).
        On the CPU the decisions are already host memory, so only the rows whose condition fails are kept:
        a met condition then costs no copy at all."""
        if self._gate is None:
            index = torch.from_numpy(np.concatenate([rows for _, rows in self._gated])).to(device)
            decisions = torch.stack([acc.decision(device) for acc, _ in self._gated])
            counts = torch.tensor([len(rows) for _, rows in self._gated], device=device)
            met = decisions.repeat_interleave(counts)
            if device.type == "cpu":
                index, met = index[~met], met[~met]
            self._gate = (index, met)
        return self._gate

    def take(self, key: str) -> dict | None:
        """A finished request's decision ``{similarity, met}``, forgotten here (None: not on this worker)."""
        acc = self._accumulators.pop(key, None)
        if acc is None or acc.total is None:
            return None
        similarity = condition_similarity(acc.total, acc.direction)
        met = condition_met(similarity, acc.request.threshold, acc.request.comparator)
        return {"similarity": float(similarity), "met": bool(met)}
