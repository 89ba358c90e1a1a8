"""pyvene save directories written by the real pyvene 0.1.8 load into the recorded parameters."""
from __future__ import annotations

import shutil

import pytest
import torch

from fixture_cases import assert_param_equal, cases
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.pyvene import read_pyvene_dir
from steer_serve.interventions import apply_edit_lowrank, edit_config, get_family, reference_apply
from steer_serve.interventions.base import Placement

SAVED = [c for c in cases(library="pyvene") if c.save_dir]


def read(case, **kw):
    if case.per_head:
        kw.setdefault("head", 1)
        kw.setdefault("num_heads", 4)
    if case.family == "zero":
        kw.setdefault("hidden_size", case.meta["hidden_size"])
    return read_pyvene_dir(case.save_dir, **kw)


def test_every_pyvene_family_has_a_save_dir():
    assert {c.family for c in SAVED} == {"addition", "subtraction", "zero", "rotated_space", "low_rank_rotated_space",
                                         "boundless_rotated_space", "sigmoid_mask", "sigmoid_mask_rotated_space"}


@pytest.mark.parametrize("case", SAVED, ids=str)
def test_reads_pyvene_dir(case):
    iv = read(case)
    assert iv.source_format == "pyvene" and iv.positions == "all"
    [edit] = iv.edits
    assert edit.family == case.family
    assert (edit.placement.layer, edit.placement.component) == (case.meta["layer"], case.meta["component"])
    want = case.params()
    assert set(edit.params) == set(want)
    for name, tensor in want.items():
        assert_param_equal(name, edit.params[name], tensor)
    io = case.io()
    if case.per_head:
        assert edit.placement == Placement(2, "head_attention_value_output", 1)
        assert edit.config == {"head_dim": 16, "num_heads": 4} and iv.hidden_size == 64
        got = get_family(edit.family).apply(io["h"], edit.params, {})
    else:
        assert edit.config == case.config and iv.hidden_size == case.meta["hidden_size"]
        got = reference_apply(iv, io["h"])
        lowrank = get_family(edit.family).to_lowrank(edit.params, edit_config(edit))
        assert (apply_edit_lowrank(io["h"], lowrank) - io["out"]).abs().max() <= 1e-5
    assert (got - io["out"]).abs().max() <= 1e-5


def test_partial_interchange_dim_is_read_from_config():
    for name in ("pyvene_addition_tiny", "pyvene_zero_tiny", "pyvene_rotated_space_tiny"):
        assert read(cases(name=name)[0]).edits[0].config["interchange_dim"] == 40


def test_zero_needs_hidden_size():
    case = cases(name="pyvene_zero_tiny")[0]
    with pytest.raises(InterventionFormatError, match="hidden_size") as exc:
        read_pyvene_dir(case.save_dir)
    assert exc.value.code == "missing_hidden_size"


def test_per_head_needs_head():
    case = cases(name="pyvene_addition_head_tiny")[0]
    with pytest.raises(InterventionFormatError, match="head=") as exc:
        read_pyvene_dir(case.save_dir, hidden_size=64)
    assert exc.value.code == "missing_head"
    iv = read_pyvene_dir(case.save_dir, hidden_size=64, head=3)
    assert iv.edits[0].placement.head == 3 and iv.edits[0].config["num_heads"] == 4
    with pytest.raises(InterventionFormatError, match="head"):
        read_pyvene_dir(case.save_dir, hidden_size=64, head=4)


def test_source_representation_can_be_supplied(tmp_path):
    case = cases(name="pyvene_low_rank_rotated_space_tiny")[0]
    d = tmp_path / "lrr"
    shutil.copytree(case.save_dir, d)
    path = next(d.glob("intkey_*.bin"))
    sd = torch.load(path, weights_only=True)
    source = sd.pop("source_representation")
    torch.save(sd, path)
    interchange = read_pyvene_dir(d).edits[0]   # no source stored: each request gives one
    assert interchange.config == {"source": "request"} and not interchange.params["source"].any()
    edit = read_pyvene_dir(d, source=source.unsqueeze(0)).edits[0]
    assert torch.equal(edit.params["source"], source) and "source" not in edit.config


def test_unservable_component(tmp_path):
    case = cases(name="pyvene_addition_tiny")[0]
    d = tmp_path / "q"
    shutil.copytree(case.save_dir, d)
    for path in d.glob("intkey_*.bin"):
        path.rename(path.with_name(path.name.replace("block_output", "attention_weight")))
    cfg = (d / "config.json").read_text().replace("block_output", "attention_weight")
    (d / "config.json").write_text(cfg)
    with pytest.raises(InterventionFormatError, match="attention_weight") as exc:
        read_pyvene_dir(d)
    assert exc.value.code == "unsupported_component"


def test_a_new_family_is_one_declaration_the_reader_needs_no_change(tmp_path, monkeypatch):
    """A family declares its library class and saved layout; the generic reader then reads a save dir
    of it (here a made-up ``ShiftIntervention`` saving ``shift``), unused entries go to ``check_saved``."""
    import json

    from steer_serve import interventions
    from steer_serve.interventions.base import LowRankEdit
    from steer_serve.interventions.family import Family, Saved, expect_shape, f32

    class Shift(Family):
        name = "shift_test"
        required = ("vector",)
        library_classes = ("ShiftIntervention",)
        saved = {"vector": Saved(("shift",))}
        saved_unused = ("seen",)

        def check(self, params, config, width):
            expect_shape(self.name, params, "vector", (width,))

        def check_saved(self, unused, params):
            if "seen" in unused and int(unused["seen"].sum()) != 1:
                raise ValueError("seen must hold one count")

        def forward(self, h, params, config):
            return h + params["vector"]

        def lowrank(self, params, config):
            return LowRankEdit(v=f32(params["vector"]))

    family = Shift()
    monkeypatch.setitem(interventions.FAMILIES, family.name, family)
    monkeypatch.setitem(interventions.LIBRARY_CLASSES, "ShiftIntervention", family)
    key = "layer_2_comp_block_output_unit_pos_nunit_1#0"
    (tmp_path / "config.json").write_text(json.dumps({
        "representations": [[2, "block_output", "pos", 1, None]],
        "intervention_types": ["<class 'my_lab.ShiftIntervention'>"], "sorted_keys": [key]}))
    vector = torch.randn(16)
    torch.save({"shift": vector, "seen": torch.ones(1)}, tmp_path / f"intkey_{key}.bin")
    iv = read_pyvene_dir(tmp_path, hidden_size=16)
    (edit,) = iv.edits
    assert edit.family == "shift_test" and edit.placement == Placement(2, "block_output")
    assert torch.equal(edit.params["vector"], vector)
    torch.save({"shift": vector, "seen": torch.zeros(1)}, tmp_path / f"intkey_{key}.bin")
    with pytest.raises(InterventionFormatError, match="seen must hold one count"):
        read_pyvene_dir(tmp_path, hidden_size=16)
