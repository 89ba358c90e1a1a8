"""Batched, slot-gathered application of interventions: one call per hooked layer and step.

``apply_interventions`` is the single entry point the engine uses. It dispatches to the Triton
kernel (:mod:`.triton_ops`) for CUDA tensors and to the vectorised torch path (:mod:`.torch_ops`)
otherwise. ``STEER_SERVE_KERNEL=triton`` forces Triton (with ``TRITON_INTERPRET=1`` it runs on CPU,
for tests); ``STEER_SERVE_KERNEL=torch`` forces the torch path (it syncs to the host on CUDA).
"""
from __future__ import annotations

import os

import torch

from .slot_tables import ACT_CODES, SlotTables, register_slot_tables
from .torch_ops import apply_torch

__all__ = ["ACT_CODES", "SlotTables", "apply_interventions", "register_slot_tables"]


def apply_interventions(x: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor, tables: SlotTables,
                        *, out_base: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``(out_base if given else x) + coef[:, None] * delta(x)`` as a new tensor.

    ``x``: ``[T, d]`` float (any strides); ``slots``: ``[T]`` int32/int64; ``coef``: ``[T]`` float32.
    ``delta`` per token comes from ``tables`` at ``slots[t]``::

        delta(h) = (act(h Wᵀ + b) − h P) Uᵀ + v − h ⊙ z

    computed in fp32 and cast to the base dtype. Rows with ``slots == 0`` or ``coef == 0`` are
    bit-exact copies of the base row.
    """
    T, d = x.shape
    if slots.shape != (T,) or coef.shape != (T,) or d != tables.hidden:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, slots {tuple(slots.shape)}, "
                         f"coef {tuple(coef.shape)}, tables hidden {tables.hidden}")
    if out_base is not None and out_base.shape != x.shape:
        raise ValueError(f"out_base shape {tuple(out_base.shape)} != x shape {tuple(x.shape)}")
    backend = os.environ.get("STEER_SERVE_KERNEL") or ("triton" if x.is_cuda else "torch")
    if backend == "triton":
        from .triton_ops import apply_triton
        return apply_triton(x, slots, coef, tables, out_base)
    return apply_torch(x, slots, coef, tables, out_base)
