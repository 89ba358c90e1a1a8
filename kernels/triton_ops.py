"""Triton kernel of :func:`steer_serve.kernels.apply_interventions`: one launch per column.

Column 0 writes ``out`` from the base; every further column edits ``out`` in place (rows are
disjoint between programs and each program reads a row before it writes it). A tile whose rows
all have slot 0 or coef 0 in a column exits before any weight is read: in column 0 one program
copies the tile's base rows, in later columns nothing runs at all. Under CUDA graphs
(``always_active``) every column is launched every step, so an all-zero step then costs one copy
of ``x`` plus near-empty launches.

Tiling: tiles of ``BLOCK_M = 16`` *consecutive* tokens, and one program per distinct slot inside
a tile (grid ``(cdiv(T, 16), 16)``; programs whose tile has fewer distinct slots exit at once).
A program loads its slot's weights once and applies them to all rows of that slot in the tile
with ``tl.dot``; rows with slot 0 are copied by the slot-0 program, rows with coef 0 are written
back from the base unchanged. Every row is stored exactly once.

Why this and not the alternatives (no GPU was available to time them; the choice rests on bytes
moved and launch count, and on how the engine lays tokens out):

* BGMV (one program per token) re-reads a slot's ``((d+1)·2R + (R+1)·d)·4`` bytes of weights for
  every token: 803 kB at d=4096, R=16, against 16 kB of bf16 row in + out. A 512-token prefill
  segment of one slot then moves ~50x more weight bytes (from L2) than activation bytes from DRAM,
  so it cannot approach the memory roofline.
* SGMV over tokens *sorted* by slot (vLLM's punica path) needs a sort, per-slot counts and a
  cumsum before the kernel: 3-5 extra launches per call, and its grid either depends on the
  number of active slots (a host sync, not graph-capturable) or spans all S slots.
* The engine already flattens tokens request by request, so slot runs are contiguous: prefill
  tiles almost always hold one slot (weights read once per 16 tokens, like SGMV) and decode tiles
  hold up to 16 slots (one program each, which is BGMV). Identical slots next to each other in a
  decode batch share one weight read. No metadata, no sync, a grid that depends only on ``T``.
  Weight traffic per token is the slot's table / 16 (50 kB in the example above, from L2).

Per program the hidden row is streamed in ``BLOCK_D`` chunks twice: the shrink pass reduces
``[x, 1]·[Wᵀ|P; b|0]`` over d, the expand pass writes ``base + coef·(s·[U; v] − x ⊙ z)``. The
second read of a chunk is served from L1/L2 (a program's tile is at most 16·d elements), so each
row crosses DRAM once in and once out. Accumulation is fp32; fp32 inputs use IEEE fp32 dots,
16-bit inputs use TF32 (their mantissas fit in TF32 exactly, only the fp32 weights are rounded).
Block sizes are not tuned on hardware: ``BLOCK_M`` trades weight reuse (L2 traffic) against the
number of programs when one slot covers the whole batch; time it with ``benchmarks/kernel_bench.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .slot_tables import SlotTables

BLOCK_M = 16


@triton.jit
def _act(a, code):
    e = tl.exp(-2.0 * tl.abs(a))
    tanh = tl.where(a < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)
    sig = tl.sigmoid(a)
    y = tl.where(code == 1, tl.maximum(a, 0.0), a)
    y = tl.where(code == 2, 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476)), y)
    y = tl.where(code == 3, tanh, y)
    y = tl.where(code == 4, sig, y)
    return tl.where(code == 5, a * sig, y)


@triton.jit
def _edited(x_rows, b_rows, uv, z_ptr, slot, s, coef, rows, offs_d, offs_r, in_r, D, R, sxd, sbd,
            PRECISION: tl.constexpr):
    """One hidden chunk of the tile's rows: ``(base, base + coef·(s Uᵀ + v − x ⊙ z))``, the second in fp32."""
    in_d = offs_d < D
    m = rows[:, None] & in_d[None, :]
    uk = tl.load(uv + offs_r[:, None] * D + offs_d[None, :], mask=in_r[:, None] & in_d[None, :],
                 other=0.0).to(tl.float32)
    vk = tl.load(uv + R * D + offs_d, mask=in_d, other=0.0).to(tl.float32)
    zk = tl.load(z_ptr + slot * D + offs_d, mask=in_d, other=0.0).to(tl.float32)
    xk = tl.load(x_rows + offs_d[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
    base = tl.load(b_rows + offs_d[None, :] * sbd, mask=m)
    delta = tl.dot(s, uk, input_precision=PRECISION) + vk[None, :] - xk * zk[None, :]
    return base, base.to(tl.float32) + coef[:, None] * delta


@triton.jit
def _apply(x_ptr, base_ptr, out_ptr, slots_ptr, coef_ptr, wp_ptr, uv_ptr, z_ptr, act_ptr, renorm_ptr,
           T, D, R, sxm, sxd, sbm, sbd,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
           PRECISION: tl.constexpr, IN_PLACE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_t = offs_m < T
    tile = tl.load(slots_ptr + offs_m, mask=in_t, other=-1).to(tl.int64)
    rm = offs_m.to(tl.int64)
    b_rows = base_ptr + rm[:, None] * sbm
    o_rows = out_ptr + rm[:, None] * D

    # Early exit: no row of the tile is edited in this column.
    tile_coef = tl.load(coef_ptr + offs_m, mask=in_t, other=0.0)
    if tl.sum((in_t & (tile > 0) & (tile_coef != 0.0)).to(tl.int32), axis=0) == 0:
        if not IN_PLACE:
            if pid_g == 0:
                for k in range(0, D, BLOCK_D):
                    offs_d = k + tl.arange(0, BLOCK_D)
                    m = in_t[:, None] & (offs_d < D)[None, :]
                    tl.store(o_rows + offs_d[None, :], tl.load(b_rows + offs_d[None, :] * sbd, mask=m), mask=m)
        return

    # The pid_g-th distinct slot of the tile, by first occurrence.
    idx = tl.arange(0, BLOCK_M)
    seen = (tile[:, None] == tile[None, :]) & (idx[None, :] < idx[:, None])
    first = (tl.max(seen.to(tl.int32), axis=1) == 0) & in_t
    group = tl.cumsum(first.to(tl.int32), axis=0) - 1
    pick = first & (group == pid_g)
    if tl.sum(pick.to(tl.int32), axis=0) == 0:
        return
    slot = tl.sum(tl.where(pick, tile, 0), axis=0)
    rows = (tile == slot) & in_t
    coef = tl.load(coef_ptr + offs_m, mask=rows, other=0.0).to(tl.float32)
    live = rows & (coef != 0.0)
    if IN_PLACE:
        if tl.sum(live.to(tl.int32), axis=0) == 0:
            return

    x_rows = x_ptr + rm[:, None] * sxm
    offs_r = tl.arange(0, R_PAD)
    in_r = offs_r < R
    wp = wp_ptr + slot * (D + 1) * 2 * R
    uv = uv_ptr + slot * (R + 1) * D

    if slot == 0:
        if IN_PLACE:
            return
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            m = rows[:, None] & (offs_d < D)[None, :]
            base = tl.load(b_rows + offs_d[None, :] * sbd, mask=m)
            tl.store(o_rows + offs_d[None, :], base, mask=m)
        return

    # Shrink: a = x Wᵀ + b, p = x P (fp32 accumulators).
    acc_a = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        xk = tl.load(x_rows + offs_d[None, :] * sxd, mask=live[:, None] & in_d[None, :], other=0.0)
        xk = xk.to(tl.float32)
        w_ptrs = wp + offs_d[:, None] * 2 * R + offs_r[None, :]
        wm = in_d[:, None] & in_r[None, :]
        wk = tl.load(w_ptrs, mask=wm, other=0.0).to(tl.float32)
        pk = tl.load(w_ptrs + R, mask=wm, other=0.0).to(tl.float32)
        acc_a = tl.dot(xk, wk, acc_a, input_precision=PRECISION)
        acc_p = tl.dot(xk, pk, acc_p, input_precision=PRECISION)
    bias = tl.load(wp + D * 2 * R + offs_r, mask=in_r, other=0.0).to(tl.float32)
    code = tl.load(act_ptr + slot)
    s = _act(acc_a + bias[None, :], code) - acc_p

    # Expand: out = base + coef * (s Uᵀ + v - x z) on live rows, base elsewhere. A renorm slot first
    # sums the squares of base and new rows (storing nothing, so an in-place base stays intact), then
    # recomputes each chunk and stores it rescaled by ‖base‖ / ‖new‖.
    renorm = tl.load(renorm_ptr + slot) != 0
    base_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    new_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        m = rows[:, None] & (offs_d < D)[None, :]
        base, new = _edited(x_rows, b_rows, uv, z_ptr, slot, s, coef, rows, offs_d, offs_r, in_r, D, R, sxd, sbd,
                            PRECISION)
        if renorm:
            b32 = tl.where(m, base.to(tl.float32), 0.0)
            n32 = tl.where(m, new, 0.0)
            base_sq += tl.sum(b32 * b32, axis=1)
            new_sq += tl.sum(n32 * n32, axis=1)
        else:
            tl.store(o_rows + offs_d[None, :], tl.where(live[:, None], new.to(base.dtype), base), mask=m)
    if renorm:
        scale = tl.where(new_sq > 0.0, tl.sqrt(base_sq / tl.where(new_sq > 0.0, new_sq, 1.0)), 1.0)
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            m = rows[:, None] & (offs_d < D)[None, :]
            base, new = _edited(x_rows, b_rows, uv, z_ptr, slot, s, coef, rows, offs_d, offs_r, in_r, D, R, sxd,
                                sbd, PRECISION)
            new = (new * scale[:, None]).to(base.dtype)
            tl.store(o_rows + offs_d[None, :], tl.where(live[:, None], new, base), mask=m)


def apply_triton(x: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor, tables: SlotTables,
                 out_base: torch.Tensor | None = None) -> torch.Tensor:
    """``slots``/``coef``: ``[columns, T]``, applied in column order (one launch each)."""
    base = x if out_base is None else out_base
    T, D = x.shape
    R = tables.max_rank
    if not (tables.wp.is_contiguous() and tables.uv.is_contiguous() and tables.z.is_contiguous()):
        raise ValueError("slot tables must be contiguous (use SlotTables.allocate / register_slot_tables)")
    out = torch.empty((T, D), dtype=base.dtype, device=base.device)
    if T == 0:
        return out
    r_pad = max(16, triton.next_power_of_2(R))
    grid = (triton.cdiv(T, BLOCK_M), BLOCK_M)
    for column in range(slots.shape[0]):
        src, src_base = (x, base) if column == 0 else (out, out)
        _apply[grid](
            src, src_base, out, slots[column].contiguous(), coef[column].contiguous(),
            tables.wp, tables.uv, tables.z, tables.act, tables.renorm,
            T, D, R, src.stride(0), src.stride(1), src_base.stride(0), src_base.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_D=128 if r_pad <= 32 else 64, R_PAD=r_pad,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", IN_PLACE=column > 0,
        )
    if slots.shape[0] == 0:
        out.copy_(base)
    return out
