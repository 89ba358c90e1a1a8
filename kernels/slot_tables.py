"""Fixed-size, fixed-address slot tables: the parameters every batched kernel gathers from.

One :class:`SlotTables` per hooked (layer, component). Slot ``s`` holds one edit in the generic
low-rank form of :mod:`steer_serve.interventions.base`, zero-padded to the table rank ``R``::

    delta(h) = (act(h Wᵀ + b) − h P) Uᵀ + v − h ⊙ z

Slot 0 is all zeros (no edit) and read-only. Storage is packed so that each kernel reads one
contiguous block per slot and, on CPU, one ``embedding_bag`` table serves each half of the edit:

* ``wp``  ``[S, d+1, 2R]``: row ``j < d`` is ``[W[:, j], P[j, :]]``, row ``d`` is ``[b, 0]`` (the
  bias rides on an appended constant-1 input column);
* ``uv``  ``[S, R+1, d]``: rows ``r < R`` are ``U[:, r]``, row ``R`` is ``v`` (``v`` rides on an
  appended constant-1 weight);
* ``z``   ``[S, d]``, ``act`` ``[S]`` int32 (codes of :data:`ACT_CODES`) and ``renorm`` ``[S]`` int32 (1:
  rescale the edited row to the norm of the row it edited, ``LowRankEdit.renorm``).

``W, b, P, U, v`` are views into ``wp``/``uv`` with the shapes of the contract. A slot with the
linear activation is stored folded, ``W − Pᵀ`` in ``W`` and zeros in ``P`` (the same ``delta``
with one GEMM fewer on the CPU path). Writes go through :meth:`SlotTables.write`, which also
keeps a host-side summary per slot (used, has a low-rank part, has ``z``, act code, renorm) so the CPU
path can skip work without reading the tables; write through one ``SlotTables`` object per set of
buffers (:meth:`SlotTables.from_buffers` rebuilds the summary from the buffers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from steer_serve.interventions.base import ACTIVATIONS, LowRankEdit

#: Activation codes stored in ``SlotTables.act``; ``gelu`` is the exact erf form (transformers ``ACT2FN["gelu"]``).
ACT_CODES = {"linear": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}
assert tuple(ACT_CODES) == ACTIVATIONS

_BUFFERS = ("wp", "uv", "z", "act", "renorm")


@dataclass
class SlotTables:
    wp: torch.Tensor   # [S, d+1, 2R]
    uv: torch.Tensor   # [S, R+1, d]
    z: torch.Tensor    # [S, d]
    act: torch.Tensor  # [S] int32
    renorm: torch.Tensor  # [S] int32
    lowrank: np.ndarray = field(init=False, repr=False)  # host: W/b/P/U set per slot
    codes: np.ndarray = field(init=False, repr=False)   # host: act code per slot
    has_z: np.ndarray = field(init=False, repr=False)   # host: z set per slot
    renorms: np.ndarray = field(init=False, repr=False)  # host: renorm set per slot
    used: np.ndarray = field(init=False, repr=False)    # host: slot holds any edit
    _views: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        S, d1, R2 = self.wp.shape
        if R2 % 2 or self.uv.shape != (S, R2 // 2 + 1, d1 - 1) or self.z.shape != (S, d1 - 1) \
                or self.act.shape != (S,) or self.act.dtype != torch.int32 or self.renorm.shape != (S,) \
                or self.renorm.dtype != torch.int32:
            raise ValueError("inconsistent slot table buffers")
        # Host summary, read once from the buffers (a single device sync at construction).
        lowrank = self.wp.ne(0).flatten(1).any(1) | self.uv[:, :-1].ne(0).flatten(1).any(1)
        self.lowrank = lowrank.cpu().numpy()
        self.codes = self.act.cpu().numpy().astype(np.int64)
        self.has_z = self.z.ne(0).any(1).cpu().numpy()
        self.renorms = self.renorm.ne(0).cpu().numpy()
        self.used = self.lowrank | self.has_z | self.uv[:, -1].ne(0).any(1).cpu().numpy()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def allocate(cls, num_slots: int, max_rank: int, hidden: int, device=None,
                 dtype: torch.dtype = torch.float32) -> "SlotTables":
        return cls(**_empty(num_slots, max_rank, hidden, device, dtype))

    @classmethod
    def from_buffers(cls, module: torch.nn.Module, prefix: str) -> "SlotTables":
        """View the buffers that :func:`register_slot_tables` registered on ``module``."""
        return cls(**{n: getattr(module, f"{prefix}_{n}") for n in _BUFFERS})

    # -- contract views ----------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.wp.shape[0]

    @property
    def max_rank(self) -> int:
        return self.wp.shape[2] // 2

    @property
    def hidden(self) -> int:
        return self.z.shape[1]

    @property
    def W(self) -> torch.Tensor:  # [S, R, d]
        return self.wp[:, :-1, :self.max_rank].transpose(1, 2)

    @property
    def b(self) -> torch.Tensor:  # [S, R]
        return self.wp[:, -1, :self.max_rank]

    @property
    def P(self) -> torch.Tensor:  # [S, d, R]
        return self.wp[:, :-1, self.max_rank:]

    @property
    def U(self) -> torch.Tensor:  # [S, d, R]
        return self.uv[:, :-1].transpose(1, 2)

    @property
    def v(self) -> torch.Tensor:  # [S, d]
        return self.uv[:, -1]

    def slot_views(self, slot: int) -> tuple[torch.Tensor, ...]:
        """Cached views of one slot: ``(b, Wᵀ, [b, 0], [Wᵀ | P], v, Uᵀ)`` (writes are in place)."""
        views = self._views.get(slot)
        if views is None:
            wp, uv, R = self.wp[slot], self.uv[slot], self.max_rank
            views = self._views[slot] = (wp[-1, :R], wp[:-1, :R], wp[-1], wp[:-1], uv[-1], uv[:-1])
        return views

    # -- writes ------------------------------------------------------------------------------
    def write(self, slot: int, edit: LowRankEdit) -> None:
        """Copy ``edit`` into ``slot`` in place (rank zero-padded to R; None fields become zeros)."""
        self._check_slot(slot)
        r, d, R = edit.rank, self.hidden, self.max_rank
        if r > R:
            raise ValueError(f"edit rank {r} exceeds the table rank {R}")
        if edit.act not in ACT_CODES:
            raise ValueError(f"unknown activation {edit.act!r}; expected one of {tuple(ACT_CODES)}")
        expected = {"W": (r, d), "b": (r,), "P": (d, r), "U": (d, r), "v": (d,), "z": (d,)}
        for name, shape in expected.items():
            t = getattr(edit, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"edit.{name} has shape {tuple(t.shape)}, expected {shape} (hidden {d}, rank {r})")
        with torch.no_grad():
            self.wp[slot].zero_()
            self.uv[slot].zero_()
            self.z[slot].zero_()
            if edit.act == "linear" and edit.P is not None:  # fold: x Wᵀ − x P = x (W − Pᵀ)ᵀ
                W = edit.P.T.double().neg() if edit.W is None else edit.W.double() - edit.P.T.double()
                edit = edit.replace(W=W, P=None)
            for name in ("W", "b", "P", "U"):
                t = getattr(edit, name)
                if t is not None:
                    dst = getattr(self, name)[slot]
                    (dst[:r] if name in ("W", "b") else dst[:, :r]).copy_(t)
            if edit.v is not None:
                self.v[slot].copy_(edit.v)
            if edit.z is not None:
                self.z[slot].copy_(edit.z)
            self.act[slot] = ACT_CODES[edit.act]
            self.renorm[slot] = int(edit.renorm)
        self.lowrank[slot] = any(getattr(edit, n) is not None for n in ("W", "b", "P", "U"))
        self.codes[slot] = ACT_CODES[edit.act]
        self.has_z[slot] = edit.z is not None
        self.renorms[slot] = edit.renorm
        self.used[slot] = self.lowrank[slot] or edit.v is not None or edit.z is not None

    def clear(self, slot: int) -> None:
        """Reset ``slot`` to the all-zero (no edit) state."""
        self._check_slot(slot)
        with torch.no_grad():
            self.wp[slot].zero_()
            self.uv[slot].zero_()
            self.z[slot].zero_()
            self.act[slot] = 0
            self.renorm[slot] = 0
        self.lowrank[slot] = False
        self.codes[slot] = 0
        self.has_z[slot] = False
        self.renorms[slot] = False
        self.used[slot] = False

    def _check_slot(self, slot: int) -> None:
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} is not writable: slot 0 is the read-only no-edit slot "
                             f"and the table has {self.num_slots} slots")


def register_slot_tables(module: torch.nn.Module, name: str, num_slots: int, max_rank: int,
                         hidden: int, device=None, dtype: torch.dtype = torch.float32) -> SlotTables:
    """Register zeroed slot tables as non-persistent buffers ``{name}_{wp,uv,z,act,renorm}`` of ``module``.

    Use :meth:`SlotTables.from_buffers` to get a fresh view if the module is moved afterwards.
    """
    for n, t in _empty(num_slots, max_rank, hidden, device, dtype).items():
        module.register_buffer(f"{name}_{n}", t, persistent=False)
    return SlotTables.from_buffers(module, name)


def _empty(num_slots, max_rank, hidden, device, dtype) -> dict[str, torch.Tensor]:
    if num_slots < 1 or max_rank < 1 or hidden < 1:
        raise ValueError(f"need num_slots, max_rank, hidden >= 1, got {num_slots}, {max_rank}, {hidden}")
    S, R, d = num_slots, max_rank, hidden
    return {"wp": torch.zeros(S, d + 1, 2 * R, device=device, dtype=dtype),
            "uv": torch.zeros(S, R + 1, d, device=device, dtype=dtype),
            "z": torch.zeros(S, d, device=device, dtype=dtype),
            "act": torch.zeros(S, device=device, dtype=torch.int32),
            "renorm": torch.zeros(S, device=device, dtype=torch.int32)}
