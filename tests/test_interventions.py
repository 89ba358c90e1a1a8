"""Every family's reference forward against outputs recorded from the real pyreft/pyvene.

The fixtures (tests/fixtures/data, made by tests/fixtures/make_fixtures.py) hold each library
intervention's parameters as the library computed them and its output on random inputs; pyreft
and pyvene are not needed here.
"""
from __future__ import annotations

import json

import pytest
import torch

from fixture_cases import cases, manifest
from live_server import FIXTURES
from steer_serve.interventions import (FAMILIES, apply_edit_lowrank, edit_config, get_family,
                                       reference_apply)
from steer_serve.interventions.base import Edit, Intervention, LowRankEdit, Placement

ALL = cases()
FP32 = [c for c in ALL if all(d == "float32" for d in c.meta["dtypes"].values())]
TOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_fixtures_cover_every_library_family():
    interchange = json.loads((FIXTURES.parent / "data_interchange" / "cases.json").read_text())["cases"]
    recorded = {c.family for c in ALL} | {c["family"] for c in interchange}   # vanilla: pyvene's interchange only
    library = {name for name, family in FAMILIES.items() if family.library_classes}  # not steering vectors, control-vector methods, IA3's
    assert recorded == library, recorded ^ library
    assert set(manifest()["cases"]) == {c.name for c in ALL}
    assert {c.meta["model"] for c in ALL if c.meta["library"] == "pyreft"} == {"tiny", "smollm"}


@pytest.mark.parametrize("case", ALL, ids=str)
def test_apply_matches_library(case):
    params, io, config = case.params(), case.io(), case.config
    family = get_family(case.family)
    family.validate(params, config, io["h"].shape[-1])
    got = family.apply(io["h"], params, config)
    assert got.dtype == io["out"].dtype
    assert max_err(io["out"], io["h"]) > 1e-2, "the recorded intervention must change its input"
    if io["out"].dtype == torch.float32:
        assert max_err(got, io["out"]) <= TOL
    else:  # pyreft's default bf16 learned_source: same casts, so the same bf16 values
        torch.testing.assert_close(got, io["out"], rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("case", FP32, ids=str)
def test_lowrank_form_matches_apply(case):
    params, io, config = case.params(), case.io(), case.config
    family = get_family(case.family)
    lowrank = family.to_lowrank(params, config)
    assert all(t is None or t.dtype == torch.float32 for t in (lowrank.W, lowrank.b, lowrank.P, lowrank.U,
                                                               lowrank.v, lowrank.z))
    got = apply_edit_lowrank(io["h"], lowrank)
    assert max_err(got, family.apply(io["h"], params, config)) <= TOL
    assert max_err(got, io["out"]) <= TOL


@pytest.mark.parametrize("case", FP32, ids=str)
def test_a_wrong_parameter_is_detected(case):
    """The comparison can fail: perturbing the first parameter moves the output past the tolerance."""
    params, io, config = case.params(), case.io(), case.config
    if not params:
        config["interchange_dim"] = config.get("interchange_dim", config["width"]) - 1
    else:
        name = sorted(params)[0]
        params[name] = params[name] * 1.01 + 0.01
    assert max_err(get_family(case.family).apply(io["h"], params, config), io["out"]) > 1e-4


def test_act_fn_changes_the_result():
    case = cases(name="pyreft_loreft_tiny")[0]
    assert case.config["act_fn"] == "gelu"
    io = case.io()
    linear = get_family("loreft").apply(io["h"], case.params(), {})
    assert max_err(linear, io["out"]) > 1e-3


def test_lowrank_ranks():
    by_name = {c.name: c for c in ALL}
    rank = lambda n: get_family(by_name[n].family).to_lowrank(by_name[n].params(), by_name[n].config).rank
    assert rank("pyreft_loreft_smollm") == 4
    assert rank("pyreft_lobireft_tiny") == 0
    assert rank("pyvene_addition_tiny") == 0
    assert rank("pyvene_rotated_space_tiny") == 40  # interchange_dim


def test_per_head_edit_acts_on_its_head_only():
    case = cases(name="pyvene_addition_head_tiny")[0]
    io, params = case.io(), case.params()
    head_dim, num_heads, head = io["h"].shape[-1], 4, 1
    torch.manual_seed(0)
    full = torch.randn(io["h"].shape[0], head_dim * num_heads)
    full[:, head * head_dim:(head + 1) * head_dim] = io["h"]
    edit = Edit("addition", Placement(2, "head_attention_value_output", head), params,
                {"head_dim": head_dim, "num_heads": num_heads})
    family = get_family("addition")
    family.validate(params, edit_config(edit), head_dim * num_heads)
    got = reference_apply(edit, full)
    cols = slice(head * head_dim, (head + 1) * head_dim)
    assert max_err(got[:, cols], io["out"]) <= TOL
    outside = torch.ones(head_dim * num_heads, dtype=torch.bool)
    outside[cols] = False
    assert torch.equal(got[:, outside], full[:, outside])
    lowrank = family.to_lowrank(params, edit_config(edit))
    assert lowrank.v.shape == (head_dim * num_heads,) and torch.count_nonzero(lowrank.v[outside]) == 0
    assert max_err(apply_edit_lowrank(full, lowrank), got) <= TOL


def test_per_head_lowrank_expansion_of_a_projection():
    """LoReFT on one head: W, P, U are zero outside the head's columns."""
    case = cases(name="pyreft_loreft_tiny")[0]
    params, io, config = case.params(), case.io(), case.config
    d = io["h"].shape[-1]
    config.update(head=2, head_dim=d, num_heads=3)
    torch.manual_seed(1)
    full = torch.randn(io["h"].shape[0], 3 * d)
    full[:, 2 * d:] = io["h"]
    family = get_family("loreft")
    got = family.apply(full, params, config)
    assert max_err(got[:, 2 * d:], io["out"]) <= TOL and torch.equal(got[:, :2 * d], full[:, :2 * d])
    lowrank = family.to_lowrank(params, config)
    assert lowrank.W.shape == (4, 3 * d) and lowrank.P.shape == (3 * d, 4)
    assert max_err(apply_edit_lowrank(full, lowrank), got) <= TOL


def test_steering_vector():
    family = get_family("steering_vector")
    torch.manual_seed(0)
    h, v = torch.randn(5, 8), torch.randn(8)
    family.validate({"vector": v}, {"scale": 2.5}, 8)
    assert torch.allclose(family.apply(h, {"vector": v}, {"scale": 2.5}), h + 2.5 * v)
    assert torch.allclose(apply_edit_lowrank(h, family.to_lowrank({"vector": v}, {"scale": 2.5})), h + 2.5 * v)
    with pytest.raises(ValueError, match="scale"):
        family.validate({"vector": v}, {"scale": "big"}, 8)


def test_reference_apply_scale_and_sequence():
    case = cases(name="pyreft_direft_tiny")[0]
    params, io = case.params(), case.io()
    edit = Edit("direft", Placement(1), params, case.config)
    iv = Intervention([edit], hidden_size=64, scale=0.5)
    half = reference_apply(iv, io["h"])
    assert max_err(half, io["h"] + 0.5 * (io["out"] - io["h"])) <= TOL
    lowrank = get_family("direft").to_lowrank(params, case.config)
    assert max_err(apply_edit_lowrank(io["h"], lowrank, coef=0.5), half) <= TOL
    placements = {Placement(1): io["h"], Placement(2): io["h"]}
    two = Intervention([edit, Edit("direft", Placement(2), params, case.config)], hidden_size=64)
    out = reference_apply(two, placements)
    assert max_err(out[Placement(1)], io["out"]) <= TOL and max_err(out[Placement(2)], io["out"]) <= TOL
    with pytest.raises(ValueError, match="placements"):
        reference_apply(two, io["h"])


def test_generic_form_terms():
    torch.manual_seed(0)
    h = torch.randn(3, 6)
    W, b, P, U, v, z = torch.randn(2, 6), torch.randn(2), torch.randn(6, 2), torch.randn(6, 2), torch.randn(6), torch.rand(6)
    got = apply_edit_lowrank(h, LowRankEdit(W, b, P, U, v, z, act="tanh"))
    want = h + (torch.tanh(h @ W.T + b) - h @ P) @ U.T + v - h * z
    assert max_err(got, want) <= 1e-6
    assert torch.equal(apply_edit_lowrank(h, LowRankEdit()), h)
    with pytest.raises(ValueError, match="act_fn"):
        apply_edit_lowrank(h, LowRankEdit(W=W, U=U, act="softmax"))


def test_unknown_family_lists_known_names():
    with pytest.raises(ValueError, match="loreft.*") as exc:
        get_family("lorefft")
    assert all(name in str(exc.value) for name in FAMILIES)


@pytest.mark.parametrize("family,params,config,match", [
    ("loreft", {"rotate_layer": torch.zeros(64, 4), "weight": torch.zeros(4, 63), "bias": torch.zeros(4)}, {}, "weight"),
    ("loreft", {"rotate_layer": torch.zeros(64, 4), "weight": torch.zeros(4, 64)}, {}, "missing"),
    ("loreft", {"rotate_layer": torch.zeros(64, 4), "weight": torch.zeros(4, 64), "bias": torch.zeros(4)},
     {"act_fn": "softmax"}, "act_fn"),
    ("direft", {"rotate_layer": torch.zeros(64, 4), "weight": torch.zeros(4, 64), "bias": torch.zeros(4),
                "extra": torch.zeros(1)}, {}, "unknown"),
    ("addition", {"source": torch.zeros(64)}, {"interchange_dim": 65}, "interchange_dim"),
    ("zero", {}, {}, "width"),
    ("boundless_rotated_space", {"rotate_layer": torch.zeros(64, 64), "source": torch.zeros(64),
                                 "intervention_boundaries": torch.zeros(1), "temperature": torch.zeros(1)}, {},
     "temperature"),
    ("addition", {"source": torch.zeros(16)}, {"head": 4, "head_dim": 16, "num_heads": 4}, "head"),
    ("addition", {"source": torch.zeros(16)}, {"head": 0, "head_dim": 16, "num_heads": 3}, "num_heads"),
    ("consreft", {"rotate_layer": torch.zeros(64, 4), "learned_source": torch.zeros(4, dtype=torch.long)}, {},
     "floating"),
])
def test_validate_rejects(family, params, config, match):
    with pytest.raises(ValueError, match=match):
        get_family(family).validate(params, config, 64)
