"""Save-dir layouts written by the real pyreft 0.1.0 / pyvene 0.1.8 (``fixtures/data_layouts``, see
the fixtures README): pyreft's ``share_weights=False`` layout for ``f<n>+l<n>`` and pyvene's
string-addressed components. Reader level; the served tokens are in ``test_layouts_serving.py``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixture_cases import DATA, assert_param_equal
from steer_serve.engine.architectures import ARCHITECTURES
from steer_serve.formats import load_intervention
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.module_paths import _hf_hook_point, resolve_module_path
from steer_serve.formats.native import read_native, save_native
from steer_serve.formats.pyreft import read_pyreft_dir
from steer_serve.formats.pyvene import read_pyvene_dir
from steer_serve.interventions import reference_apply
from steer_serve.interventions.base import Placement
from steer_serve.interventions.positions import parse_positions, window_part

LAYOUTS = DATA.parent / "data_layouts"
SPLIT = LAYOUTS / "pyreft_split" / "save"
STRING_TINY = LAYOUTS / "pyvene_string_tiny"


def _split_doc(positions: str) -> dict:
    return json.loads((LAYOUTS / "generation" / f"pyreft_split_{positions}.json").read_text())


def test_split_layout_reads_as_saved():
    """Two LoReFTs at layer 15 in one dir: each keeps pyreft's own weights and gets its half."""
    iv = read_pyreft_dir(SPLIT)
    assert iv.positions == "f1+l1"  # pyreft's training default, implied by the layout
    assert [(e.placement, e.window) for e in iv.edits] == [(Placement(15), "first"), (Placement(15), "last")]
    want = load_file(LAYOUTS / "pyreft_split" / "params.safetensors")
    for i, edit in enumerate(iv.edits):
        mine = {k.split(".", 1)[1]: v for k, v in want.items() if k.startswith(f"{i}.")}
        assert set(edit.params) == set(mine)
        for name, tensor in mine.items():
            assert_param_equal(name, edit.params[name], tensor)


@pytest.mark.parametrize("positions", ["f1+l1", "f2+l2"])
def test_split_edits_act_on_pyreft_locations(positions):
    """Each edit's positions are what pyreft's get_intervention_locations(share_weights=False) gave it."""
    iv = read_pyreft_dir(SPLIT, positions=positions)
    for prompt in _split_doc(positions)["prompts"]:
        n = len(prompt["prompt_ids"])
        got = [np.flatnonzero(parse_positions(window_part(iv.positions, e.window)).mask(np.arange(n), n)).tolist()
               for e in iv.edits]
        assert got == prompt["locations"], prompt["text"]


def test_window_outside_a_two_sided_window_is_the_whole_positions():
    """pyreft gives every intervention the same locations unless both counts are non-zero."""
    assert [window_part("f2+l3", w) for w in ("first", "last", None)] == ["f2", "l3", "f2+l3"]
    assert [window_part(p, "first") for p in ("l1", "f2", "all", "prompt")] == ["l1", "f2", "all", "prompt"]


def test_split_layout_survives_the_native_round_trip(tmp_path):
    """The registry persists interventions natively: the halves must come back."""
    iv = read_pyreft_dir(SPLIT)
    back = read_native(save_native(iv, tmp_path / "native"))
    assert [e.window for e in back.edits] == ["first", "last"] and back.positions == "f1+l1"


def test_string_components_resolve_to_the_named_sites():
    expected = json.loads((STRING_TINY / "expected.json").read_text())
    iv = read_pyvene_dir(STRING_TINY / "save")
    assert [[e.placement.layer, e.placement.component] for e in iv.edits] == expected["sites"]
    want = load_file(STRING_TINY / "params.safetensors")
    for i, edit in enumerate(iv.edits):
        assert torch.equal(edit.params["source"], want[f"{i}.source"])


def _hf_logits(model, iv, ids: list[int]) -> torch.Tensor:
    """The tiny Llama's logits with each edit's reference forward hooked at its placement."""
    def edit_output(edit):
        def hook(_module, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = reference_apply(edit, h[0]).unsqueeze(0)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    def edit_input(edit):
        return lambda _module, args: (reference_apply(edit, args[0][0]).unsqueeze(0), *args[1:])

    handles = []
    for edit in iv.edits:
        layer = model.model.layers[edit.placement.layer]
        component = edit.placement.component
        if component == "attention_value_output":
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(edit_input(edit)))
        else:
            module = {"block_output": layer, "mlp_output": layer.mlp, "attention_output": layer.self_attn}[component]
            handles.append(module.register_forward_hook(edit_output(edit)))
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def test_string_components_reproduce_pyvene_logits():
    """Placed where the reader says, the four edits give pyvene's own intervened logits."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(DATA / "tiny_llama", dtype=torch.float32).eval()
    expected = json.loads((STRING_TINY / "expected.json").read_text())
    io = load_file(STRING_TINY / "io.safetensors")
    got = _hf_logits(model, read_pyvene_dir(STRING_TINY / "save"), expected["input_ids"])
    assert (io["logits"] - io["plain_logits"]).abs().max() > 1e-2
    torch.testing.assert_close(got, io["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_resolves_its_sites(architecture):
    table = ARCHITECTURES[architecture]
    for component, site in table.sites.items():
        hook_point = _hf_hook_point(site)
        if hook_point is None:  # GPT-2's fused c_attn slices have no module of their own in HF
            continue
        path = ".".join(filter(None, [f"{table.layers}[7]", *hook_point]))
        assert resolve_module_path(path) == (7, component), path
        bare = path.split(".", 1)[1] if "." in table.layers else path  # the bare model's own naming
        assert resolve_module_path(bare) == (7, component), bare


@pytest.mark.parametrize("path", ["model.layers[1].self_attn.rotary_emb.output", "model.layers[1].mlp.down_proj.output",
                                  "model.embed_tokens.output", "lm_head.output", "model.layers[x].output"])
def test_unsupported_module_path_is_a_format_error(tmp_path, path):
    d = tmp_path / "save"
    shutil.copytree(STRING_TINY / "save", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["representations"][1][1] = path
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InterventionFormatError, match="names no site steer-serve serves") as err:
        load_intervention(d)
    assert err.value.code == "unsupported_component"


def test_split_layout_over_two_layers_is_halves_not_pairs(tmp_path):
    """pyreft doubles the whole layer list ([3, 15] -> [3, 15, 3, 15]): the first half acts on the first n."""
    cfg = json.loads((SPLIT / "config.json").read_text())
    rep, keys = cfg["representations"][0], []
    d = tmp_path / "save"
    d.mkdir()
    for i, layer in enumerate([3, 15, 3, 15]):
        key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{i // 2}"
        shutil.copy(SPLIT / f"intkey_layer_15_comp_block_output_unit_pos_nunit_1#{i // 2}.bin", d / f"intkey_{key}.bin")
        keys.append(key)
    cfg.update(representations=[[layer, *rep[1:]] for layer in (3, 15, 3, 15)], sorted_keys=keys,
               intervention_types=cfg["intervention_types"] * 2, intervention_dimensions=cfg["intervention_dimensions"] * 2)
    (d / "config.json").write_text(json.dumps(cfg))
    iv = read_pyreft_dir(d)
    assert [(e.placement.layer, e.window) for e in iv.edits] == [(3, "first"), (15, "first"), (3, "last"), (15, "last")]
