"""The grouped CPU LoRA ops (``steer_serve.kernels.lora_ops``) equal vLLM's torch ops on random inputs.

vLLM's ops come from a fresh copy of their module (the plugin may have patched the imported one).
Their only intended difference: a row with LoRA index -1 contributes exactly zero, where vLLM's
ops read the last slot; the reference therefore gets those rows' inputs zeroed (what the engine's
-1 fix did before the ops were replaced).
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from steer_serve.kernels import lora_ops as grouped


@functools.cache
def vllm_ops():
    spec = importlib.util.spec_from_file_location(
        "pristine_vllm_lora_ops", importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops").origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def no_lora_zeroed(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.masked_fill((indices < 0)[:, None], 0)


INDEX_CASES = {
    "one slot": lambda n, slots, g: torch.full((n,), slots - 1),
    "all slots and -1": lambda n, slots, g: torch.randint(-1, slots, (n,), generator=g),
    "all slots, no -1": lambda n, slots, g: torch.arange(n) % slots,
    "only -1": lambda n, slots, g: torch.full((n,), -1),
    "one slot and -1": lambda n, slots, g: torch.where(torch.arange(n) % 3 == 0, -1, 0),
}


@pytest.mark.parametrize("case", INDEX_CASES)
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_slots", [(), (0,), (0, 1, 2)], ids=["no-zero-slot", "slot-0-zero", "all-zero"])
def test_bgmv_ops_equal_vllm(case, rows, dtype, zero_slots):
    """Slots whose weights are all zero (a module the adapter does not target) are skipped."""
    g = torch.Generator().manual_seed(rows)
    slots, rank, hidden, out = 3, 8, 48, 40
    idx = INDEX_CASES[case](rows, slots, g).long()
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    a = torch.randn(slots, 1, rank, hidden, generator=g).to(dtype)
    b = torch.randn(slots, 1, out, rank, generator=g).to(dtype)
    a[list(zero_slots)] = 0
    b[list(zero_slots)] = 0
    ref = vllm_ops()

    got, want = torch.full((rows, rank), 7.0), torch.full((rows, rank), 7.0)   # fp32 buffer, as vLLM's
    grouped.bgmv_shrink(x, a, got, idx, 0.5, fallback=None)
    ref.bgmv_shrink(no_lora_zeroed(x, idx), a, want, idx, 0.5)
    torch.testing.assert_close(got, want)

    h = torch.randn(rows, rank, generator=g)
    h0 = no_lora_zeroed(h, idx)
    for add in (True, False):
        base = torch.randn(rows, 3 * out, generator=g).to(dtype)
        got, want = base.clone(), base.clone()
        grouped.bgmv_expand_slice(h, b, got, idx, out, out, add, fallback=None)
        ref.bgmv_expand_slice(h0, b, want, idx, out, out, add)
        torch.testing.assert_close(got, want)
        for width in (out - 8, out + 8):       # the model's output narrower / wider than the adapter's
            base = torch.randn(rows, width, generator=g).to(dtype)
            got, want = base.clone(), base.clone()
            grouped.bgmv_expand(h, b, got, idx, add, fallback=None)
            ref.bgmv_expand(h0, b, want, idx, add)
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("add", [True, False])
def test_sgmv_ops_equal_vllm(add):
    """Prefill form: one LoRA index per sequence, sequences of different lengths, 3-dim weights."""
    g = torch.Generator().manual_seed(1)
    seq_idx, seq_len = torch.tensor([1, -1, 0, 1]), torch.tensor([5, 3, 1, 7])
    tokens, idx = int(seq_len.sum()), torch.repeat_interleave(seq_idx, seq_len)
    starts = torch.cumsum(seq_len, 0) - seq_len
    meta = (starts, seq_len, seq_idx, 4, int(seq_len.max()), tokens)
    x = torch.randn(tokens, 32, generator=g)
    a, b = torch.randn(2, 4, 32, generator=g), torch.randn(2, 24, 4, generator=g)
    ref = vllm_ops()

    got, want = torch.zeros(tokens, 4), torch.zeros(tokens, 4)
    grouped.sgmv_shrink(x, a, got, *meta, 2.0, fallback=None)
    ref.sgmv_shrink(no_lora_zeroed(x, idx), a, want, *meta, 2.0)
    torch.testing.assert_close(got, want)

    h = torch.randn(tokens, 4, generator=g)
    for op, args in (("sgmv_expand_slice", (24, 24, add)), ("sgmv_expand", (add,))):
        base = torch.randn(tokens, 48, generator=g)
        got, want = base.clone(), base.clone()
        getattr(grouped, op)(h, b, got, *meta, *args, fallback=None)
        getattr(ref, op)(no_lora_zeroed(h, idx), b, want, *meta, *args)
        torch.testing.assert_close(got, want)


def test_a_weight_written_in_place_is_read_again():
    """The live-slot summary of a weight tensor follows in-place writes (vLLM's set_lora / reset_lora)."""
    g = torch.Generator().manual_seed(3)
    x, idx = torch.randn(5, 16, generator=g), torch.tensor([0, 1, 1, 0, -1])
    a = torch.zeros(2, 1, 4, 16)
    ref = vllm_ops()
    for write in (lambda: None, lambda: a[1, 0, :2].copy_(torch.randn(2, 16, generator=g)),
                  lambda: a.__setitem__(1, 0), lambda: a[0].copy_(torch.randn(1, 4, 16, generator=g))):
        write()
        got, want = torch.full((5, 4), 3.0), torch.full((5, 4), 3.0)
        grouped.bgmv_shrink(x, a, got, idx, 1.0, fallback=None)
        ref.bgmv_shrink(no_lora_zeroed(x, idx), a, want, idx, 1.0)
        torch.testing.assert_close(got, want)


def test_unequal_row_counts_go_to_vllms_op():
    calls = []
    x, a, out = torch.randn(2, 8), torch.randn(1, 4, 8), torch.zeros(2, 4)
    grouped.bgmv_shrink(x, a, out, torch.zeros(3, dtype=torch.long), 1.0, fallback=lambda *args: calls.append(args))
    assert len(calls) == 1 and calls[0][0] is x and not out.any()


def test_plugin_patch_replaces_the_cpu_punica_ops():
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    from steer_serve.engine import vllm_internals

    vllm_internals.patch_cpu_lora_ops()
    vllm_internals.patch_cpu_lora_ops()                  # idempotent
    for name in vllm_internals.CPU_LORA_OPS:
        op = getattr(punica_cpu, name)
        assert op is getattr(lora_ops, name) and op.func is getattr(grouped, name), name
