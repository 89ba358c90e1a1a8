"""The per-step token → (slot, coef) fill, without vLLM: chunking, phases, columns, stale tails, and the
vectorised fill against a per-request reference over random batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_serve.engine.config import RequestSteering, SteerConfig
from steer_serve.engine.step_state import StepState
from steer_serve.interventions.positions import NO_POSITIONS, parse_positions, position_spans


def make_state(max_tokens: int = 32, columns: int = 2) -> StepState:
    config = SteerConfig(num_slots=4, max_rank=2, max_columns=columns)
    return StepState(config, torch.zeros(columns, max_tokens, dtype=torch.int64),
                     torch.zeros(columns, max_tokens, dtype=torch.float32))


def args_for(table: dict):
    return lambda req_id: table[req_id]


def test_window_positions_are_absolute_across_chunks():
    """A 10-token prompt with l1 split 4+4+2 edits only absolute position 9, in the last chunk."""
    state = make_state()
    extra = {"a": RequestSteering([2], [0.5], ["f1+l1"]).to_extra_args()}
    seen = []
    for computed, n in ((0, 4), (4, 4), (8, 2)):
        state.prepare(["a"], np.array([n]), np.array([computed]), np.array([10]), args_for(extra))
        seen += state.slots[0, :n].tolist()
        assert state.coef[0, :n].tolist() == [0.5 if s else 0.0 for s in state.slots[0, :n].tolist()]
    assert seen == [2] + [0] * 8 + [2]
    # decode steps after the prompt: window positions never apply again
    state.prepare(["a"], np.array([1]), np.array([10]), np.array([10]), args_for(extra))
    assert state.num_columns == 0 and state.active_sites == set()


def test_phases_columns_and_requests_without_steering():
    state = make_state()
    state.set_slot_sites(1, [(3, "block_output")])
    state.set_slot_sites(3, [(5, "mlp_output")])
    extra = {"gen": RequestSteering([1], [1.0], ["generated"]).to_extra_args(),
             "two": RequestSteering([1, 3], [1.0, 2.0], ["prompt", "all"]).to_extra_args(),
             "none": None}
    # gen: decode token at position 6 (prompt 6); two: prompt chunk 0..2 of 5; none: 2 prompt tokens
    state.prepare(["gen", "two", "none"], np.array([1, 3, 2]), np.array([6, 0, 0]), np.array([6, 5, 2]),
                  args_for(extra))
    assert state.num_columns == 2
    assert state.slots[0, :6].tolist() == [1, 1, 1, 1, 0, 0]
    assert state.slots[1, :6].tolist() == [0, 3, 3, 3, 0, 0]
    assert state.coef[1, :6].tolist() == [0, 2, 2, 2, 0, 0]
    assert state.active_sites == {(3, "block_output"), (5, "mlp_output")}


def test_stale_tail_of_a_longer_previous_step_is_cleared():
    state = make_state()
    extra = {"a": RequestSteering([2], [1.0], ["all"]).to_extra_args(), "b": None}
    state.prepare(["a"], np.array([8]), np.array([0]), np.array([8]), args_for(extra))
    assert state.slots[0, :8].tolist() == [2] * 8
    state.prepare(["b"], np.array([3]), np.array([0]), np.array([3]), args_for(extra))
    assert state.num_columns == 0
    assert state.slots.abs().sum() == 0 and state.coef.abs().sum() == 0


def reference_fill(steering: dict, req_ids, num_scheduled, num_computed, num_prompt, max_columns, max_tokens):
    """The spec: request by request, column by column, ``Positions.mask`` over the chunk's positions."""
    slots = np.zeros((max_columns, max_tokens), dtype=np.int64)
    coef = np.zeros((max_columns, max_tokens), dtype=np.float32)
    columns, present, offset = 0, set(), 0
    for req_id, n, computed, prompt in zip(req_ids, num_scheduled, num_computed, num_prompt):
        request = steering[req_id]
        if request is not None:
            prompt = prompt if request.prompt_len is None else request.prompt_len
            positions = np.arange(computed, computed + n)
            for m, (slot, scale, spec) in enumerate(zip(request.slots, request.scales, request.positions)):
                mask = parse_positions(spec).mask(positions, prompt)
                if mask.any():
                    slots[m, offset:offset + n] = np.where(mask, slot, 0)
                    coef[m, offset:offset + n] = np.where(mask, scale, 0.0)
                    columns, present = max(columns, m + 1), present | {slot}
        offset += n
    return slots, coef, columns, present


def random_spec(rng) -> str:
    kind = rng.choice(["f", "l", "f+l", "prompt", "generated", "all", "index", "slice", "steps"])
    if kind in ("prompt", "generated", "all"):
        return kind
    a, b = (int(x) for x in rng.integers(-12, 12, size=2))
    if kind == "index":
        return str(a)
    if kind == "slice":
        return f"{a if rng.random() < 0.8 else ''}:{b if rng.random() < 0.8 else ''}"
    if kind == "steps":
        a = abs(a)
        return f"g{a}:{a + abs(b) + 1 if rng.random() < 0.7 else ''}"
    first, last = rng.integers(1, 9, size=2)
    return {"f": f"f{first}", "l": f"l{last}", "f+l": f"f{first}+l{last}"}[kind]


def random_request(rng, max_columns: int, num_slots: int) -> RequestSteering | None:
    if rng.random() < 0.2:
        return None
    n = int(rng.integers(1, max_columns + 1))
    return RequestSteering([int(s) for s in rng.integers(1, num_slots + 1, size=n)],
                           [float(rng.choice([0.0, 0.5, 1.0, -2.0, 3.25])) for _ in range(n)],
                           [random_spec(rng) for _ in range(n)],
                           int(rng.integers(0, 20)) if rng.random() < 0.25 else None)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_fill_matches_per_request_reference(seed):
    """Random batches over many steps: requests arrive, prefill in random chunks, decode and leave;
    up to 5 columns of every kind, prompt-length overrides, requests without steering."""
    rng = np.random.default_rng(seed)
    max_columns, max_tokens, num_slots = 5, 256, 12
    config = SteerConfig(num_slots=num_slots, max_rank=2, max_columns=max_columns)
    state = StepState(config, torch.zeros(max_columns, max_tokens, dtype=torch.int64),
                      torch.zeros(max_columns, max_tokens, dtype=torch.float32))
    for slot in range(1, num_slots + 1):
        state.set_slot_sites(slot, [(slot % 4, "block_output")] + [(9, "mlp_output")] * (slot % 2))
    steering, prompt_of, computed_of, live, next_id = {}, {}, {}, [], 0
    for _ in range(60):
        for _ in range(int(rng.integers(0, 4))):               # arrivals
            req_id = f"r{next_id}"
            next_id += 1
            steering[req_id] = random_request(rng, max_columns, num_slots)
            prompt_of[req_id], computed_of[req_id] = int(rng.integers(1, 40)), 0
            live.append(req_id)
        live = [r for r in live if rng.random() > 0.1]          # departures
        rng.shuffle(live)
        batch, budget = [], max_tokens
        for req_id in live:
            remaining = prompt_of[req_id] - computed_of[req_id]
            n = int(rng.integers(1, remaining + 1)) if remaining > 0 else 1
            if n > budget:
                break
            batch.append((req_id, n))
            budget -= n
        req_ids = [r for r, _ in batch]
        num_scheduled = np.array([n for _, n in batch], dtype=np.int32)
        num_computed = np.array([computed_of[r] for r in req_ids], dtype=np.int32)
        num_prompt = np.array([prompt_of[r] for r in req_ids], dtype=np.int32)
        state.prepare(req_ids, num_scheduled, num_computed, num_prompt, args_for(
            {r: None if s is None else s.to_extra_args() for r, s in steering.items()}), live_req_ids=set(live))
        slots, coef, columns, present = reference_fill(steering, req_ids, num_scheduled, num_computed, num_prompt,
                                                       max_columns, max_tokens)
        assert np.array_equal(state.slots.numpy(), slots) and np.array_equal(state.coef.numpy(), coef)
        assert state.num_columns == columns
        assert state.active_sites == set().union(*(state.slot_sites[s] for s in present))
        for req_id, n in batch:
            computed_of[req_id] += n


def test_position_spans_are_the_masks():
    """``position_spans`` of every kind, on every short prompt, is ``Positions.mask``."""
    specs = [parse_positions(s) for s in ("all", "prompt", "generated", "f1", "l2", "f3+l1", "f2+l5", "l9", "-1", "0",
                                          "5", "-3:", ":-2", "2:-1", "-30:4", "g0:3", "g2:")]
    positions = np.arange(30)
    for spec in specs:
        for prompt in range(12):
            lo1, hi1, lo2, hi2 = position_spans(np.array(spec.code), spec.first, spec.last, prompt)
            assert lo1 <= hi1 <= lo2 <= hi2
            spans = ((positions >= lo1) & (positions < hi1)) | ((positions >= lo2) & (positions < hi2))
            assert np.array_equal(spans, spec.mask(positions, prompt)), (spec, prompt)
    assert [int(b) for b in position_spans(np.array(NO_POSITIONS), 0, 0, 7)] == [0, 0, 0, 0]


def test_request_table_grows_and_reuses_entries():
    """More steered requests than the table's first capacity, then finished ones forgotten and
    their entries reused by new requests with other steering."""
    rng = np.random.default_rng(7)
    config = SteerConfig(num_slots=8, max_rank=2, max_columns=3)
    state = StepState(config, torch.zeros(3, 256, dtype=torch.int64), torch.zeros(3, 256, dtype=torch.float32))
    steering = {}
    for wave in range(3):
        req_ids = [f"w{wave}-{i}" for i in range(200 if wave != 1 else 10)]
        steering.update({r: random_request(rng, 3, 8) for r in req_ids})
        n, computed = np.ones(len(req_ids), dtype=np.int32), rng.integers(0, 12, size=len(req_ids)).astype(np.int32)
        prompt = np.full(len(req_ids), 6, dtype=np.int32)
        state.prepare(req_ids, n, computed, prompt, args_for(
            {r: None if s is None else s.to_extra_args() for r, s in steering.items()}), live_req_ids=set(req_ids))
        slots, coef, columns, _ = reference_fill(steering, req_ids, n, computed, prompt, 3, 256)
        assert np.array_equal(state.slots.numpy(), slots) and np.array_equal(state.coef.numpy(), coef)
        assert state.num_columns == columns
    assert len(state._rows) <= 2 * 200 + 64


@pytest.mark.parametrize("spec", ["-1", "-3", "0", "4", "-4:", ":3", "2:-2", "-5:-1", "1:", ":", "9:2", "-40:"])
def test_prompt_indices_and_slices_are_python_slices(spec):
    """``<i>`` and ``<a>:<b>`` pick the prompt positions Python's indexing of the prompt picks (an index
    out of range: none); nothing generated."""
    positions = np.arange(40)
    for prompt in range(12):
        tokens = list(range(prompt))
        if ":" in spec:
            a, b = (int(x) if x else None for x in spec.split(":"))
            want = tokens[a:b]
        else:
            want = [tokens[int(spec)]] if -prompt <= int(spec) < prompt else []
        assert np.flatnonzero(parse_positions(spec).mask(positions, prompt)).tolist() == want, (spec, prompt)


def test_generation_steps():
    """``g<a>:<b>``: generated tokens a..b-1, counted as ``generated`` counts (position = prompt + step)."""
    positions = np.arange(30)
    assert np.flatnonzero(parse_positions("g0:3").mask(positions, 7)).tolist() == [7, 8, 9]
    assert np.flatnonzero(parse_positions("g2:").mask(positions, 7)).tolist() == list(range(9, 30))
    assert np.array_equal(parse_positions("g0:").mask(positions, 5), parse_positions("generated").mask(positions, 5))
    for bad in ("g3:3", "g-2:-3", "g:4", "1:2:3", "--1", "+1"):
        with pytest.raises(ValueError, match="invalid positions"):
            parse_positions(bad)


@pytest.mark.parametrize("spec", ["t7", "t7:3"])
def test_token_triggers_edit_after_the_trigger_however_the_request_is_chunked(spec):
    """``t<id>`` edits every position after the first occurrence of the token, ``t<id>:<n>`` the n after it
    (none before it appears): the same positions for a prompt trigger and a generated one, whatever the
    chunks, also when a prefix-cached part holding the trigger is never scheduled."""
    prompt_tokens = [3, 1, 4, 1, 5, 7, 2, 6, 5, 3, 5, 8]
    generated = [9, 9, 7, 9, 9, 9]
    n = None if ":" not in spec else int(spec.split(":")[1])
    for tokens, trigger_at in ((prompt_tokens, 5), ([1] * 12, 14)):
        edited = set(range(trigger_at + 1, 18 if n is None else trigger_at + 1 + n))
        sequence = np.array([tokens + generated])
        for chunks in ([12], [4, 4, 4], [5, 7], [1] * 12):
            for cached in (0, 8):
                state = make_state(columns=1)
                extra = {"a": RequestSteering([2], [1.0], [spec]).to_extra_args()}
                bounds = [cached] + [int(c) for c in np.cumsum(chunks) if c > cached]
                seen, computed = [], cached
                for n_tokens in [b - a for a, b in zip(bounds, bounds[1:])] + [1] * len(generated):
                    state.prepare(["a"], np.array([n_tokens]), np.array([computed]), np.array([12]),
                                  args_for(extra), token_ids=sequence)
                    seen += [int(s == 2) for s in state.slots[0, :n_tokens].tolist()]
                    computed += n_tokens
                assert seen == [int(p in edited) for p in range(cached, 18)], (tokens, chunks, cached)


def test_negative_step_bounds_count_back_from_max_tokens():
    """``g-3:`` on a 10-token prompt with max_tokens 8 edits positions 15.. (the last 3 generated), ``g0:-2``
    positions 10..15; a capture cannot take them (they are not static)."""
    for spec, want in (("g-3:", range(15, 40)), ("g0:-2", range(10, 16)), ("g-20:", range(10, 40))):
        state = make_state(max_tokens=40, columns=1)
        extra = {"a": RequestSteering([2], [1.0], [spec], max_new_tokens=8).to_extra_args()}
        state.prepare(["a"], np.array([40]), np.array([0]), np.array([10]), args_for(extra))
        assert np.flatnonzero(state.slots[0].numpy()).tolist() == list(want), spec
        assert not parse_positions(spec).static
