"""Faster exact CPU versions of vLLM's torch LoRA ops (``vllm/lora/ops/torch_ops/lora_ops.py``).

vLLM's CPU punica wrapper calls ``bgmv_*`` (decode) and ``sgmv_*`` (prefill) ops that gather every
token's whole adapter matrix (``weights[indices]``, ``[tokens, out, in]``) and contract it with an
einsum: per token a matrix copy and a tiny batched GEMM, on every LoRA-wrapped linear of every
layer. Profiled at batch 16 on the default model (2-core CPU, torch profiler): that gather
(``aten::index``) took 40 % of the step and the einsum's ``bmm`` 22 %, against 18 % for the
model's own GEMMs. Here the tokens are grouped by LoRA slot instead, one GEMM per distinct slot
present (usually one or two), and rows with index -1 ("no LoRA") contribute exactly zero (vLLM's
GPU kernels skip them; its torch ops would read the last slot). vLLM wraps every linear the model
has, so most wrapped modules hold only zeros for a given adapter (one that targets q and v leaves
k, o, gate, up and down at zero): a slot whose weights are all zero is skipped (its product is
exactly zero), known from a per-tensor summary refreshed when the tensor is written.

The functions keep vLLM's signatures and semantics: weights and inputs cast to the output dtype,
the product in that dtype, ``shrink`` writes ``scaling · x Aᵀ`` into the first ``r`` columns,
``expand`` writes or adds ``x Bᵀ`` into the first ``min(out, width)`` columns, ``expand_slice``
into ``[slice_offset, slice_offset + slice_size)``. Calls with unequal row counts (a broadcast
that vLLM's einsum allows) go to vLLM's own op.
"""
from __future__ import annotations

import weakref

import torch

#: ``id(weights) -> (weakref, version, live slots)``: :func:`_live_slots`' summaries, dropped with their tensor
_LIVE_SLOTS: dict[int, tuple[weakref.ref, int, list[bool]]] = {}


def _live_slots(weights: torch.Tensor) -> list[bool]:
    """Per slot of a stacked LoRA weight (``[slots, ...]``), whether it holds any non-zero value. Cached per
    tensor until it is written (every in-place write, also through a view, bumps its version counter)."""
    key = id(weights)
    try:
        version = weights._version
    except RuntimeError:                               # an inference tensor tracks no version: read it each time
        return weights.flatten(1).ne(0).any(1).tolist()
    cached = _LIVE_SLOTS.get(key)
    if cached is not None and cached[0]() is weights and cached[1] == version:
        return cached[2]
    live = weights.flatten(1).ne(0).any(1).tolist()
    _LIVE_SLOTS[key] = (weakref.ref(weights, lambda _, key=key: _LIVE_SLOTS.pop(key, None)), version, live)
    return live


def _slot_groups(indices: torch.Tensor, num_slots: int) -> list[tuple[int, torch.Tensor | None]]:
    """``(slot, rows)`` for every slot present in ``indices``; rows None when the slot has every row.
    Index -1 rows are in no group."""
    counts = torch.bincount(indices + 1, minlength=num_slots + 1).tolist()
    present = [(slot - 1, n) for slot, n in enumerate(counts) if n and slot]
    if len(present) == 1 and present[0][1] == indices.shape[0]:
        return [(present[0][0], None)]
    order = torch.argsort(indices, stable=True)        # -1 rows first, then slot by slot
    groups, start = [], counts[0]
    for slot, n in present:
        groups.append((slot, order[start:start + n]))
        start += n
    return groups


def _lora_product(out: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  live: list[bool], add: bool, scaling: float = 1.0) -> None:
    """``out[t] (+)= scaling · inputs[t] @ weights[indices[t]]ᵀ`` for every row ``t``; a row with index
    -1 or in a slot that is not ``live`` (all zeros) gets 0 (or keeps its value when adding).
    ``weights``: ``[slots, width, in]`` (or with a size-1 dim 1), ``out``: ``[rows, width]``, a view
    that may be strided."""
    groups = [(slot, rows) for slot, rows in _slot_groups(indices, weights.shape[0]) if live[slot]] \
        if any(live) else []
    if not add and not (len(groups) == 1 and groups[0][1] is None):
        out.zero_()                                      # the rows no group writes
    if not groups:
        return
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(out.dtype)
    for slot, rows in groups:
        w = weights[slot].to(out.dtype)
        part = (x if rows is None else x.index_select(0, rows)) @ w.t()   # rounded to the dtype, as vLLM's
        if scaling != 1.0:
            part.mul_(scaling)
        if rows is None:
            if add:
                out.add_(part)
            else:
                out.copy_(part)
        elif add:
            out.index_add_(0, rows, part)
        else:
            out.index_copy_(0, rows, part)


def _same_rows(*tensors: torch.Tensor) -> bool:
    return len({t.shape[0] for t in tensors}) == 1


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0, *, fallback):
    """``output[:, :r] = scaling · inputs @ A[slot]ᵀ`` per row. ``fallback`` (each op's): vLLM's bgmv op of
    the same kind, for calls with unequal row counts."""
    if not _same_rows(inputs, output_tensor, lora_indices_tensor):
        return fallback(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    rank = lora_a_weights.shape[-2]
    _lora_product(output_tensor[:, :rank], inputs, lora_a_weights, lora_indices_tensor, _live_slots(lora_a_weights),
                  add=False, scaling=scaling)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True, *, fallback):
    """``output[:, :w] (+)= inputs @ B[slot]ᵀ`` per row, ``w`` the narrower of the two widths."""
    if not _same_rows(inputs, output_tensor, lora_indices_tensor):
        return fallback(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])   # adapter and model may pad differently
    _lora_product(output_tensor[:, :width], inputs, lora_b_weights[..., :width, :], lora_indices_tensor,
                  _live_slots(lora_b_weights), add=add_inputs)


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True, *, fallback):
    """``output[:, slice_offset:slice_offset + slice_size] (+)= inputs @ B[slot]ᵀ`` per row."""
    if not _same_rows(inputs, output_tensor, lora_indices_tensor) or lora_b_weights.shape[-2] != slice_size:
        return fallback(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                        add_inputs)
    _lora_product(output_tensor[:, slice_offset:slice_offset + slice_size], inputs, lora_b_weights,
                  lora_indices_tensor, _live_slots(lora_b_weights), add=add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The prefill (sgmv) ops' one index per sequence, as one per token."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling, *, fallback):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling,
                fallback=fallback)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs: bool = False, *, fallback):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs,
                fallback=fallback)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs: bool = False, *,
                      fallback):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs, fallback=fallback)
