"""steer_serve.kernels: torch path and Triton kernel against a per-token float64 reference.

The Triton cases run on CUDA when present; otherwise ``test_triton_under_interpreter`` reruns
them in a subprocess with ``TRITON_INTERPRET=1`` (triton reads it when a kernel is decorated, and
the setting must not leak into the rest of the test session). Interpreter shapes are tiny.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fixture_cases import cases
from steer_serve.interventions import apply_edit_lowrank, get_family
from steer_serve.interventions.base import LowRankEdit
import steer_serve.kernels as kernels
from steer_serve.kernels import ACT_CODES, SlotTables, StepPlan, apply_interventions, register_slot_tables
from steer_serve.kernels import torch_ops

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
D, R, S = 136, 5, 10  # d > 128 so the Triton kernel loops over two hidden chunks

_REF_ACTS = {
    "linear": lambda a: a,
    "relu": lambda a: a.clamp(min=0),
    "gelu": lambda a: 0.5 * a * (1 + torch.erf(a / math.sqrt(2))),
    "tanh": torch.tanh,
    "sigmoid": lambda a: 1 / (1 + torch.exp(-a)),
    "silu": lambda a: a / (1 + torch.exp(-a)),
}


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Selects the implementation through the dispatcher; yields the device to run on."""
    if request.param == "triton" and not HAS_CUDA and not IN_INTERPRETER:
        pytest.skip("Triton without CUDA runs in test_triton_under_interpreter")
    monkeypatch.setattr(kernels, "FORCED_BACKEND", request.param)
    return "cuda" if HAS_CUDA else "cpu"


def make_edits(d=D, r_max=R, seed=0) -> dict[int, LowRankEdit]:
    """Slot -> edit: every act code, ranks below the table rank, a z, a pure vector, a rank-0 slot."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    edits = {}
    for slot, act in enumerate(ACT_CODES, start=1):
        r = r_max if slot % 2 else 2
        edits[slot] = LowRankEdit(W=rnd(r, d), b=rnd(r), P=rnd(d, r), U=rnd(d, r), v=rnd(d), act=act)
    edits[2] = edits[2].replace(z=rnd(d))            # relu slot also zeroes/scales some dims
    edits[7] = LowRankEdit(v=rnd(d))                 # steering vector
    edits[8] = LowRankEdit(W=rnd(r_max, d), b=rnd(r_max), U=rnd(d, r_max), act="tanh")  # DiReFT-style, P=None
    edits[5] = edits[5].replace(renorm=True)         # rescaled to the base row's norm
    edits[9] = LowRankEdit(v=rnd(d) * 10, renorm=True)  # norm-preserving steering vector
    return edits


def make_tables(edits, d=D, r_max=R, num_slots=S, device="cpu") -> SlotTables:
    tables = SlotTables.allocate(num_slots, r_max, d, device)
    for slot, edit in edits.items():
        tables.write(slot, edit)
    return tables


def reference(x, slots, coef, edits, out_base=None):
    """The formula, token by token, in float64 (independent of the kernels' table layout)."""
    base = x if out_base is None else out_base
    out = base.clone()
    for t in range(x.shape[0]):
        edit, c = edits.get(int(slots[t])), float(coef[t])
        if edit is None or c == 0:
            continue
        h, d, r = x[t].double(), x.shape[1], edit.rank
        f = lambda val, shape: torch.zeros(shape, dtype=torch.float64) if val is None else val.double()  # noqa: E731
        a = _REF_ACTS[edit.act](h @ f(edit.W, (r, d)).T + f(edit.b, (r,)))
        delta = (a - h @ f(edit.P, (d, r))) @ f(edit.U, (d, r)).T + f(edit.v, (d,)) - h * f(edit.z, (d,))
        new = base[t].double() + c * delta
        if edit.renorm and new.norm() > 0:
            new = new * base[t].double().norm() / new.norm()
        out[t] = new.to(base.dtype)
    return out


def batch(T, device, dtype=torch.float32, seed=1, all_active=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    slots = torch.randint(1 if all_active else 0, S, (T,), generator=g, dtype=torch.int32)
    slots[T // 4: T // 2] = 3                         # a run, like a prefill segment
    coef = torch.rand(T, generator=g) + 0.5
    if not all_active:
        coef[::5] = 0.0
    return x.to(device), slots.to(device), coef.to(device)


def assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-4, atol=1e-4)
    else:  # 16-bit outputs: at most a couple of units in the last place apart
        eps = torch.finfo(ref.dtype).eps
        torch.testing.assert_close(out.cpu().float(), ref.cpu().float(), rtol=2 * eps, atol=2 * eps)


def assert_rows_bit_exact(out, base, rows):
    bits = {2: torch.int16, 4: torch.int32}[base.element_size()]
    assert torch.equal(out[rows].view(bits), base[rows].view(bits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,all_active", [(1, True), (37, False), (37, True)])
def test_matches_reference(backend, dtype, T, all_active):
    edits = make_edits()
    x, slots, coef = batch(T, backend, dtype, all_active=all_active)
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))
    inactive = ((slots == 0) | (coef == 0)).cpu()
    assert_rows_bit_exact(out.cpu(), x.cpu(), inactive)


def test_matches_interventions_reference(backend):
    """Each slot equals ``apply_edit_lowrank`` from the interventions package on its own rows."""
    edits = make_edits()
    x, slots, coef = batch(37, backend, all_active=True)
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend)).cpu()
    for slot, edit in edits.items():
        rows = (slots.cpu() == slot).nonzero()[:, 0]
        for t in rows.tolist():
            want = apply_edit_lowrank(x[t:t + 1].cpu(), edit, coef=float(coef[t]))
            torch.testing.assert_close(out[t:t + 1], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width", [64, 576])
def test_recorded_library_cases_in_one_batch(backend, width):
    """Every recorded fp32 pyreft/pyvene case of one width, via its family's low-rank form, in one
    shuffled batch (one slot each) reproduces the library's own recorded outputs."""
    recorded = [c for c in cases() if not c.per_head and all(d == "float32" for d in c.meta["dtypes"].values())]
    recorded = [(c, c.io()) for c in recorded if c.io()["h"].shape[-1] == width]
    edits = {slot: get_family(c.family).to_lowrank(c.params(), c.config) for slot, (c, _) in enumerate(recorded, 1)}
    tables = make_tables(edits, d=width, r_max=max(e.rank for e in edits.values()), num_slots=len(edits) + 1,
                         device=backend)
    h = torch.cat([io["h"] for _, io in recorded])
    want = torch.cat([io["out"] for _, io in recorded])
    slots = torch.cat([torch.full((len(io["h"]),), slot) for slot, (_, io) in enumerate(recorded, 1)])
    perm = torch.randperm(len(h), generator=torch.Generator().manual_seed(0))
    out = apply_interventions(h[perm].to(backend), slots[perm].to(backend), torch.ones(len(h), device=backend), tables)
    torch.testing.assert_close(out.cpu(), want[perm], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", list(ACT_CODES))
def test_every_act_code_alone(backend, act):
    """A batch where all rows share one activation (the torch path's uniform fast path)."""
    edits = {4: make_edits()[1].replace(act=act)}
    x, _, coef = batch(20, backend, all_active=True)
    slots = torch.full((20,), 4, dtype=torch.int64, device=backend)
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))


@pytest.mark.parametrize("slot", [5, 9])
def test_renorm_slot_alone(backend, slot):
    """A renorm slot on every row (the torch path's uniform case): rows keep their norm."""
    edits = make_edits()
    x, _, coef = batch(20, backend, all_active=True)
    slots = torch.full((20,), slot, dtype=torch.int64, device=backend)
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))
    torch.testing.assert_close(out.norm(dim=1).cpu(), x.norm(dim=1).cpu())
    assert (out - x).abs().max() > 0.1


def test_slots_present_but_unused(backend):
    """Many written slots, a batch that uses only two of them."""
    edits = make_edits()
    x, _, coef = batch(19, backend)
    slots = torch.tensor([5, 1] * 9 + [5], dtype=torch.int32, device=backend)
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_slot_zero_is_bit_exact_copy(backend, dtype):
    x, _, coef = batch(23, backend, dtype)
    x[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), -float("inf")])
    slots = torch.zeros(23, dtype=torch.int64, device=backend)
    out = apply_interventions(x, slots, coef, make_tables(make_edits(), device=backend))
    assert out.data_ptr() != x.data_ptr()
    assert_rows_bit_exact(out.cpu(), x.cpu(), slice(None))


def test_coef_zero_rows_bit_exact(backend):
    """coef 0 on an edited slot leaves the row untouched, even -0.0 and non-finite values."""
    x, slots, coef = batch(21, backend, all_active=True)
    coef[::3] = 0.0
    x[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), -0.0])
    out = apply_interventions(x, slots, coef, make_tables(make_edits(), device=backend))
    assert_rows_bit_exact(out.cpu(), x.cpu(), (coef == 0).cpu())
    assert not torch.equal(out[1].cpu(), x[1].cpu())


def test_noncontiguous_x(backend):
    edits = make_edits()
    wide, slots, coef = batch(29, backend)
    x = torch.cat([wide, wide], dim=1)[:, ::2]                  # stride (2D, 2)
    assert not x.is_contiguous()
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))
    xt = wide.t().contiguous().t()                               # column-major
    out = apply_interventions(xt, slots, coef, make_tables(edits, device=backend))
    assert_close(out, reference(xt.cpu(), slots.cpu(), coef.cpu(), edits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_base(backend, dtype):
    """The edit reads x = hidden + residual and is added into hidden."""
    edits = make_edits()
    hidden, slots, coef = batch(26, backend, dtype)
    residual = batch(26, backend, dtype, seed=7)[0]
    x = hidden + residual
    out = apply_interventions(x, slots, coef, make_tables(edits, device=backend), out_base=hidden)
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits, out_base=hidden.cpu()))
    assert_rows_bit_exact(out.cpu(), hidden.cpu(), ((slots == 0) | (coef == 0)).cpu())


def test_large_rank_odd_hidden(backend):
    """Rank 33 pads to 64 (the Triton kernel's narrower hidden chunks), hidden 72 is not a power of two."""
    d, r = 72, 33
    edits = {slot: e for slot, e in make_edits(d=d, r_max=r, seed=3).items() if slot in (1, 4, 8)}
    g = torch.Generator().manual_seed(4)
    x = torch.randn(18, d, generator=g).to(backend)
    slots = torch.tensor([1, 4, 8, 0] * 4 + [4, 4], device=backend)
    coef = torch.full((18,), 0.7, device=backend)
    out = apply_interventions(x, slots, coef, make_tables(edits, d=d, r_max=r, num_slots=9, device=backend))
    assert_close(out, reference(x.cpu(), slots.cpu(), coef.cpu(), edits))


def column_batch(T, columns, device, seed=11):
    """``[columns, T]`` slots/coefs laid out like the engine's: contiguous runs, masked rows, an
    all-zero column and a column of one slot and one coef (the torch path's uniform case)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, S, (columns, T), generator=g)
    slots[:, T // 3: 2 * T // 3] = torch.randint(1, S, (columns, 1), generator=g)
    coef = torch.rand(columns, T, generator=g) + 0.25
    coef[:, ::4] = 0.0
    if columns > 1:
        slots[1], coef[1] = 0, 0.0
    if columns > 2:
        slots[2], coef[2] = 5, 0.8
    return slots.to(device), coef.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,columns", [(1, 1), (1, 3), (23, 2), (37, 4)])
def test_columns_in_one_call_equal_sequential_calls(backend, dtype, T, columns):
    """One call with ``[columns, T]`` equals one call per column, each on the previous result, bit
    for bit (the torch path with and without the engine's plan); fp32 also matches the reference
    chained column by column (16-bit roundings compound over columns, so only fp32 is compared)."""
    edits = make_edits()
    tables = make_tables(edits, device=backend)
    x = batch(T, backend, dtype)[0]
    hidden = batch(T, backend, dtype, seed=5)[0]
    slots, coef = column_batch(T, columns, backend)
    for out_base in (None, hidden):
        want = apply_interventions(x, slots[0], coef[0], tables, out_base=out_base)
        for m in range(1, columns):
            want = apply_interventions(want, slots[m], coef[m], tables)
        got = apply_interventions(x, slots, coef, tables, out_base=out_base)
        planned = apply_interventions(x, slots, coef, tables, out_base=out_base, plan=StepPlan.of(slots, coef))
        assert torch.equal(got, want) and torch.equal(planned, want)
        if dtype == torch.float32:
            ref = reference(x.cpu(), slots[0].cpu(), coef[0].cpu(), edits,
                            out_base=None if out_base is None else hidden.cpu())
            for m in range(1, columns):
                ref = reference(ref, slots[m].cpu(), coef[m].cpu(), edits)
            assert_close(got, ref)
        untouched = ((slots == 0) | (coef == 0)).all(0).cpu()
        assert_rows_bit_exact(got.cpu(), (x if out_base is None else hidden).cpu(), untouched)
        assert got.data_ptr() not in (x.data_ptr(), hidden.data_ptr())


def test_all_zero_columns_copy_the_base(backend):
    """A step whose every column is all-zero (``always_active`` with nothing scheduled) returns a copy."""
    x, _, _ = batch(19, backend)
    slots = torch.zeros(4, 19, dtype=torch.int64, device=backend)
    out = apply_interventions(x, slots, torch.zeros(4, 19, device=backend), make_tables(make_edits(), device=backend))
    assert out.data_ptr() != x.data_ptr()
    assert_rows_bit_exact(out.cpu(), x.cpu(), slice(None))


@pytest.mark.parametrize("bgmv_limit", [10 ** 6, 0], ids=["gather-bmm", "embedding-bag"])
def test_torch_strategies(monkeypatch, bgmv_limit):
    """Each strategy of the torch path (normally chosen by size) matches the reference."""
    edits = make_edits()
    x, slots, coef = batch(37, "cpu")
    monkeypatch.setattr(torch_ops, "BGMV_MAX_ROWS_X_RANK", bgmv_limit)
    out = torch_ops.apply_torch(x, slots[None], coef[None], make_tables(edits))
    assert_close(out, reference(x, slots, coef, edits))


@pytest.mark.skipif(IN_INTERPRETER or HAS_CUDA, reason="this process already runs the Triton cases")
def test_triton_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "triton and not under_interpreter"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


# -- slot tables -------------------------------------------------------------------------------

def test_write_pads_rank_and_fills_views():
    edits = make_edits()
    tables = make_tables(edits)
    assert (tables.W.shape, tables.b.shape, tables.P.shape, tables.U.shape, tables.v.shape, tables.z.shape) == (
        (S, R, D), (S, R), (S, D, R), (S, D, R), (S, D), (S, D))
    e = edits[2]                                     # rank 2 in a rank-5 table
    assert torch.equal(tables.W[2, :2], e.W) and not tables.W[2, 2:].any()
    assert torch.equal(tables.P[2, :, :2], e.P) and not tables.P[2, :, 2:].any()
    assert torch.equal(tables.U[2, :, :2], e.U) and torch.equal(tables.v[2], e.v) and torch.equal(tables.z[2], e.z)
    assert not tables.P[8].any() and not tables.z[1].any()          # None -> zeros
    lin = edits[1]                                   # linear slots store W − Pᵀ and P = 0
    torch.testing.assert_close(tables.W[1], lin.W - lin.P.T)
    assert not tables.P[1].any()
    assert [int(a) for a in tables.act[1:7]] == list(range(6))
    for field in ("wp", "uv", "z", "act"):
        assert not getattr(tables, field)[0].any()
    tables.clear(2)
    assert not tables.wp[2].any() and not tables.uv[2].any() and not tables.z[2].any()
    assert not tables.used[2] and tables.used[3]


def test_write_overwrites_previous_edit_completely():
    tables = make_tables(make_edits())
    tables.write(1, LowRankEdit(v=torch.ones(D)))
    assert not tables.W[1].any() and not tables.U[1].any() and tables.act[1] == 0 and not tables.lowrank[1]


@pytest.mark.parametrize("slot,edit,match", [
    (0, LowRankEdit(v=torch.ones(D)), "slot 0"),
    (S, LowRankEdit(v=torch.ones(D)), "not writable"),
    (1, LowRankEdit(W=torch.ones(R + 1, D)), "exceeds the table rank"),
    (1, LowRankEdit(v=torch.ones(D + 1)), "edit.v has shape"),
    (1, LowRankEdit(W=torch.ones(2, D), P=torch.ones(D, 3)), "edit.P has shape"),
    (1, LowRankEdit(v=torch.ones(D), act="gelu_new"), "unknown activation"),
])
def test_write_rejects(slot, edit, match):
    tables = make_tables({})
    with pytest.raises(ValueError, match=match):
        tables.write(slot, edit)
    assert not tables.wp.any() and not tables.uv.any()


def test_clear_slot_zero_rejected():
    with pytest.raises(ValueError, match="slot 0"):
        make_tables({}).clear(0)


def test_register_slot_tables_buffers():
    module = torch.nn.Module()
    tables = register_slot_tables(module, "steer_x", S, R, D)
    assert {n for n, _ in module.named_buffers()} == {f"steer_x_{n}" for n in ("wp", "uv", "z", "act", "renorm")}
    assert module.state_dict() == {}
    tables.write(3, make_edits()[3])
    tables.write(5, make_edits()[5])
    again = SlotTables.from_buffers(module, "steer_x")
    assert again.renorms[5] and not again.renorms[3]
    assert again.wp.data_ptr() == module.steer_x_wp.data_ptr()
    assert again.used[3] and again.lowrank[3] and again.codes[3] == ACT_CODES["gelu"] and not again.used[4]
