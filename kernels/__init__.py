"""Batched, slot-gathered application of interventions: one call per hooked layer and step.

``apply_interventions`` is the single entry point the engine uses; one call applies every
intervention column of the step, in column order. It dispatches to the Triton kernel
(:mod:`.triton_ops`) for CUDA tensors and to the vectorised torch path (:mod:`.torch_ops`)
otherwise. ``STEER_SERVE_KERNEL``, read once at import, overrides the choice: ``triton`` forces
Triton (with ``TRITON_INTERPRET=1`` it runs on CPU, for tests); ``torch`` forces the torch path
(on CUDA it syncs to the host unless given the engine's :class:`StepPlan`).
"""
from __future__ import annotations

import functools
import os

import torch

from .slot_tables import ACT_CODES, SlotTables, register_slot_tables
from .step_plan import StepPlan
from .torch_ops import apply_torch

__all__ = ["ACT_CODES", "SlotTables", "StepPlan", "apply_interventions", "register_slot_tables"]

#: ``"triton"``, ``"torch"`` or None (by device): ``STEER_SERVE_KERNEL`` at import.
FORCED_BACKEND = os.environ.get("STEER_SERVE_KERNEL") or None


@functools.cache
def _apply_triton():
    from .triton_ops import apply_triton
    return apply_triton


def apply_interventions(x: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor, tables: SlotTables,
                        *, out_base: torch.Tensor | None = None, plan: StepPlan | None = None) -> torch.Tensor:
    """Apply each column of ``slots``/``coef`` in turn and return the result as a new tensor.

    ``x``: ``[T, d]`` float (any strides); ``slots``: ``[columns, T]`` (or ``[T]``, one column)
    int32/int64; ``coef`` likewise, float32; ``plan``: their host analysis, if the caller has it.
    Column 0 returns ``(out_base if given else x) + coef[0, :, None] * delta(x)``; every further
    column edits the previous column's result (exactly as one call per column would). ``delta``
    per token comes from ``tables`` at the token's slot::

        delta(h) = (act(h Wᵀ + b) − h P) Uᵀ + v − h ⊙ z

    computed in fp32 and cast to the base dtype. Rows with ``slots == 0`` or ``coef == 0`` in
    every column are bit-exact copies of the base row.
    """
    T, d = x.shape
    if slots.dim() == 1:
        slots, coef = slots[None], coef[None]
    if slots.dim() != 2 or slots.shape[1] != T or coef.shape != slots.shape or d != tables.hidden:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, slots {tuple(slots.shape)}, "
                         f"coef {tuple(coef.shape)}, tables hidden {tables.hidden}")
    if out_base is not None and out_base.shape != x.shape:
        raise ValueError(f"out_base shape {tuple(out_base.shape)} != x shape {tuple(x.shape)}")
    if (FORCED_BACKEND or ("triton" if x.is_cuda else "torch")) == "triton":
        return _apply_triton()(x, slots, coef, tables, out_base)
    return apply_torch(x, slots, coef, tables, out_base, plan)
