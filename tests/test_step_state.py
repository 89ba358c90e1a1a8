"""The per-step token → (slot, coef) fill, without vLLM: chunking, phases, columns, stale tails."""
from __future__ import annotations

import numpy as np
import torch

from steer_serve.engine.config import RequestSteering, SteerConfig
from steer_serve.engine.step_state import StepState


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
