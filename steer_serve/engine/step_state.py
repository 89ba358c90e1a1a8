"""Per-step token → (slot, coef) buffers shared by every steerable layer of one model.

Once per engine step the runner hook calls :meth:`StepState.prepare` with the scheduled batch
(requests in flattened-token order). It writes, for every intervention column ``m`` and token
``t``, the slot whose tables edit that token and the coefficient (the request's scale, or 0 where
the request's positions exclude the token). Masked tokens get slot 0, which is all zeros, so they
are untouched bit for bit. Positions are absolute (``num_computed + i``), so chunked prefill,
prefix-cache hits and preemption/recompute all hit exactly the same tokens.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch

from steer_serve.engine.config import RequestSteering, SteerConfig
from steer_serve.interventions.positions import Positions, parse_positions

Site = tuple[int, str]  # (layer index, component)


class StepState:
    """Static per-token buffers (fixed size and address) plus host-side bookkeeping."""

    def __init__(self, config: SteerConfig, slots: torch.Tensor, coef: torch.Tensor):
        self.config = config
        self.slots = slots          # [max_columns, max_tokens] int64
        self.coef = coef            # [max_columns, max_tokens] float32
        self.num_columns = 0        # columns in use this step (host int: no device sync)
        self.active_sites: set[Site] = set()
        self.slot_sites: dict[int, frozenset[Site]] = {}
        #: request id -> (columns, prompt length its positions count from, or None: the engine's)
        self._requests: dict[str, tuple[list[tuple[int, float, Positions]], int | None] | None] = {}
        self._filled_tokens = 0
        self._slots_np = np.zeros(tuple(slots.shape), dtype=np.int64)
        self._coef_np = np.zeros(tuple(coef.shape), dtype=np.float32)

    def is_active(self, layer: int, component: str) -> bool:
        return self.config.always_active or (layer, component) in self.active_sites

    def columns(self) -> int:
        return self.config.max_columns if self.config.always_active else self.num_columns

    def set_slot_sites(self, slot: int, sites: Sequence[Site]) -> None:
        """Record which (layer, component) sites a slot's intervention touches."""
        if sites:
            self.slot_sites[slot] = frozenset(sites)
        else:
            self.slot_sites.pop(slot, None)

    def _steering_of(self, req_id: str, extra_args_of: Callable[[str], dict | None]):
        if req_id not in self._requests:
            steering = RequestSteering.from_extra_args(extra_args_of(req_id))
            self._requests[req_id] = None if steering is None else ([
                (slot, scale, parse_positions(pos))
                for slot, scale, pos in zip(steering.slots, steering.scales, steering.positions)],
                steering.prompt_len)
        return self._requests[req_id]

    def _forget_finished(self, live_req_ids: Collection[str]) -> None:
        """Drop the cached steering of requests the runner no longer holds (amortised: rarely runs)."""
        if len(self._requests) > 2 * len(live_req_ids) + 64:
            for req_id in [r for r in self._requests if r not in live_req_ids]:
                del self._requests[req_id]

    def prepare(self, req_ids: Sequence[str], num_scheduled: np.ndarray, num_computed: np.ndarray,
                num_prompt: np.ndarray, extra_args_of: Callable[[str], dict | None],
                live_req_ids: Collection[str] = ()) -> None:
        """Fill the buffers for one step. Arrays are per request, in flattened-token order;
        ``live_req_ids`` are all requests the runner still holds (to forget finished ones)."""
        self._forget_finished(live_req_ids)
        total = int(num_scheduled.sum())
        max_tokens = self.slots.shape[1]
        if total > max_tokens:
            raise RuntimeError(f"step has {total} tokens but steer buffers hold {max_tokens}")
        width = max(total, self._filled_tokens)
        slots_np, coef_np = self._slots_np, self._coef_np
        slots_np[:, :width] = 0
        coef_np[:, :width] = 0.0
        columns, present = 0, set()
        offset = 0
        for i, req_id in enumerate(req_ids):
            n = int(num_scheduled[i])
            steering = self._steering_of(req_id, extra_args_of)
            if steering:
                columns_of_request, prompt_len = steering
                prompt_len = int(num_prompt[i]) if prompt_len is None else prompt_len
                positions = np.arange(num_computed[i], num_computed[i] + n)
                for m, (slot, scale, spec) in enumerate(columns_of_request):
                    mask = spec.mask(positions, prompt_len)
                    if mask.any():
                        slots_np[m, offset:offset + n] = np.where(mask, slot, 0)
                        coef_np[m, offset:offset + n] = np.where(mask, scale, 0.0)
                        columns = max(columns, m + 1)
                        present.add(slot)
            offset += n
        self.num_columns = columns
        self.active_sites = set().union(*(self.slot_sites.get(s, ()) for s in present))
        if columns or self._filled_tokens or self.config.always_active:
            self.slots[:, :width].copy_(torch.from_numpy(slots_np[:, :width]))
            self.coef[:, :width].copy_(torch.from_numpy(coef_np[:, :width]))
            self._filled_tokens = total if columns else 0
