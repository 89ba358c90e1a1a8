"""The worker's slot payload carries every family's low-rank form (issue 21: NoReFT answered 500)."""
from __future__ import annotations

import pytest
import torch

from fixture_cases import cases
from steer_serve.engine.worker import _decode_slot_payload, encode_slot_payload
from steer_serve.interventions import edit_config, get_family
from steer_serve.interventions.base import Placement

SAVED = [c for c in cases() if c.save_dir and not c.per_head]


@pytest.mark.parametrize("case", SAVED, ids=str)
def test_payload_round_trips_every_family(case):
    from steer_serve.formats import load_intervention

    iv = load_intervention(case.save_dir, hidden_size=case.meta["hidden_size"])
    [edit] = iv.edits
    lowrank = get_family(edit.family).to_lowrank(edit.params, edit_config(edit))
    site = (edit.placement.layer, Placement(edit.placement.layer, edit.placement.component).base_component)
    decoded = _decode_slot_payload(*encode_slot_payload({site: lowrank}))[site]
    assert decoded.act == lowrank.act
    for name in ("W", "b", "P", "U", "v", "z"):
        want = getattr(lowrank, name)
        got = getattr(decoded, name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert torch.equal(got, want.float()), name


def test_noreft_transposed_projection_is_encoded():
    """NoReFT's P = U = W₂ᵀ are transposed views: safetensors refused them before the fix."""
    [case] = cases(name="pyreft_noreft_tiny")
    lowrank = get_family("noreft").to_lowrank(case.params(), case.config)
    assert not lowrank.P.is_contiguous()
    decoded = _decode_slot_payload(*encode_slot_payload({(1, "block_output"): lowrank}))[(1, "block_output")]
    assert torch.equal(decoded.P, lowrank.P) and torch.equal(decoded.U, lowrank.U)


def test_renorm_flag_is_encoded():
    """Norm-preserving steering's ``renorm`` reaches the worker (and only where it is set)."""
    plain, kept = get_family("steering_vector"), get_family("norm_preserving_steering")
    vector = {"vector": torch.ones(8)}
    sites = {(1, "block_output"): plain.to_lowrank(vector, {}), (2, "block_output"): kept.to_lowrank(vector, {})}
    decoded = _decode_slot_payload(*encode_slot_payload(sites))
    assert not decoded[(1, "block_output")].renorm and decoded[(2, "block_output")].renorm
