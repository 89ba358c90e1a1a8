"""load_intervention end to end on the recorded pyreft/pyvene save dirs: detection, dispatch,
overrides, validation, and conversion to the native format without changing a bit."""
import json
from pathlib import Path

import pytest
import torch

from steer_serve.formats import describe_intervention, detect_format, load_intervention
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.native import read_native, save_native

DATA = Path(__file__).parent / "fixtures" / "data"
MODELS = {"tiny": (64, 3), "smollm": (576, 30)}  # hidden size, layers
CASES = sorted(p.parent.parent.name for p in DATA.glob("cases/*/save/config.json"))


def case(name):
    return json.loads((DATA / "cases" / name / "case.json").read_text())


def load_case(name, **kw):
    c = case(name)
    hidden, layers = MODELS[c["model"]]
    kw.setdefault("hidden_size", hidden)
    kw.setdefault("num_layers", layers)
    if c["component"].startswith("head_"):
        kw.setdefault("head", 1)
    if c["config"].get("act_fn"):
        kw.setdefault("act_fn", c["config"]["act_fn"])
    return load_intervention(DATA / "cases" / name / "save", allowed_dirs=[DATA], **kw)


@pytest.mark.skipif(not CASES, reason="recorded fixtures not present")
@pytest.mark.parametrize("name", CASES)
def test_recorded_save_dirs_load_through_dispatch(name, tmp_path):
    c = case(name)
    assert detect_format(DATA / "cases" / name / "save") == c["library"]
    iv = load_case(name)
    assert iv.source_format == c["library"] and len(iv.edits) == 1
    edit = iv.edits[0]
    assert (edit.family, edit.placement.layer, edit.placement.component) == (c["family"], c["layer"], c["component"])
    assert describe_intervention(iv)["num_parameters"] == iv.num_parameters()
    back = read_native(save_native(iv, tmp_path / "native"))
    for key, t in edit.params.items():
        u = back.edits[0].params[key]
        assert u.dtype == t.dtype and torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert back.edits[0].config == edit.config and back.edits[0].placement == edit.placement


@pytest.mark.skipif(not (DATA / "pyreft_multilayer").is_dir(), reason="recorded fixtures not present")
def test_multilayer_and_old_key_scheme():
    expected = json.loads((DATA / "pyreft_multilayer" / "expected.json").read_text())
    iv = load_intervention(DATA / "pyreft_multilayer", hidden_size=64, num_layers=3)
    assert [e.placement.layer for e in iv.edits] == expected["layers"]
    old = load_intervention(DATA / "pyreft_oldkeys", hidden_size=64, num_layers=3)
    assert detect_format(DATA / "pyreft_oldkeys") == "pyreft" and old.edits[0].family == "direft"


@pytest.mark.skipif(not CASES, reason="recorded fixtures not present")
def test_overrides_and_base_model_checks():
    name = next(n for n in CASES if n.startswith("pyreft_loreft") and case(n)["model"] == "tiny")
    iv = load_case(name, positions="f2+l2", scale=0.5)
    assert (iv.positions, iv.scale) == ("f2+l2", 0.5)
    with pytest.raises(InterventionFormatError, match="hidden size"):
        load_case(name, hidden_size=576)
    with pytest.raises(InterventionFormatError, match="out of range"):
        load_case(name, num_layers=1)
    with pytest.raises(InterventionFormatError, match="rank .* above the limit of 1"):
        load_case(name, max_rank=1)
    with pytest.raises(InterventionFormatError, match="not allowed on this server"):
        load_case(name, allowed_families={"addition"})


def test_unrecognised_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterventionFormatError, match="cannot tell the format of 'empty'"):
        load_intervention(tmp_path / "empty")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InterventionFormatError, match="cannot tell the format of 'model'"):
        detect_format(tmp_path / "model")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InterventionFormatError, match="PEFT LORA directory"):
        detect_format(tmp_path / "lora")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InterventionFormatError, match="not an intervention directory"):
        load_intervention(tmp_path / "file.txt")
    with pytest.raises(InterventionFormatError, match="does not exist"):
        load_intervention(tmp_path / "missing")
    with pytest.raises(InterventionFormatError, match="unknown format 'onnx'"):
        load_intervention(tmp_path / "empty", format="onnx")
