"""Activation capture per request, inside the worker (pyvene's ``CollectIntervention``, served).

A request that asks for captures carries a :class:`CaptureRequest` in its extra args: a key (made
by the API, unique per request) and its sites ``(layer, component, positions)``. Once per step
:meth:`CaptureState.prepare` turns the scheduled batch into, per site, the flat indices of the
tokens to record and their absolute positions (the same positions grammar as interventions,
absolute in the request, so chunked prefill hits the same tokens). Each hooked site, after its
edits, hands its tensor to :meth:`CaptureState.record`, which copies those rows to host memory
(float32). :meth:`CaptureState.take` returns a request's rows per site, sorted by position, one
row per position (a preempted, recomputed token overwrites its earlier row), and forgets them.
The API calls it (``steer_take_capture``) when the request has finished.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steer_serve.interventions.positions import Positions, parse_positions

Site = tuple[int, str]


@dataclass(frozen=True)
class CaptureRequest:
    """What one request records: a key the API fetches by, and its ``(layer, component, positions)`` sites."""

    key: str
    sites: tuple[tuple[int, str, str], ...]

    EXTRA_ARGS_KEY = "steer_capture"

    def to_extra_args(self) -> dict:
        return {self.EXTRA_ARGS_KEY: {"key": self.key, "sites": [list(s) for s in self.sites]}}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "CaptureRequest | None":
        data = (extra_args or {}).get(cls.EXTRA_ARGS_KEY)
        if not data:
            return None
        return cls(str(data["key"]), tuple((int(l), str(c), str(p)) for l, c, p in data["sites"]))


@dataclass
class _Parsed:
    key: str
    sites: list[tuple[Site, Positions]]   # in request order: the index is the site's number


class CaptureState:
    """The captures of the requests in flight, and this step's rows to record per site."""

    def __init__(self):
        self._parsed: dict[str, _Parsed | None] = {}                 # engine request id -> its capture
        self._step: dict[Site, tuple[torch.Tensor, list[tuple[str, int, np.ndarray]]]] = {}
        self._records: dict[str, dict[int, list[tuple[np.ndarray, torch.Tensor]]]] = {}   # key -> site number -> rows
        self.any_this_step = False

    def _parse(self, req_id: str, extra_args_of: Callable[[str], dict | None]) -> _Parsed | None:
        if req_id not in self._parsed:
            request = CaptureRequest.from_extra_args(extra_args_of(req_id))
            self._parsed[req_id] = None if request is None else _Parsed(
                request.key, [((layer, component), parse_positions(p)) for layer, component, p in request.sites])
        return self._parsed[req_id]

    def prepare(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                live_req_ids: Collection[str] = ()) -> None:
        """Which rows of this step each site records (arrays per request, flattened-token order)."""
        if len(self._parsed) > 2 * len(live_req_ids) + 64:
            self._parsed = {r: p for r, p in self._parsed.items() if r in live_req_ids}
        self._step = {}
        self.any_this_step = False
        offset = 0
        wanted: dict[Site, list[tuple[str, int, np.ndarray, np.ndarray]]] = {}
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled[i])
            parsed = self._parse(req_id, extra_args_of)
            if parsed is not None:
                computed = int(num_computed[i])
                positions = np.arange(computed, computed + n, dtype=np.int64)
                for number, (site, spec) in enumerate(parsed.sites):
                    hit = positions[spec.mask(positions, int(num_prompt[i]))]
                    if hit.size:
                        wanted.setdefault(site, []).append((parsed.key, number, hit, hit - computed + offset))
            offset += n
        for site, parts in wanted.items():
            index = torch.from_numpy(np.concatenate([rows for *_, rows in parts]))
            self._step[site] = (index, [(key, number, hit) for key, number, hit, _ in parts])
        self.any_this_step = bool(self._step)

    def wants(self, site: Site) -> bool:
        return site in self._step

    def record(self, site: Site, tokens: torch.Tensor) -> None:
        """Copy this step's rows of ``site`` (``tokens``: ``[step tokens, width]``) to host memory."""
        index, parts = self._step[site]
        rows = tokens.index_select(0, index.to(tokens.device)).to(torch.float32).cpu()
        start = 0
        for key, number, hit in parts:
            self._records.setdefault(key, {}).setdefault(number, []).append((hit, rows[start:start + hit.size]))
            start += hit.size

    def take(self, key: str) -> tuple[bytes, str]:
        """A request's captures, forgotten here: safetensors bytes (tensor ``"<site number>"``) and a JSON list
        of ``{site, positions}`` for the sites that recorded rows (in this worker: its pipeline stage's layers)."""
        from safetensors.torch import save

        records = self._records.pop(key, {})
        tensors, meta = {}, []
        for number, chunks in sorted(records.items()):
            positions = np.concatenate([hit for hit, _ in chunks])
            rows = torch.cat([r for _, r in chunks])
            # the last row recorded for a position wins (a preempted request recomputes its tokens)
            order = len(positions) - 1 - np.unique(positions[::-1], return_index=True)[1]   # sorted by position
            tensors[str(number)] = rows[torch.from_numpy(order)].contiguous()
            meta.append({"site": number, "positions": positions[order].tolist()})
        return save(tensors) if tensors else b"", json.dumps(meta)
