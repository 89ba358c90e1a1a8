"""Host-side analysis of one step's ``[columns, T]`` slot/coef buffers, shared by every layer's call.

The torch path decides on the host which rows to compute and which strategy to use. Those facts
depend only on the step's slots and coefs, not on the layer, so the engine builds one
:class:`StepPlan` per step (from the host copy of its buffers: no device sync) and every hooked
layer reuses it. Each fact is computed on first use, so a backend that reads none of them (Triton)
pays only for the tensor views.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass
class ColumnPlan:
    """One intervention column of a step: device views and their host twins."""

    slots: torch.Tensor     # [T] int32/int64
    coef: torch.Tensor      # [T] float32
    slots_np: np.ndarray
    coef_np: np.ndarray

    @cached_property
    def uniform(self) -> bool:
        """Every row has the same slot and the same coef (and there is at least one row)."""
        s, c = self.slots_np, self.coef_np
        return bool(len(s)) and (len(s) == 1 or bool((s == s[0]).all() and (c == c[0]).all()))

    @cached_property
    def rows(self) -> np.ndarray:
        """Rows with a non-zero slot and a non-zero coef (a table may still hold nothing in the slot)."""
        return np.flatnonzero((self.coef_np != 0) & (self.slots_np != 0))

    @cached_property
    def gathered(self) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
        """``(rows, slots, slots, coef)`` of :attr:`rows`: row indices on the device, then the rows'
        slots on the host and on the device and their coefs on the device."""
        return self.select(self.rows)

    def select(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
        rows_t = torch.from_numpy(rows).to(self.slots.device)
        return rows_t, self.slots_np[rows], self.slots.index_select(0, rows_t), self.coef.index_select(0, rows_t)


class StepPlan:
    """The columns of one step, in the order they are applied."""

    def __init__(self, slots: torch.Tensor, coef: torch.Tensor, slots_np: np.ndarray, coef_np: np.ndarray):
        self.slots, self.coef = slots, coef          # [columns, T]
        self.columns = [ColumnPlan(slots[m], coef[m], slots_np[m], coef_np[m]) for m in range(slots.shape[0])]

    @classmethod
    def of(cls, slots: torch.Tensor, coef: torch.Tensor) -> "StepPlan":
        """A plan read from the tensors themselves (a device sync when they live on an accelerator)."""
        return cls(slots, coef, slots.numpy(force=True), coef.numpy(force=True))
