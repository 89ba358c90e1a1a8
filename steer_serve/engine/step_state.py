"""Per-step token → (slot, coef) buffers shared by every steerable layer of one model.

Once per engine step the runner hook calls :meth:`StepState.prepare` with the scheduled batch
(requests in flattened-token order). It writes, for every intervention column ``m`` and token
``t``, the slot whose tables edit that token and the coefficient (the request's scale, or 0 where
the request's positions exclude the token). Masked tokens get slot 0, which is all zeros, so they
are untouched bit for bit. Positions are absolute (``num_computed + i``), so chunked prefill,
prefix-cache hits and preemption/recompute all hit exactly the same tokens.

The fill is array code over the whole batch; no Python loop runs over requests or columns
(except to parse a request's steering the first time it is scheduled). A request's steering lives
in an entry of a request table (slot, scale, kind code, first, last per column, padded to
``max_columns``; its prompt-length override; and its two spans of positions from
:func:`position_spans`, kept until its prompt length changes). Per step the spans, clipped to
each request's scheduled chunk, cut its tokens into five runs (off, on, off, on, off); one
``np.repeat`` of the run values by the run lengths writes all columns (as vLLM's runner builds
positions). The host buffers are pinned on CUDA and copied with ``non_blocking=True``. Every
hooked layer then reads the step's :class:`~steer_serve.kernels.StepPlan` (:meth:`StepState.plan`).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch

from steer_serve.engine.config import RequestSteering, SteerConfig
from steer_serve.interventions.positions import KIND_CODES, NO_POSITIONS, parse_positions, position_spans
from steer_serve.kernels import StepPlan

Site = tuple[int, str]  # (layer index, component)
_ON = np.array([0, 1, 0, 1, 0], dtype=np.int64)  # which of a request's five runs of tokens are edited
_ON_SCALE = _ON.astype(np.float32)


class _RequestTable:
    """Parsed steering of the known requests, one entry each, columns padded (entry 0: no steering).

    Arrays are column-major (``[columns, capacity]``) so a gather for the step's requests is in
    fill order. A request's spans of positions depend on its prompt length only; they are kept
    with the engine's prompt length they were computed at and recomputed when it differs.
    """

    def __init__(self, columns: int, capacity: int = 64):
        self.slot = np.zeros((columns, capacity), dtype=np.int64)
        self.scale = np.zeros((columns, capacity), dtype=np.float32)
        self.kind = np.full((columns, capacity), NO_POSITIONS, dtype=np.int64)
        self.first = np.zeros((columns, capacity), dtype=np.int64)
        self.last = np.zeros((columns, capacity), dtype=np.int64)
        self.spans = np.zeros((columns, capacity, 4), dtype=np.int64)   # position_spans ...
        self.spans_prompt = np.full(capacity, -1, dtype=np.int64)       # ... at this engine prompt length
        self.prompt_len = np.full(capacity, -1, dtype=np.int64)         # -1: the engine's prompt length
        self.max_new = np.zeros(capacity, dtype=np.int64)               # the answer's allowed length (g-8:)
        self.trigger_at = np.full((columns, capacity), -1, dtype=np.int64)   # where a t<id> token appeared
        self.scanned = np.zeros(capacity, dtype=np.int64)               # tokens searched for triggers so far
        self._free = list(range(capacity - 1, 0, -1))

    def add(self, steering: RequestSteering) -> int:
        """Store ``steering`` in a free entry and return its index."""
        columns = self.slot.shape[0]
        if len(steering.slots) > columns:
            raise ValueError(f"request has {len(steering.slots)} columns, the engine holds {columns}")
        if not self._free:
            self._grow()
        row = self._free.pop()
        specs = [parse_positions(p) for p in steering.positions]
        pad = [0] * (columns - len(specs))
        self.slot[:, row] = list(steering.slots) + pad
        self.scale[:, row] = list(steering.scales) + pad
        self.kind[:, row] = [s.code for s in specs] + [NO_POSITIONS] * len(pad)
        self.first[:, row] = [s.first for s in specs] + pad
        self.last[:, row] = [s.last for s in specs] + pad
        self.spans_prompt[row] = -1
        self.prompt_len[row] = -1 if steering.prompt_len is None else steering.prompt_len
        self.max_new[row] = steering.max_new_tokens or 0
        self.trigger_at[:, row] = -1
        self.scanned[row] = 0
        return row

    def release(self, row: int) -> None:
        self._free.append(row)

    def spans_of(self, rows: np.ndarray, engine_prompt: np.ndarray) -> np.ndarray:
        """``[columns, requests, 4]`` spans of positions of ``rows`` (fresh arrays)."""
        stale = (self.spans_prompt[rows] != engine_prompt) & (rows != 0)   # entry 0's spans stay empty
        if stale.any():
            todo, todo_prompt = rows[stale], engine_prompt[stale]
            override = self.prompt_len[todo]
            self.spans[:, todo] = position_spans(self.kind[:, todo], self.first[:, todo], self.last[:, todo],
                                                 np.where(override >= 0, override, todo_prompt),
                                                 self.trigger_at[:, todo], self.max_new[todo])
            self.spans_prompt[todo] = todo_prompt
        return self.spans[:, rows]

    def find_triggers(self, rows: np.ndarray, token_ids: np.ndarray, upto: np.ndarray) -> None:
        """Search the tokens of ``rows`` (``token_ids[i]`` the i-th request's, known up to ``upto[i]``) for the
        triggers they still wait for; a found trigger's spans are recomputed at their next use."""
        waiting = (self.kind[:, rows] == KIND_CODES["trigger"]) & (self.trigger_at[:, rows] < 0)
        for i in np.flatnonzero(waiting.any(axis=0)):
            row, start, stop = rows[i], self.scanned[rows[i]], int(upto[i])
            for column in np.flatnonzero(waiting[:, i]):
                hits = np.flatnonzero(token_ids[i, start:stop] == self.first[column, row])
                if hits.size:
                    self.trigger_at[column, row] = start + hits[0]
                    self.spans_prompt[row] = -1
            self.scanned[row] = max(start, stop)

    def _grow(self) -> None:
        capacity = len(self.prompt_len)
        for name in ("slot", "scale", "kind", "first", "last", "spans", "spans_prompt", "prompt_len", "trigger_at",
                     "scanned", "max_new"):
            old = getattr(self, name)
            axis = 0 if old.ndim == 1 else 1
            new = np.concatenate([old, np.zeros_like(old)], axis=axis)
            setattr(self, name, new)
        self._free = list(range(2 * capacity - 1, capacity - 1, -1))


class StepState:
    """Static per-token buffers (fixed size and address) plus host-side bookkeeping."""

    def __init__(self, config: SteerConfig, slots: torch.Tensor, coef: torch.Tensor):
        self.config = config
        self.slots = slots          # [max_columns, max_tokens] int64
        self.coef = coef            # [max_columns, max_tokens] float32
        self.num_columns = 0        # columns in use this step (host int: no device sync)
        self.active_sites: set[Site] = set()
        self.slot_sites: dict[int, frozenset[Site]] = {}
        self._rows: dict[str, int] = {}   # request id -> its row of the request table (0: no steering)
        self._table = _RequestTable(config.max_columns)
        self._filled_tokens = 0
        self._plan: StepPlan | None = None
        pinned = slots.is_cuda
        self._slots_host = torch.zeros(tuple(slots.shape), dtype=torch.int64, pin_memory=pinned)
        self._coef_host = torch.zeros(tuple(coef.shape), dtype=torch.float32, pin_memory=pinned)
        self._slots_np, self._coef_np = self._slots_host.numpy(), self._coef_host.numpy()
        self._copied = torch.cuda.Event() if pinned else None   # the last copy out of the host buffers

    def is_active(self, layer: int, component: str) -> bool:
        return self.config.always_active or (layer, component) in self.active_sites

    def columns(self) -> int:
        return self.config.max_columns if self.config.always_active else self.num_columns

    def plan(self, num_tokens: int) -> StepPlan:
        """The columns of this step over its first ``num_tokens`` tokens, analysed once per step."""
        if self._plan is None or self._plan.slots.shape[1] != num_tokens:
            m = self.columns()
            self._plan = StepPlan(self.slots[:m, :num_tokens], self.coef[:m, :num_tokens],
                                  self._slots_np[:m, :num_tokens], self._coef_np[:m, :num_tokens])
        return self._plan

    def set_slot_sites(self, slot: int, sites: Sequence[Site]) -> None:
        """Record which (layer, component) sites a slot's intervention touches."""
        if sites:
            self.slot_sites[slot] = frozenset(sites)
        else:
            self.slot_sites.pop(slot, None)

    def _table_rows(self, req_ids: Sequence[str], extra_args_of: Callable[[str], dict | None]) -> np.ndarray:
        """The request-table row of each request; steering of a request seen first is parsed here."""
        try:
            return np.fromiter(map(self._rows.__getitem__, req_ids), dtype=np.intp, count=len(req_ids))
        except KeyError:
            for req_id in req_ids:
                if req_id not in self._rows:
                    steering = RequestSteering.from_extra_args(extra_args_of(req_id))
                    self._rows[req_id] = 0 if steering is None else self._table.add(steering)
            return np.fromiter(map(self._rows.__getitem__, req_ids), dtype=np.intp, count=len(req_ids))

    def _forget_finished(self, live_req_ids: Collection[str]) -> None:
        """Drop the cached steering of requests the runner no longer holds (amortised: rarely runs)."""
        if len(self._rows) > 2 * len(live_req_ids) + 64:
            for req_id in [r for r in self._rows if r not in live_req_ids]:
                row = self._rows.pop(req_id)
                if row:
                    self._table.release(row)

    def prepare(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                live_req_ids: Collection[str] = (), token_ids: np.ndarray | None = None) -> None:
        """Fill the buffers for one step. Arrays are per request, in flattened-token order;
        ``live_req_ids`` are all requests the runner still holds (to forget finished ones);
        ``token_ids[i]`` the i-th request's tokens so far (searched for ``t<id>`` triggers)."""
        self._forget_finished(live_req_ids)
        self._plan = None
        count = len(req_ids)
        total = int(num_scheduled[:count].sum())
        max_tokens = self.slots.shape[1]
        if total > max_tokens:
            raise RuntimeError(f"step has {total} tokens but steer buffers hold {max_tokens}")
        width = max(total, self._filled_tokens)
        if self._copied is not None:
            self._copied.synchronize()          # the previous step's copy has left the host buffers
        self._slots_np[:, :width] = 0
        self._coef_np[:, :width] = 0.0
        rows = self._table_rows(req_ids, extra_args_of)
        if token_ids is not None and rows.any():
            self._table.find_triggers(rows, token_ids, np.asarray(num_computed[:count]) + num_scheduled[:count])
        columns, present = (0, []) if not rows.any() else self._fill(
            rows, *(np.asarray(a[:count], dtype=np.int64) for a in (num_scheduled, num_computed, num_prompt)), total)
        self.num_columns = columns
        self.active_sites = set().union(*(self.slot_sites.get(s, ()) for s in present))
        if columns or self._filled_tokens or self.config.always_active:
            cuda = self._copied is not None
            self.slots[:, :width].copy_(self._slots_host[:, :width], non_blocking=cuda)
            self.coef[:, :width].copy_(self._coef_host[:, :width], non_blocking=cuda)
            if cuda:
                self._copied.record()
            self._filled_tokens = total if columns else 0

    def _fill(self, rows: np.ndarray, n: np.ndarray, computed: np.ndarray, num_prompt: np.ndarray,
              total: int) -> tuple[int, list[int]]:
        """Write the host buffers' first ``total`` tokens; returns (columns in use, slots present)."""
        t = self._table
        spans = t.spans_of(rows, num_prompt)                           # [columns, requests, 4]
        # cut each request's chunk (offsets 0..n) at its spans: runs off, on, off, on, off
        edges = np.empty((*spans.shape[:2], 6), dtype=np.int64)
        inner = edges[..., 1:5]
        np.subtract(spans, computed[:, None], out=inner)
        np.maximum(inner, 0, out=inner)
        np.minimum(inner, n[:, None], out=inner)
        edges[..., 0], edges[..., 5] = 0, n
        runs = edges[..., 1:] - edges[..., :-1]
        hit = (runs[..., 1] + runs[..., 3]) > 0
        in_use = np.flatnonzero(hit.any(axis=1))
        if in_use.size == 0:
            return 0, []
        m = int(in_use[-1]) + 1
        slot, runs = t.slot[:m, rows], runs[:m].ravel()
        self._slots_np[:m, :total] = np.repeat((slot[..., None] * _ON).ravel(), runs).reshape(m, total)
        self._coef_np[:m, :total] = np.repeat((t.scale[:m, rows, None] * _ON_SCALE).ravel(), runs).reshape(m, total)
        return m, np.flatnonzero(np.bincount(slot[hit[:m]])).tolist()
