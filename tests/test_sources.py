"""Hostile sources: paths escaping the allowed dirs, pickle payloads, truncated and oversized files."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steer_serve.formats import load_intervention, sources
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.native import save_native
from steer_serve.formats.sources import (load_safetensors, read_json, resolve_local_source, safe_torch_load)
from steer_serve.interventions.base import Edit, Intervention, Placement


class Payload:
    """Unpickling this creates ``path`` (the way a malicious checkpoint would run code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def tree(tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    (allowed / "iv").mkdir(parents=True)
    outside.mkdir()
    (allowed / "iv" / "intervention.json").write_text("{}")
    (outside / "secret.json").write_text("{}")
    return allowed, outside


def assert_rejected(path, allowed, match, code):
    with pytest.raises(InterventionFormatError, match=match) as e:
        resolve_local_source(path, [allowed])
    assert e.value.code == code and e.value.param == "source"


def test_inside_is_accepted_and_relative_paths_resolve_under_the_root(tree):
    allowed, _ = tree
    assert resolve_local_source(allowed / "iv", [allowed]) == (allowed / "iv").resolve()
    assert resolve_local_source("iv", [allowed]) == (allowed / "iv").resolve()
    os.symlink(allowed / "iv", allowed / "alias")  # a link that stays inside is fine
    assert resolve_local_source("alias", [allowed]) == (allowed / "iv").resolve()


def test_dotdot_escape_is_rejected(tree):
    allowed, outside = tree
    assert_rejected(allowed / ".." / "outside", allowed, "outside the allowed directories", "source_not_allowed")
    assert_rejected("../outside/secret.json", allowed, "outside the allowed directories", "source_not_allowed")
    assert_rejected(outside, allowed, "outside the allowed directories", "source_not_allowed")


def test_symlink_escaping_is_rejected(tree):
    allowed, outside = tree
    os.symlink(outside, allowed / "link")
    assert_rejected("link", allowed, "outside the allowed directories", "source_not_allowed")


def test_symlinked_file_inside_a_source_dir_is_rejected(tree):
    allowed, outside = tree
    os.symlink(outside / "secret.json", allowed / "iv" / "weights.safetensors")
    assert_rejected("iv", allowed, "weights.safetensors in intervention source 'iv' points outside", "source_not_allowed")


def test_missing_and_dangling(tree):
    allowed, outside = tree
    assert_rejected("nope", allowed, "'nope' does not exist", "source_not_found")
    os.symlink(outside / "gone", allowed / "dangling")
    assert_rejected("dangling", allowed, "cannot be resolved", "source_not_found")
    with pytest.raises(InterventionFormatError, match="no directories are allowed"):
        resolve_local_source("iv", [])


def test_too_many_entries(tree, monkeypatch):
    allowed, _ = tree
    monkeypatch.setattr(sources, "MAX_TREE_ENTRIES", 3)
    for i in range(4):
        (allowed / "iv" / f"f{i}").write_text("")
    assert_rejected("iv", allowed, "more than 3 entries", "source_too_large")


def test_load_intervention_honours_allowed_dirs(tree):
    allowed, outside = tree
    iv = Intervention([Edit("steering_vector", Placement(0), {"vector": torch.ones(8)})], hidden_size=8)
    save_native(iv, outside / "native")
    os.symlink(outside / "native", allowed / "sneaky")
    with pytest.raises(InterventionFormatError, match="outside the allowed directories"):
        load_intervention("sneaky", allowed_dirs=[allowed])
    with pytest.raises(InterventionFormatError, match="outside the allowed directories"):
        load_intervention(str(outside / "native" / "intervention.json"), allowed_dirs=[allowed])
    save_native(iv, allowed / "good")
    assert load_intervention("good", allowed_dirs=[allowed]).hidden_size == 8
    assert load_intervention(str(allowed / "good" / "intervention.json"), allowed_dirs=[allowed]).hidden_size == 8


def test_payload_is_live(tmp_path):
    """Control: plain pickle really runs the payload, so the refusals below mean something."""
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps({"w": Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_pickle_payload_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin"
    state = {"weight": torch.zeros(2, 2), "evil": Payload(marker)}
    if writer == "torch_save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    with pytest.raises(InterventionFormatError, match=f"refusing to unpickle {path.name}") as e:
        safe_torch_load(path)
    assert e.value.code == "unsafe_pickle"
    assert not marker.exists()


FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.mark.parametrize("library", ["pyreft", "pyvene"])
def test_pickle_payload_in_a_saved_dir_never_runs(tmp_path, library):
    """A real pyreft/pyvene save dir whose intkey_*.bin files carry a payload, through load_intervention."""
    saves = sorted(p.parent for p in FIXTURES.glob(f"cases/{library}_*/save/config.json"))
    if not saves:
        pytest.skip(f"no recorded {library} save dirs in tests/fixtures/data yet")
    marker = tmp_path / "pwned"
    d = shutil.copytree(saves[0], tmp_path / "save")
    bins = sorted(d.glob("intkey_*.bin"))
    assert bins
    for path in bins:
        torch.save({name: Payload(marker) for name in safe_torch_load(path)}, path)
    with pytest.raises(InterventionFormatError, match="refusing to unpickle intkey_"):
        load_intervention(d, allowed_dirs=[tmp_path])
    assert not marker.exists()


def test_plain_state_dict_loads(tmp_path):
    state = {"weight": torch.randn(2, 3), "bias": torch.randn(2).to(torch.bfloat16), "embed_dim": 3}
    torch.save(state, tmp_path / "ok.bin")
    back = safe_torch_load(tmp_path / "ok.bin")
    assert torch.equal(back["weight"], state["weight"]) and back["bias"].dtype == torch.bfloat16
    assert back["embed_dim"] == 3


def test_truncated_torch_checkpoint(tmp_path):
    torch.save({"weight": torch.randn(64, 64)}, tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(InterventionFormatError, match="cannot read cut.bin as a torch checkpoint") as e:
        safe_torch_load(tmp_path / "cut.bin")
    assert e.value.code == "invalid_checkpoint"


@pytest.mark.parametrize("keep", [0.9, 0.5, 12, 4, 0])
def test_truncated_safetensors(tmp_path, keep):
    save_file({"a": torch.randn(32, 32), "b": torch.randn(7)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    (tmp_path / "w.safetensors").write_bytes(data[:n])
    with pytest.raises(InterventionFormatError, match="cannot read w.safetensors as safetensors") as e:
        load_safetensors(tmp_path / "w.safetensors")
    assert e.value.code == "invalid_safetensors" and e.value.param == "w.safetensors"


def test_safetensors_header_lying_about_sizes(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(InterventionFormatError, match="cannot read w.safetensors"):
        load_safetensors(tmp_path / "w.safetensors")


def test_size_limits(tmp_path):
    (tmp_path / "huge.json").write_text(json.dumps({"x": "a" * 2000}))
    with pytest.raises(InterventionFormatError, match=r"huge.json is \d+ bytes, above the limit of 1000 bytes") as e:
        read_json(tmp_path / "huge.json", max_bytes=1000)
    assert e.value.code == "file_too_large"
    torch.save({"w": torch.zeros(1000)}, tmp_path / "big.bin")
    with pytest.raises(InterventionFormatError, match="big.bin is .* above the limit"):
        safe_torch_load(tmp_path / "big.bin", max_bytes=100)
    save_file({"w": torch.zeros(1000)}, tmp_path / "big.safetensors")
    with pytest.raises(InterventionFormatError, match="big.safetensors is .* above the limit"):
        load_safetensors(tmp_path / "big.safetensors", max_bytes=100)


def test_bad_json(tmp_path):
    (tmp_path / "c.json").write_text("[" * 100_000)
    with pytest.raises(InterventionFormatError, match="c.json is not valid JSON"):
        read_json(tmp_path / "c.json")
    (tmp_path / "d.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InterventionFormatError, match="d.json is not valid JSON"):
        read_json(tmp_path / "d.json")
    with pytest.raises(InterventionFormatError, match="missing file e.json") as e:
        read_json(tmp_path / "e.json")
    assert e.value.code == "missing_file"
