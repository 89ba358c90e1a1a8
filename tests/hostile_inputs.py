"""Hostile intervention sources (issue 9, item 1), each built on disk by one function.

Every builder takes ``(allowed, outside, marker)`` — a directory the server may read, one it may
not, and a file a pickle payload would create — and returns the ``source`` to register plus words
the server's error message must contain.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from live_server import FIXTURES
from steer_serve.formats.native import save_native
from steer_serve.formats.sources import safe_torch_load
from steer_serve.interventions.base import Edit, Intervention, Placement
from steering_helpers import HIDDEN, random_loreft


class Payload:
    """Unpickling this creates ``path`` (the way a malicious checkpoint runs code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled_save_dir(case: str, allowed: Path, marker: Path, name: str) -> Path:
    target = shutil.copytree(FIXTURES / "cases" / case / "save", allowed / name)
    for path in target.glob("intkey_*.bin"):
        torch.save({key: Payload(marker) for key in safe_torch_load(path)}, path)
    return target


def pickle_pyreft(allowed, outside, marker):
    return str(_pickled_save_dir("pyreft_loreft_smollm", allowed, marker, "hostile-pickle-pyreft")), "unpickle"


def pickle_pyvene(allowed, outside, marker):
    return str(_pickled_save_dir("pyvene_addition_smollm", allowed, marker, "hostile-pickle-pyvene")), "unpickle"


def truncated_safetensors(allowed, outside, marker):
    target = save_native(random_loreft(901), allowed / "hostile-truncated")
    weights = target / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(target), "safetensors"


def _native(allowed: Path, name: str, params: dict, hidden: int = HIDDEN, layer: int = 15,
            family: str = "loreft", **iv_fields) -> Path:
    iv = Intervention([Edit(family, Placement(layer, "block_output"), params)], hidden, **iv_fields)
    return save_native(iv, allowed / name)


def _loreft_params(rank: int = 4, hidden: int = HIDDEN, dtype=torch.float32) -> dict:
    return {"rotate_layer": torch.zeros(hidden, rank, dtype=dtype), "weight": torch.zeros(rank, hidden, dtype=dtype),
            "bias": torch.zeros(rank, dtype=dtype)}


def wrong_hidden_size(allowed, outside, marker):
    return str(_native(allowed, "hostile-hidden", _loreft_params(hidden=512), hidden=512)), "hidden size"


def wrong_dtype(allowed, outside, marker):
    params = {k: v.to(torch.int32) for k, v in _loreft_params().items()}
    return str(_native(allowed, "hostile-dtype", params)), "dtype"


def nan_weights(allowed, outside, marker):
    params = random_loreft(902).edits[0].params
    params["weight"][1, 7] = float("nan")
    return str(_native(allowed, "hostile-nan", params)), "NaN"


def inf_weights(allowed, outside, marker):
    params = random_loreft(903).edits[0].params
    params["bias"][0] = float("inf")
    return str(_native(allowed, "hostile-inf", params)), "Inf"


def rank_100000(allowed, outside, marker):
    params = _loreft_params(rank=100_000, dtype=torch.bfloat16)
    return str(_native(allowed, "hostile-rank", params)), "100000"


def placements_10000(allowed, outside, marker):
    edits = [Edit("steering_vector", Placement(i % 30, "block_output"), {"vector": torch.zeros(1)})
             for i in range(10_000)]
    return str(save_native(Intervention(edits, HIDDEN), allowed / "hostile-placements")), "10000 placements"


def layer_out_of_range(allowed, outside, marker):
    return str(_native(allowed, "hostile-layer", random_loreft(904).edits[0].params, layer=99)), "layer 99"


def unknown_family(allowed, outside, marker):
    return str(_native(allowed, "hostile-family", {"vector": torch.zeros(HIDDEN)}, family="eval_exec")), "family"


def symlink_escape(allowed, outside, marker):
    real = save_native(random_loreft(905), outside / "secret-intervention")
    link = allowed / "hostile-symlink"
    link.symlink_to(real, target_is_directory=True)
    return str(link), "outside the allowed directories"


def symlinked_weights(allowed, outside, marker):
    target = save_native(random_loreft(906), allowed / "hostile-symlinked-file")
    stolen = outside / "stolen.safetensors"
    os.replace(target / "weights.safetensors", stolen)
    (target / "weights.safetensors").symlink_to(stolen)
    return str(target), "points outside"


def dotdot_escape(allowed, outside, marker):
    save_native(random_loreft(907), outside / "dotdot-target")
    return str(allowed / ".." / outside.name / "dotdot-target"), "outside the allowed directories"


def huge_json(allowed, outside, marker):
    target = _native(allowed, "hostile-huge-json", random_loreft(908).edits[0].params)
    meta = json.loads((target / "intervention.json").read_text())
    meta["padding"] = "x" * (5 << 20)
    (target / "intervention.json").write_text(json.dumps(meta))
    return str(target), "above the limit"


def garbage_config(allowed, outside, marker):
    target = allowed / "hostile-garbage"
    target.mkdir()
    (target / "intervention.json").write_bytes(os.urandom(4096))
    save_file({"x": torch.zeros(1)}, str(target / "weights.safetensors"))
    return str(target), "intervention.json"


def _control_gguf(path: Path, tensors: dict) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, value in tensors.items():
        writer.add_tensor(name, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_wrong_hidden_size(allowed, outside, marker):
    return str(_control_gguf(allowed / "hostile-narrow.gguf", {"direction.3": torch.ones(512)})), "hidden size 512"


def gguf_layer_out_of_range(allowed, outside, marker):
    return str(_control_gguf(allowed / "hostile-deep.gguf", {"direction.30": torch.ones(HIDDEN)})), "layer 30"


def gguf_nan(allowed, outside, marker):
    vector = torch.ones(HIDDEN)
    vector[5] = float("nan")
    return str(_control_gguf(allowed / "hostile-nan.gguf", {"direction.3": vector})), "NaN"


def gguf_truncated(allowed, outside, marker):
    path = _control_gguf(allowed / "hostile-cut.gguf", {"direction.3": torch.ones(HIDDEN)})
    path.write_bytes(path.read_bytes()[:100])
    return str(path), "cannot read it as GGUF"


def gguf_oversized(allowed, outside, marker):
    path = allowed / "hostile-huge.gguf"
    with open(path, "wb") as f:  # sparse: refused by its size before any read
        f.truncate(3 << 30)
    return str(path), "above the limit"


def pickle_steering_vector(allowed, outside, marker):
    path = allowed / "hostile-steering-vector.pt"
    torch.save({"layer_activations": {3: Payload(marker)}}, path)
    return str(path), "unpickle"


def caa_wrong_layer_count(allowed, outside, marker):
    path = allowed / "hostile-caa.safetensors"
    save_file({"vectors": torch.ones(2, HIDDEN), "layers": torch.tensor([1, 2, 3])}, str(path))
    return str(path), "2 rows but layers lists 3"


BUILDERS = [pickle_pyreft, pickle_pyvene, truncated_safetensors, wrong_hidden_size, wrong_dtype, nan_weights,
            inf_weights, rank_100000, placements_10000, layer_out_of_range, unknown_family, symlink_escape,
            symlinked_weights, dotdot_escape, huge_json, garbage_config, gguf_wrong_hidden_size,
            gguf_layer_out_of_range, gguf_nan, gguf_truncated, gguf_oversized, pickle_steering_vector,
            caa_wrong_layer_count]
