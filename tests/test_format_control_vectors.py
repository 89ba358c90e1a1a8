"""Control-vector files as their libraries save them (repeng GGUF, steering-vectors ``torch.save``, CAA
tensors): detected, read as saved, described by ``inspect``, converted to native and back; bad files
refused by name. Fixtures: ``tests/fixtures/make_control_vector_fixtures.py``."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from live_server import REPO
from steer_serve.cli import main
from steer_serve.formats import InterventionFormatError, detect_format, load_intervention
from steer_serve.formats.native import read_native, save_native
from steer_serve.interventions import reference_apply

DATA = REPO / "tests" / "fixtures" / "data_control_vectors"
CASES = json.loads((DATA / "cases.json").read_text())
EXPECTED = load_file(str(DATA / "expected_vectors.safetensors"))
SMOLLM = {"hidden_size": 576, "num_layers": 30}


def expected(prefix: str) -> dict[int, torch.Tensor]:
    return {int(k.split(".")[1]): v for k, v in EXPECTED.items() if k.startswith(prefix + ".")}


def caa_expected() -> dict[int, torch.Tensor]:
    content = load_file(str(DATA / "caa.safetensors"))
    return {int(layer): content["vectors"][i] for i, layer in enumerate(content["layers"].tolist())}


FILES = {"repeng.gguf": ("gguf", lambda: expected("repeng")),
         "steering_vector.pt": ("steering_vectors", lambda: expected("steering_vectors")),
         "caa.safetensors": ("caa", caa_expected), "caa.pt": ("caa", caa_expected)}


@pytest.mark.parametrize("name", FILES)
def test_file_reads_as_the_library_saved_it(name):
    fmt, vectors = FILES[name]
    path = DATA / name
    assert detect_format(path) == fmt
    iv = load_intervention(path, **SMOLLM)
    want = vectors()
    assert iv.source_format == fmt and iv.positions == "all" and iv.hidden_size == 576
    assert [e.placement.layer for e in iv.edits] == sorted(want)
    for edit in iv.edits:
        assert edit.family == "steering_vector" and edit.placement.component == "block_output"
        assert torch.equal(edit.params["vector"], want[edit.placement.layer].to(torch.float32))
    case = next(c for c in CASES["cases"] if c["file"] == name)
    assert sorted(want) == case["layers"]


@pytest.mark.parametrize("name", FILES)
def test_native_conversion_round_trips(tmp_path, name):
    iv = load_intervention(DATA / name, operator="ablation_then_addition" if name.endswith(".pt") else None)
    back = read_native(save_native(iv, tmp_path / "native"))
    assert back.source_format == iv.source_format and back.positions == iv.positions
    for a, b in zip(iv.edits, back.edits):
        assert (a.family, a.placement, a.config) == (b.family, b.placement, b.config)
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_inspect_describes_a_gguf_control_vector(capsys):
    main(["inspect", str(DATA / "repeng.gguf"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["source_format"] == "gguf" and summary["families"] == ["steering_vector"]
    assert summary["layers"] == next(c["layers"] for c in CASES["cases"] if c["name"] == "repeng")


def test_operators_follow_steering_vectors():
    """steering-vectors' ablation operator: h − (h·v̂)v̂; ablation_then_addition adds v back."""
    v = expected("steering_vectors")[12]
    h = torch.randn(5, 576, generator=torch.Generator().manual_seed(0))
    unit = v / v.norm()
    ablated = h - (h @ unit)[:, None] * unit
    for operator, want in (("ablation", ablated), ("ablation_then_addition", ablated + v)):
        iv = load_intervention(DATA / "steering_vector.pt", operator=operator, **SMOLLM)
        edit = next(e for e in iv.edits if e.placement.layer == 12)
        assert edit.family == "directional_ablation"
        torch.testing.assert_close(reference_apply(edit, h), want, rtol=1e-5, atol=1e-4)


# -- bad files: a clear error naming the problem ------------------------------------------------------


def _gguf(path, tensors: dict, arch="controlvector", layer_count=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    writer.add_uint32(f"{arch}.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refused(path, code, match, **kw):
    with pytest.raises(InterventionFormatError, match=match) as info:
        load_intervention(path, **{**SMOLLM, **kw})
    assert info.value.code == code, info.value


def test_wrong_hidden_size_and_layer_count(tmp_path):
    _refused(_gguf(tmp_path / "narrow.gguf", {"direction.3": np.ones(64, np.float32)}), "hidden_size_mismatch",
             "hidden size 64 but the base model has hidden size 576")
    _refused(_gguf(tmp_path / "deep.gguf", {"direction.30": np.ones(576, np.float32)}), "layer_out_of_range",
             "layer 30 is out of range; the base model has 30 layers")
    save_file({"vectors": torch.ones(2, 576), "layers": torch.tensor([1, 2, 3])}, tmp_path / "rows.safetensors")
    _refused(tmp_path / "rows.safetensors", "invalid_intervention", "2 rows but layers lists 3")


def test_non_finite_values(tmp_path):
    bad = np.ones(576, np.float32)
    bad[7] = np.nan
    _refused(_gguf(tmp_path / "nan.gguf", {"direction.3": bad}), "non_finite", "NaN/Inf")
    torch.save({"vectors": torch.full((1, 576), float("inf")), "layers": [4]}, tmp_path / "inf.pt")
    _refused(tmp_path / "inf.pt", "non_finite", "NaN/Inf")


def test_truncated_and_oversized_files(tmp_path):
    data = (DATA / "repeng.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.gguf", "invalid_gguf", "cut.gguf: cannot read it as GGUF")
    (tmp_path / "cut.pt").write_bytes((DATA / "steering_vector.pt").read_bytes()[:300])
    _refused(tmp_path / "cut.pt", "invalid_checkpoint", "cannot read cut.pt")
    with open(tmp_path / "huge.gguf", "wb") as f:  # sparse: the size check comes before any read
        f.truncate(3 << 30)
    _refused(tmp_path / "huge.gguf", "file_too_large", "above the limit")


def test_other_gguf_content(tmp_path):
    _refused(_gguf(tmp_path / "model.gguf", {"direction.3": np.ones(576, np.float32)}, arch="llama"), "invalid_gguf",
             "general.architecture is 'llama', not 'controlvector'")
    _refused(_gguf(tmp_path / "half.gguf", {"direction.3": np.ones(576, np.float16)}), "invalid_gguf",
             "type F16; control vectors are F32")
    extra = {"direction.3": np.ones(576, np.float32), "token_embd": np.ones(4, np.float32)}
    _refused(_gguf(tmp_path / "extra.gguf", extra), "invalid_gguf", "unexpected tensor 'token_embd'")
    _refused(_gguf(tmp_path / "count.gguf", {"direction.3": np.ones(576, np.float32)}, layer_count=2), "invalid_gguf",
             "layer_count is 2 but the file holds 1")


class Payload:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent",))


def test_unsafe_pickle_and_unknown_operator(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(Payload(), f)
    _refused(tmp_path / "evil.pt", "unsafe_pickle", "refusing to unpickle evil.pt")
    _refused(DATA / "steering_vector.pt", "unknown_operator", "unknown operator 'multiply'", operator="multiply")
    _refused(REPO / "tests" / "fixtures" / "data" / "cases" / "pyvene_addition_tiny" / "save", "unknown_operator",
             "operator applies to control-vector files", operator="ablation")
    _refused(DATA / "repeng.gguf", "invalid_intervention", "act_fn applies to pyreft", act_fn="relu")
