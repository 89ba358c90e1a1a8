"""validate_intervention: every rejection is raised with a message naming edit, param and numbers."""
import math

import pytest
import torch

from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.validation import validate_intervention
from steer_serve.interventions.base import Edit, Intervention, Placement

D, R = 16, 4


def loreft(layer=1, rank=R, d=D):
    rotate = torch.linalg.qr(torch.randn(d, rank))[0] if rank <= d else torch.randn(d, rank)
    return Edit("loreft", Placement(layer), {"rotate_layer": rotate, "weight": torch.randn(rank, d),
                                             "bias": torch.randn(rank)}, {"act_fn": "linear"})


def vector(layer=0, d=D):
    return Edit("steering_vector", Placement(layer), {"vector": torch.randn(d)}, {"scale": 2.0})


def iv(*edits, **kw):
    return Intervention(edits=list(edits) or [loreft()], hidden_size=kw.pop("hidden_size", D), **kw)


def rejects(intervention, match, *, param=None, code=None, **kw):
    with pytest.raises(InterventionFormatError, match=match) as e:
        validate_intervention(intervention, **kw)
    if param is not None:
        assert e.value.param == param
    if code is not None:
        assert e.value.code == code
    return e.value


def test_valid_intervention_passes():
    good = iv(loreft(0), loreft(2, rank=8), vector(1))
    assert validate_intervention(good, hidden_size=D, num_layers=3, max_rank=8) is good


def test_per_head_edit_passes_with_its_head_config():
    edit = Edit("addition", Placement(1, "head_attention_value_output", head=2), {"source": torch.randn(D // 4)},
                {"head_dim": D // 4, "num_heads": 4})
    validate_intervention(iv(edit), hidden_size=D, num_layers=2)


def test_hidden_size_mismatch():
    rejects(iv(), r"built for hidden size 16 but the base model has hidden size 576", hidden_size=576,
            param="hidden_size", code="hidden_size_mismatch")


def test_layer_out_of_range():
    rejects(iv(loreft(0), loreft(30)), r"edit 1 \(loreft at layer 30 block_output\): layer 30 is out of range; "
            r"the base model has 30 layers \(0..29\)", num_layers=30, param="edits[1].placement.layer",
            code="layer_out_of_range")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values(bad):
    edit = loreft()
    edit.params["weight"][1, 2] = bad
    rejects(iv(edit), r"edit 0 \(loreft at layer 1 block_output\): param 'weight' holds 1 NaN/Inf value",
            param="edits[0].weight", code="non_finite")


def test_non_finite_in_bf16():
    edit = vector()
    edit.params["vector"] = edit.params["vector"].to(torch.bfloat16)
    edit.params["vector"][3] = math.nan
    rejects(iv(edit), "param 'vector' holds 1 NaN/Inf", code="non_finite")


def test_unknown_family():
    edit = Edit("telepathy", Placement(0), {"w": torch.zeros(D)})
    rejects(iv(edit), r"edit 0 \(telepathy at layer 0 block_output\): unknown family 'telepathy'",
            param="edits[0].family", code="unknown_family")


def test_family_not_allowed_on_this_server():
    rejects(iv(vector()), r"family 'steering_vector' is not allowed on this server \(allowed: loreft\)",
            allowed_families={"loreft"}, code="unknown_family")


def test_rank_above_limit():
    rejects(iv(loreft(rank=8)), r"edit 0 \(loreft at layer 1 block_output\): rank 8 is above the limit of 4",
            max_rank=4, code="rank_too_large")


def test_hostile_rank_fails_on_shapes_before_any_family_code(monkeypatch):
    edit = loreft(rank=100_000)

    def boom(name):
        raise AssertionError("family code must not run")

    monkeypatch.setattr("steer_serve.interventions.get_family", boom)
    rejects(iv(edit), r"param 'rotate_layer' has shape \(16, 100000\): dimension 100000 exceeds both the component "
            r"width 16 and the rank limit 64", param="edits[0].rotate_layer", code="rank_too_large")


def test_too_many_placements():
    edit = vector()
    rejects(iv(*[edit] * 10_000), "the intervention has 10000 placements, above the limit of 1024",
            param="edits", code="too_many_placements")
    rejects(iv(edit, edit, edit), "3 placements, above the limit of 2", max_placements=2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_float_dtype(dtype):
    edit = vector()
    edit.params["vector"] = torch.ones(D, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    rejects(iv(edit), rf"param 'vector' has dtype {name}; expected a floating dtype", param="edits[0].vector",
            code="invalid_dtype")


def test_non_tensor_param():
    edit = vector()
    edit.params["vector"] = [0.0] * D
    rejects(iv(edit), "param 'vector' is a list, not a tensor", code="invalid_dtype")


def test_family_shape_check_is_reported_with_the_edit():
    edit = loreft()
    edit.params["bias"] = torch.zeros(R + 1)
    rejects(iv(vector(), edit), r"edit 1 \(loreft at layer 1 block_output\): .*'bias'.* shape \[5\], expected \[4\]",
            param="edits[1]")


def test_family_missing_parameter():
    edit = loreft()
    del edit.params["weight"]
    rejects(iv(edit), r"edit 0 .*missing parameters \['weight'\]")


def test_bad_activation_from_config():
    edit = loreft()
    edit.config["act_fn"] = "softplus-ish"
    rejects(iv(edit), r"edit 0 .*unknown act_fn 'softplus-ish'")


def test_header_errors():
    rejects(iv(hidden_size=0), r"hidden_size must be an integer in \[1, 65536\], got 0", param="hidden_size")
    rejects(iv(hidden_size=10**9), "got 1000000000", param="hidden_size")
    rejects(Intervention(edits=[], hidden_size=D), "has no edits", param="edits")
    rejects(iv(positions="middle"), "invalid positions 'middle'", param="positions")
    rejects(iv(scale=math.nan), "scale must be a finite number, got nan", param="scale")
    rejects(iv(dtype="int8"), "dtype must be one of float32, float16, bfloat16, got 'int8'", param="dtype")


def test_parameterless_family():
    validate_intervention(iv(Edit("zero", Placement(0), {}, {"width": D})), hidden_size=D)
    rejects(iv(Edit("zero", Placement(0), {}, {"width": 10**9})), r"edit 0 \(zero at layer 0 block_output\): .*width")
