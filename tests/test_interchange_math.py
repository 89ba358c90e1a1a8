"""The interchange split ``f(h; s) = f(h; s₀) + g(s) − g(s₀)`` (``api/interchange.py``) for every family a
source is given to, and the worker's placement of source rows under chunked prefill (no engine needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from steer_serve.api.interchange import source_rows, subspace_axes, subspace_term
from steer_serve.engine.interchange import InterchangeState, SourceTerm, from_extra_args, to_extra_args
from steer_serve.interventions import apply_edit_lowrank, edit_config, get_family
from steer_serve.interventions.base import Edit, Placement

D = 32


def _rotation(gen, cols=D):
    return torch.linalg.qr(torch.randn(D, D, generator=gen))[0][:, :cols].contiguous()


def _params(family: str, gen) -> tuple[dict, dict]:
    source = torch.randn(D, generator=gen)
    if family == "vanilla":
        return {"source": source}, {"interchange_dim": 12}
    if family == "addition":
        return {"source": source}, {}
    if family == "rotated_space":
        return {"rotate_layer": _rotation(gen), "source": source}, {"interchange_dim": 5}
    if family == "low_rank_rotated_space":
        return {"rotate_layer": _rotation(gen, 4), "source": source}, {}
    return ({"rotate_layer": _rotation(gen), "source": source, "intervention_boundaries": torch.tensor([0.3]),
             "temperature": torch.tensor(2.0)}, {})


@pytest.mark.parametrize("family", ["vanilla", "addition", "rotated_space", "low_rank_rotated_space",
                                    "boundless_rotated_space"])
def test_stored_edit_plus_source_rows_is_the_family_with_that_source(family):
    gen = torch.Generator().manual_seed(0)
    params, config = _params(family, gen)
    edit = Edit(family, Placement(1, "block_output"), params, config)
    fam = get_family(family)
    h, sources, scale = torch.randn(3, D, generator=gen), torch.randn(3, D, generator=gen), 0.7
    rows = source_rows(edit, sources, scale)
    got = apply_edit_lowrank(h, fam.to_lowrank(params, edit_config(edit)), scale) + rows
    for i in range(3):
        out = fam.apply(h[i:i + 1], {**params, "source": sources[i]}, config)
        expected = h[i] + scale * (out[0] - h[i])
        assert (got[i] - expected).abs().max() < 1e-5


def test_rows_reach_their_positions_however_the_prompt_is_chunked():
    """``l3`` on a 10-token prompt prefilled as 4 + 4 + 2 tokens beside another request: row i at position 7 + i."""
    rows = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)
    args = {"a": to_extra_args([SourceTerm(1, "block_output", "l3", rows)]), "b": None}
    assert torch.equal(from_extra_args(args["a"])[0].rows, rows)
    state = InterchangeState()
    seen = {}
    for computed in (0, 4, 8):
        n = min(4, 10 - computed)
        state.prepare(["b", "a"], np.array([2, n]), np.array([5, computed]), np.array([3, 10]), args.get,
                      live_req_ids={"a", "b"})
        out = state.add((1, "block_output"), torch.zeros(2 + n, 4))
        for t in range(n):
            if out[2 + t].any():
                seen[computed + t] = out[2 + t]
        assert not out[:2].any()
        assert torch.equal(state.add((2, "block_output"), torch.zeros(2 + n, 4)), torch.zeros(2 + n, 4))
    assert sorted(seen) == [7, 8, 9]
    assert all(torch.equal(seen[7 + i], rows[i]) for i in range(3))


def test_subspace_terms_swap_the_selected_axes_per_request():
    """Two requests at one site with different ``subspaces`` (vanilla: original axes; rotated space: rotated ones),
    batched in one step: each base position gets ``swap_S(h B, s B)`` in that basis, h elsewhere (vanilla exactly)."""
    gen = torch.Generator().manual_seed(3)
    rotation = _rotation(gen)
    edits = {"a": Edit("vanilla", Placement(1, "block_output"), {"source": torch.zeros(D)}),
             "b": Edit("rotated_space", Placement(1, "block_output"), {"rotate_layer": rotation, "source": torch.zeros(D)})}
    chosen = {"a": [7, 0, 30], "b": [2, 11, 5, 19, 23]}
    sources = {r: torch.randn(2, D, generator=gen) for r in edits}
    args = {r: to_extra_args([subspace_term(edits[r], subspace_axes(edits[r], chosen[r], 0), sources[r], 1.0, "l2")])
            for r in edits}
    h = torch.randn(8, D, generator=gen)
    state = InterchangeState()
    state.prepare(["a", "b"], np.array([4, 4]), np.array([0, 0]), np.array([4, 4]), args.get, live_req_ids={"a", "b"})
    out = state.add((1, "block_output"), h.clone())
    vanilla = h[2:4].clone()
    vanilla[:, chosen["a"]] = sources["a"][:, chosen["a"]]
    assert torch.equal(out[2:4], vanilla) and torch.equal(out[:2], h[:2]) and torch.equal(out[4:6], h[4:6])
    rotated = h[6:8] @ rotation
    rotated[:, chosen["b"]] = (sources["b"] @ rotation)[:, chosen["b"]]
    assert (out[6:8] - rotated @ rotation.T).abs().max() < 1e-5
