"""Vectorised torch path of :func:`steer_serve.kernels.apply_interventions` (what the CPU engine runs).

Columns are applied in order, each to the previous one's result; a column that changes no row
costs no copy. Rows of a ``renorm`` slot are rescaled to the norm of their base row after the edit.
Only *active* rows (slot != 0, coef != 0, and the slot holds an edit in this
table) are computed; the others are copied, so they stay bit-exact. Control flow (which rows,
which strategy, which activations, whether ``z`` is needed) is decided on the host with numpy
from the step's :class:`~.step_plan.StepPlan` (built once per step, shared by every layer) and
the table's host summary; without the engine's plan, reading the slots on an accelerator costs a
sync, which is why CUDA uses Triton instead. No Python loop runs over tokens or over slots.

Strategies, chosen from measurements on the 2-core CPU machine (one torch thread, d=576, fp32;
``benchmarks/kernel_bench.py``, forced variants with ``--strategies``):

* one slot and one coef for every row (batch-1 decode, a prefill chunk, all requests on one
  intervention): scalar host checks, ``out = base + c·v`` then ``out += c·(x Wᵀ + b) Uᵀ`` with two
  plain GEMMs; linear slots are stored with ``P`` folded into ``W``. 20-22 µs at T=1, 80-100 µs
  at T=64, 0.3-0.5 ms at T=512.
* several slots, ``rows · R <= 256``: gather each row's packed slot block + two ``baddbmm``
  (BGMV). Fewest ops for a handful of rows, but it copies ``rows·(3R+2)·d`` floats, so it falls
  behind fast: T=64, K=16: 0.28-0.38 ms vs 0.35 ms (R=4), 0.65-1.3 ms vs 0.40-0.43 ms (R=16);
  T=512, K=16: 2.8-4.0 ms vs 1.0 ms (R=4), 40-90 ms vs 1.3-1.8 ms (R=16).
* otherwise ``embedding_bag`` with per-sample weights: the shrink ``x·[Wᵀ|P]`` is a weighted sum
  of ``d`` table rows per token, the expand ``[s, 1]·[Uᵀ; v]`` a weighted sum of ``R+1`` rows; a
  fused gather-reduce each, nothing materialised, cost nearly independent of the slot count.
* rejected: a grouped GEMM looping over the slots present pays 12-25 µs of dispatch per slot. It
  won only with a few large groups (R=16, T=512, K=16: 0.9 vs 1.3 ms; T=64, K=4: 0.20 vs 0.36 ms)
  and lost 2x with many (T=64, K=64: 0.96 vs 0.57 ms; T=512, K=256: 8.0 vs 3.8 ms).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from steer_serve.interventions import renormalise

from .slot_tables import SlotTables
from .step_plan import ColumnPlan, StepPlan

#: gather + bmm while (rows x table rank) is at most this; embedding_bag above (module docstring).
BGMV_MAX_ROWS_X_RANK = 256

_ACT_FNS = (None, torch.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu)


def apply_torch(x: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor, tables: SlotTables,
                out_base: torch.Tensor | None = None, plan: StepPlan | None = None) -> torch.Tensor:
    """Apply the columns of ``slots``/``coef`` (``[columns, T]``; ``plan``, when given, is their host
    analysis) one after another, each to the previous column's result."""
    plan = plan or StepPlan.of(slots, coef)
    base = x if out_base is None else out_base
    out = None
    for column in plan.columns:
        edited = _apply_column(x, base, column, tables)
        if edited is not None:
            out = base = edited
        x = base
    return base.clone(memory_format=torch.contiguous_format) if out is None else out


def _apply_column(x: torch.Tensor, base: torch.Tensor, column: ColumnPlan, t: SlotTables) -> torch.Tensor | None:
    """``base + coef[:, None] * delta(x)`` of one column as a new tensor, or None where no row changes."""
    if column.uniform:                                           # one slot, one coef: scalar checks only
        slot, c = int(column.slots_np[0]), float(column.coef_np[0])
        if c == 0 or not t.used[slot]:
            return None
        out = _one_slot(base, x.float(), slot, c, t)
        if t.renorms[slot]:
            out = renormalise(out, base.float())
        return out if out.dtype == base.dtype else out.to(base.dtype)
    rows = column.rows
    used = t.used[column.slots_np[rows]]
    if not used.all():
        rows = rows[used]
    if rows.size == 0:
        return None
    if rows.size == len(column.slots_np):
        delta = _delta(x.float(), column.slots_np, column.slots, t)
        new = torch.addcmul(base.float(), column.coef.float()[:, None], delta)
        return _renorm_rows(new, base.float(), column.slots_np, t).to(base.dtype)
    rows_t, slots_np, slots, coef = column.gathered if rows is column.rows else column.select(rows)
    delta = _delta(x.index_select(0, rows_t).float(), slots_np, slots, t)
    old = base.index_select(0, rows_t).float()
    new = _renorm_rows(torch.addcmul(old, coef.float()[:, None], delta), old, slots_np, t)
    out = base.clone(memory_format=torch.contiguous_format)
    return out.index_copy_(0, rows_t, new.to(base.dtype))


def _renorm_rows(new: torch.Tensor, old: torch.Tensor, slots_np: np.ndarray, t: SlotTables) -> torch.Tensor:
    """``new`` with the rows of renorm slots rescaled to the norm of ``old``'s rows."""
    flags = t.renorms[slots_np]
    if not flags.any():
        return new
    if flags.all():
        return renormalise(new, old)
    return torch.where(torch.from_numpy(flags).to(new.device)[:, None], renormalise(new, old), new)


def _delta(x: torch.Tensor, slots_np: np.ndarray, slots: torch.Tensor, t: SlotTables) -> torch.Tensor:
    """fp32 ``delta(x)`` (x fp32) for rows whose slots all hold an edit."""
    first = int(slots_np[0])
    if (slots_np == first).all():
        return _one_slot(torch.zeros_like(x), x, first, 1.0, t)
    if t.lowrank[slots_np].any():
        delta = _gathered(x, slots_np, slots, t)
    else:
        delta = t.v.index_select(0, slots).float()
    if t.has_z[slots_np].any():
        delta = torch.addcmul(delta, x, t.z.index_select(0, slots).float(), value=-1.0)
    return delta


def _one_slot(base: torch.Tensor, x: torch.Tensor, slot: int, c: float, t: SlotTables) -> torch.Tensor:
    """``base + c·delta(x)`` in a new fp32 tensor, every row in ``slot``: plain GEMMs, nothing gathered."""
    b, w, bias, wp, v, ut = t.slot_views(slot)
    if t.wp.dtype != torch.float32:
        b, w, bias, wp, v, ut = (view.float() for view in (b, w, bias, wp, v, ut))
    out = torch.add(base, v, alpha=c)                # promotes 16-bit base to fp32
    if t.lowrank[slot]:
        if t.codes[slot] == 0:                       # linear: P is folded into W (slot_tables)
            s = torch.addmm(b, x, w)
        else:
            ap = torch.addmm(bias, x, wp)            # [A, 2R]
            s = _ACT_FNS[t.codes[slot]](ap[:, :t.max_rank]) - ap[:, t.max_rank:]
        out.addmm_(s, ut, alpha=c)
    if t.has_z[slot]:
        out.addcmul_(x, t.z[slot].float(), value=-c)
    return out


def _gathered(x: torch.Tensor, slots_np: np.ndarray, slots: torch.Tensor, t: SlotTables) -> torch.Tensor:
    """Rows in many slots: gather + bmm for few rows, embedding_bag otherwise."""
    A, d = x.shape
    R = t.max_rank
    codes = t.codes[slots_np]
    if A * R <= BGMV_MAX_ROWS_X_RANK:
        wp, uv = t.wp.index_select(0, slots).float(), t.uv.index_select(0, slots).float()
        ap = torch.baddbmm(wp[:, -1:], x[:, None], wp[:, :-1])                   # [A, 1, 2R]
        return torch.baddbmm(uv[:, -1:], _activate(ap[..., :R], codes) - ap[..., R:], uv[:, :-1])[:, 0]
    s32 = slots_np.astype(np.int32)
    idx = torch.from_numpy((s32[:, None] * (d + 1) + np.arange(d, dtype=np.int32)).ravel()).to(x.device)
    ap = F.embedding_bag(idx, t.wp.view(-1, 2 * R).float(), _offsets(A, d, x.device),
                         mode="sum", per_sample_weights=x.contiguous().view(-1))
    ap = ap + t.wp[:, -1].index_select(0, slots).float()                         # + [b, 0]
    s = F.pad(_activate(ap[:, :R], codes) - ap[:, R:], (0, 1), value=1.0)       # [s, 1]
    idx = torch.from_numpy((s32[:, None] * (R + 1) + np.arange(R + 1, dtype=np.int32)).ravel()).to(x.device)
    return F.embedding_bag(idx, t.uv.view(-1, d).float(), _offsets(A, R + 1, x.device),
                           mode="sum", per_sample_weights=s.view(-1))             # [A, d]


def _activate(a: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    """Apply each row's activation (codes per row of ``a``'s first dim)."""
    first = int(codes[0])
    if (codes == first).all():
        return a if first == 0 else _ACT_FNS[first](a)
    out = a
    for code in np.unique(codes).tolist():
        if code:
            mask = torch.from_numpy(codes == code).to(a.device).view(-1, *[1] * (a.dim() - 1))
            out = torch.where(mask, _ACT_FNS[code](a), out)
    return out


def _offsets(n: int, step: int, device) -> torch.Tensor:
    return torch.arange(0, n * step, step, dtype=torch.int32, device=device)
