"""Native format: bit-exact round trip (dtypes kept), atomic writes, and clear read errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from steer_serve.formats import describe_intervention, detect_format, load_intervention, native
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.native import read_native, save_native
from steer_serve.interventions.base import Edit, Intervention, Placement

D, R = 16, 4


def make_intervention(seed=0) -> Intervention:
    g = torch.Generator().manual_seed(seed)
    rotate = torch.linalg.qr(torch.randn(D, R, generator=g))[0]
    weight = torch.randn(R, D, generator=g).to(torch.bfloat16)  # pyreft's bf16 learned_source
    bias = torch.tensor([-0.0, 1e-40, 3.0, -2.5]).to(torch.bfloat16)  # signed zero and a subnormal
    source = torch.randn(D // 4, generator=g).to(torch.float16)
    return Intervention(
        edits=[
            Edit("loreft", Placement(1, "block_output"), {"rotate_layer": rotate, "weight": weight, "bias": bias},
                 {"act_fn": "relu"}),
            Edit("addition", Placement(2, "head_attention_value_output", head=3), {"source": source},
                 {"head": 3, "head_dim": D // 4, "num_heads": 4, "interchange_dim": 2}),
            Edit("sigmoid_mask", Placement(0, "mlp_output"), {"mask": torch.randn(D, generator=g),
                 "temperature": torch.tensor(0.5, dtype=torch.float64), "source": torch.zeros(D)}),
        ],
        hidden_size=D, positions="f1+l1", scale=0.75, base_model="org/base", dtype="bfloat16",
        source_format="pyreft")


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_round_trip_is_bit_exact_and_keeps_dtypes(tmp_path):
    iv = make_intervention()
    save_native(iv, tmp_path / "iv")
    back = read_native(tmp_path / "iv")
    assert len(back.edits) == 3
    for a, b in zip(iv.edits, back.edits):
        assert (a.family, a.placement, a.config) == (b.family, b.placement, b.config)
        assert a.params.keys() == b.params.keys()
        for name in a.params:
            assert_bit_equal(a.params[name], b.params[name])
    assert back.edits[0].params["weight"].dtype == torch.bfloat16
    assert back.edits[0].params["rotate_layer"].dtype == torch.float32
    assert back.edits[1].params["source"].dtype == torch.float16
    assert back.edits[2].params["temperature"].shape == () and back.edits[2].params["temperature"].dtype == torch.float64
    for attr in ("hidden_size", "positions", "scale", "base_model", "dtype", "source_format"):
        assert getattr(back, attr) == getattr(iv, attr)
    assert describe_intervention(back) == describe_intervention(iv)


def test_layout_on_disk(tmp_path):
    save_native(make_intervention(), tmp_path / "iv")
    assert sorted(p.name for p in (tmp_path / "iv").iterdir()) == ["intervention.json", "weights.safetensors"]
    meta = json.loads((tmp_path / "iv" / "intervention.json").read_text())
    assert meta["format"] == "steer-serve-intervention" and meta["format_version"] == 1
    assert meta["edits"][1]["placement"] == {"layer": 2, "component": "head_attention_value_output", "head": 3}
    assert meta["edits"][0]["params"]["weight"] == {"shape": [R, D], "dtype": "bfloat16"}
    assert set(load_file(tmp_path / "iv" / "weights.safetensors")) == {
        "edits.0.rotate_layer", "edits.0.weight", "edits.0.bias", "edits.1.source",
        "edits.2.mask", "edits.2.temperature", "edits.2.source"}
    assert detect_format(tmp_path / "iv") == "native"
    assert detect_format(tmp_path / "iv" / "intervention.json") == "native"


def test_describe(tmp_path):
    d = describe_intervention(make_intervention())
    assert d["families"] == ["addition", "loreft", "sigmoid_mask"]
    assert d["num_parameters"] == D * R + R * D + R + D // 4 + D + 1 + D
    assert d["edits"][0]["params"]["rotate_layer"] == {"shape": [D, R], "dtype": "float32"}
    assert d["layers"] == [0, 1, 2] and d["positions"] == "f1+l1" and d["scale"] == 0.75
    json.dumps(d)


def test_overwrite_needs_flag(tmp_path):
    save_native(make_intervention(0), tmp_path / "iv")
    with pytest.raises(FileExistsError):
        save_native(make_intervention(1), tmp_path / "iv")
    save_native(make_intervention(1), tmp_path / "iv", overwrite=True)
    assert torch.equal(read_native(tmp_path / "iv").edits[0].params["rotate_layer"],
                       make_intervention(1).edits[0].params["rotate_layer"])


def _failing_save_file(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


def test_failed_overwrite_leaves_previous_directory_intact(tmp_path, monkeypatch):
    old = make_intervention(0)
    save_native(old, tmp_path / "iv")
    monkeypatch.setattr(native, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_native(make_intervention(1), tmp_path / "iv", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["iv"]  # no temporary leftovers
    back = read_native(tmp_path / "iv")
    assert torch.equal(back.edits[0].params["rotate_layer"], old.edits[0].params["rotate_layer"])


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "save_file", _failing_save_file)
    with pytest.raises(OSError):
        save_native(make_intervention(), tmp_path / "iv")
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_config_is_rejected_before_writing(tmp_path):
    iv = make_intervention()
    iv.edits[0].config["act_fn"] = object()
    with pytest.raises(InterventionFormatError, match="not JSON-serialisable"):
        save_native(iv, tmp_path / "iv")
    assert not (tmp_path / "iv").exists()


def _edit_json(path, fn):
    meta = json.loads((path / "intervention.json").read_text())
    fn(meta)
    (path / "intervention.json").write_text(json.dumps(meta))


def test_read_errors_name_the_problem(tmp_path):
    path = tmp_path / "iv"
    save_native(make_intervention(), path)
    weights = (path / "weights.safetensors").read_bytes()

    (path / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(InterventionFormatError, match="cannot read weights.safetensors") as e:
        read_native(path)
    assert e.value.param == "weights.safetensors"

    (path / "weights.safetensors").unlink()
    with pytest.raises(InterventionFormatError, match="missing file weights.safetensors"):
        read_native(path)

    (path / "weights.safetensors").write_bytes(weights)
    _edit_json(path, lambda m: m["edits"][0]["params"]["weight"].update(shape=[D, R]))
    with pytest.raises(InterventionFormatError, match=r"edits.0.weight: stored as bfloat16 \[4, 16\]"):
        read_native(path)

    _edit_json(path, lambda m: m["edits"][0]["params"].pop("weight"))
    with pytest.raises(InterventionFormatError, match="no edit declares: edits.0.weight"):
        read_native(path)

    _edit_json(path, lambda m: m.update(format_version=99))
    with pytest.raises(InterventionFormatError, match="unsupported format_version 99"):
        read_native(path)

    _edit_json(path, lambda m: m.update(format_version=1, hidden_size="16"))
    with pytest.raises(InterventionFormatError, match="hidden_size is missing or not an integer") as e:
        read_native(path)
    assert e.value.param == "hidden_size"

    _edit_json(path, lambda m: m.update(hidden_size=16) or m["edits"][1]["placement"].update(component="nowhere"))
    with pytest.raises(InterventionFormatError, match="unknown component 'nowhere'"):
        read_native(path)

    (path / "intervention.json").write_text("{not json")
    with pytest.raises(InterventionFormatError, match="intervention.json is not valid JSON"):
        read_native(path)


def test_tensors_must_match_declared_dtype(tmp_path):
    path = tmp_path / "iv"
    save_native(make_intervention(), path)
    tensors = load_file(path / "weights.safetensors")
    tensors["edits.0.weight"] = tensors["edits.0.weight"].float()
    save_file(tensors, path / "weights.safetensors")
    with pytest.raises(InterventionFormatError, match="stored as float32 .* declares bfloat16"):
        read_native(path)


def test_load_intervention_overrides_native(tmp_path):
    iv = make_intervention()
    iv.edits[0].config = {}
    save_native(iv, tmp_path / "iv")
    back = load_intervention(tmp_path / "iv", act_fn="gelu", positions="prompt", scale=2.0, hidden_size=D)
    assert back.edits[0].config == {"act_fn": "gelu"} and "act_fn" not in back.edits[1].config
    assert (back.positions, back.scale) == ("prompt", 2.0)
