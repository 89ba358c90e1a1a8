"""pyreft save directories written by the real pyreft 0.1.0 load into the recorded parameters."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fixture_cases import DATA, assert_param_equal, cases
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.pyreft import read_pyreft_dir
from steer_serve.formats.pyvene import parse_key, resolve_orthogonal
from steer_serve.interventions import get_family, reference_apply
from steer_serve.interventions.base import Placement

SAVED = [c for c in cases(library="pyreft") if c.save_dir]


def assert_params_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert_param_equal(name, got[name], tensor)



def test_every_pyreft_family_has_a_save_dir():
    assert {c.family for c in SAVED} == {"loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"}


@pytest.mark.parametrize("case", SAVED, ids=str)
def test_reads_pyreft_dir(case):
    iv = read_pyreft_dir(case.save_dir, act_fn=case.config.get("act_fn"))
    assert iv.source_format == "pyreft" and iv.positions == "l1"
    assert iv.hidden_size == case.meta["hidden_size"]
    [edit] = iv.edits
    assert edit.family == case.family
    assert edit.placement == Placement(case.meta["layer"], case.meta["component"])
    assert edit.config == case.config
    assert_params_equal(edit.params, case.params())
    io = case.io()
    out = reference_apply(iv, io["h"])
    assert (out.float() - io["out"].float()).abs().max() <= (1e-5 if out.dtype == torch.float32 else 1e-2)


def test_mixed_dtypes_are_kept():
    """pyreft's default: bf16 learned_source next to an fp32 rotate_layer (stored as parametrization)."""
    for name in ("pyreft_loreft_bf16_tiny", "pyreft_direft_bf16_tiny"):
        case = cases(name=name)[0]
        edit = read_pyreft_dir(case.save_dir).edits[0]
        assert edit.params["weight"].dtype == edit.params["bias"].dtype == torch.bfloat16
        assert edit.params["rotate_layer"].dtype == torch.float32


def test_parametrized_rotation_is_orthonormal_and_not_the_raw_tensor():
    case = cases(name="pyreft_direft_tiny")[0]
    sd = torch.load(next(case.save_dir.glob("intkey_*.bin")), weights_only=True)
    original = sd["rotate_layer.parametrizations.weight.original"]
    base = sd["rotate_layer.parametrizations.weight.0.base"]
    R = resolve_orthogonal(original, base)
    assert torch.allclose(R.T @ R, torch.eye(R.shape[1]), atol=1e-5)
    assert not torch.allclose(R, base[:, :R.shape[1]], atol=1e-3)  # the perturbed Householder part matters
    state = torch.get_rng_state()
    resolve_orthogonal(original, base)
    assert torch.equal(state, torch.get_rng_state())


def test_older_key_scheme():
    iv = read_pyreft_dir(DATA / "pyreft_oldkeys", act_fn="relu")
    [edit] = iv.edits
    assert edit.placement == Placement(1, "block_output")
    assert_params_equal(edit.params, cases(name="pyreft_direft_tiny")[0].params())
    assert next((DATA / "pyreft_oldkeys").glob("intkey_*.bin")).name.startswith("intkey_layer.1.comp.block_output.")


def test_multilayer_config():
    directory = DATA / "pyreft_multilayer"
    expected = json.loads((directory / "expected.json").read_text())
    params = load_file(directory / "params.safetensors")
    iv = read_pyreft_dir(directory, positions="f1+l1")
    assert iv.positions == "f1+l1"
    assert [(e.placement.layer, e.placement.component) for e in iv.edits] == \
        list(zip(expected["layers"], expected["components"]))
    for e in iv.edits:
        get_family(e.family).validate(e.params, e.config, iv.hidden_size)
    assert [e.params["rotate_layer"].shape[-1] for e in iv.edits] == expected["ranks"]
    for edit in iv.edits:
        prefix = f"{edit.placement.layer}."
        assert_params_equal(edit.params, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})


def test_parse_key_both_schemes():
    assert parse_key("layer_15_comp_block_output_unit_pos_nunit_1#0") == (15, "block_output", "pos")
    assert parse_key("layer.15.comp.block_output.unit.pos.nunit.1#0") == (15, "block_output", "pos")
    assert parse_key("layer_2_comp_head_attention_value_output_unit_h_pos_nunit_1#3") == \
        (2, "head_attention_value_output", "h.pos")
    with pytest.raises(InterventionFormatError, match="cannot parse intervention key"):
        parse_key("comp_model_layers[3]_mlp_unit_pos_nunit_1#0")


def _copy(tmp_path, name="pyreft_loreft_tiny"):
    dst = tmp_path / name
    shutil.copytree(cases(name=name)[0].save_dir, dst)
    return dst


def test_missing_weights_file(tmp_path):
    d = _copy(tmp_path)
    next(d.glob("intkey_*.bin")).unlink()
    with pytest.raises(InterventionFormatError, match="missing weights") as exc:
        read_pyreft_dir(d)
    assert exc.value.code == "missing_file"


def test_hidden_size_mismatch(tmp_path):
    with pytest.raises(InterventionFormatError, match="hidden size mismatch") as exc:
        read_pyreft_dir(_copy(tmp_path), hidden_size=576)
    assert exc.value.code == "hidden_size_mismatch"


def test_unknown_intervention_class(tmp_path):
    d = _copy(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intervention_types"] = ["<class 'mylib.FancyIntervention'>"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InterventionFormatError, match="FancyIntervention") as exc:
        read_pyreft_dir(d)
    assert exc.value.code == "unsupported_family"


def test_pickled_objects_are_refused(tmp_path):
    d = _copy(tmp_path)
    path = next(d.glob("intkey_*.bin"))
    sd = torch.load(path, weights_only=True)
    torch.save({**sd, "payload": pickle.loads(pickle.dumps(Placement(0)))}, path)
    with pytest.raises(InterventionFormatError) as exc:
        read_pyreft_dir(d)
    assert exc.value.code == "unsafe_pickle"


def test_wrong_shapes_and_missing_tensors(tmp_path):
    d = _copy(tmp_path, "pyreft_direft_tiny")
    path = next(d.glob("intkey_*.bin"))
    sd = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("0.base")}, path)
    with pytest.raises(InterventionFormatError, match="parametrization"):
        read_pyreft_dir(d)
    torch.save({**sd, "learned_source.weight": sd["learned_source.weight"][:, :10]}, path)
    with pytest.raises(InterventionFormatError, match="weight"):
        read_pyreft_dir(d)
    torch.save({**sd, "extra": torch.zeros(1)}, path)
    with pytest.raises(InterventionFormatError, match="unexpected tensors"):
        read_pyreft_dir(d)


def test_unknown_act_fn(tmp_path):
    with pytest.raises(InterventionFormatError, match="act_fn"):
        read_pyreft_dir(_copy(tmp_path), act_fn="softmax")


def test_generation_fixtures_point_at_loadable_dirs():
    files = sorted((DATA / "generation").glob("*.json"))
    assert {f.stem for f in files} == {"loreft_l1", "loreft_f1+l1", "direft_l1", "direft_f1+l1"}
    for f in files:
        doc = json.loads(f.read_text())
        iv = read_pyreft_dir(DATA / doc["intervention_dir"], positions=doc["positions"])
        assert iv.positions == doc["positions"] and iv.hidden_size == 576
        assert [(e.family, e.placement) for e in iv.edits] == [(doc["family"], Placement(doc["layer"], doc["component"]))]
        differ = sum(p["steered_ids"] != p["unsteered_ids"] for p in doc["prompts"])
        assert 2 * differ > len(doc["prompts"])
        assert all(p["prompt_ids"] and 0 < len(p["steered_ids"]) <= doc["max_new_tokens"] for p in doc["prompts"])
