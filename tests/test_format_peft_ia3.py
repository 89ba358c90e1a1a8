"""PEFT IA3 save directories read as ``elementwise_scale`` interventions, engine-free.

The adapters are peft 0.21.2's own ``save_pretrained`` (``tests/fixtures/make_peft_fixtures.py``); the
served tokens are compared with ``PeftModel.generate`` in ``test_peft_methods_serving.py``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steer_serve.formats import detect_format, load_intervention
from steer_serve.formats.adapters import adapter_format
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.interventions import apply_edit_lowrank, get_family

FIXTURES_PEFT = Path(__file__).parent / "fixtures" / "data_peft"
WIDTHS = {"query_output": 576, "key_output": 192, "value_output": 192, "attention_value_output": 576,
          "attention_output": 576, "mlp_activation": 1536, "mlp_output": 576}
#: the saved module (and whether it is a feedforward module) → the site its vector scales.
SITES = {"ia3": {("self_attn.k_proj", False): "key_output", ("self_attn.v_proj", False): "value_output",
                 ("mlp.down_proj", True): "mlp_activation"},
         "ia3_sites": {("self_attn.q_proj", False): "query_output", ("self_attn.o_proj", True): "attention_value_output",
                       ("mlp.up_proj", False): "mlp_activation", ("mlp.down_proj", False): "mlp_output"}}


def saved_vectors(name: str) -> dict[tuple[int, str, bool], torch.Tensor]:
    """``(layer, module, feedforward) → ia3_l`` as peft saved it."""
    out = {}
    for key, tensor in load_file(str(FIXTURES_PEFT / name / "adapter_model.safetensors")).items():
        layer, module = key.removeprefix("base_model.model.model.layers.").removesuffix(".ia3_l").split(".", 1)
        out[(int(layer), module, tensor.shape[0] == 1)] = tensor.flatten()
    return out


@pytest.mark.parametrize("name", sorted(SITES))
def test_every_vector_lands_at_its_site(name):
    directory = FIXTURES_PEFT / name
    assert detect_format(directory) == "peft_ia3" and adapter_format(directory) is None
    iv = load_intervention(directory, hidden_size=576, num_layers=30)
    assert iv.positions == "all" and iv.source_format == "peft_ia3"
    placed = {(e.placement.layer, e.placement.component): e for e in iv.edits}
    vectors = saved_vectors(name)
    assert len(placed) == len({(layer, SITES[name][(m, ff)]) for layer, m, ff in vectors})
    for (layer, module, feedforward), vector in vectors.items():
        component = SITES[name][(module, feedforward)]
        edit = placed[(layer, component)]
        assert edit.family == "elementwise_scale" and iv.edit_width(edit) == WIDTHS[component]
        assert torch.equal(edit.params["scaling"], vector)  # one vector per site in these adapters


def test_generic_form_is_the_elementwise_product():
    family = get_family("elementwise_scale")
    gen = torch.Generator().manual_seed(3)
    h, s = torch.randn(5, 192, generator=gen), 1 + 0.5 * torch.randn(192, generator=gen)
    assert torch.allclose(family.apply(h, {"scaling": s}, {}), h * s)
    assert torch.allclose(apply_edit_lowrank(h, family.to_lowrank({"scaling": s}, {})), h * s, atol=1e-6)
    assert torch.allclose(apply_edit_lowrank(h, family.to_lowrank({"scaling": s}, {}), 0.5), h * (1 + (s - 1) / 2),
                          atol=1e-6)


def test_vectors_meeting_at_one_site_multiply(tmp_path):
    """up_proj's output and down_proj's input both scale the MLP activation."""
    gen = torch.Generator().manual_seed(4)
    up, down = torch.rand(1536, 1, generator=gen) + 0.5, torch.rand(1, 1536, generator=gen) + 0.5
    directory = _adapter(tmp_path, {"base_model.model.model.layers.2.mlp.up_proj.ia3_l": up,
                                    "base_model.model.model.layers.2.mlp.down_proj.ia3_l": down})
    (edit,) = load_intervention(directory, hidden_size=576).edits
    assert edit.placement.component == "mlp_activation"
    assert torch.allclose(edit.params["scaling"], up.flatten() * down.flatten())


@pytest.mark.parametrize("key, shape, message", [
    ("mlp.gate_proj", (1536, 1), "mlp.gate_proj scales its output"),
    ("self_attn.q_proj", (1, 576), "self_attn.q_proj scales its input"),
    ("self_attn.k_proj.lora_A", (4, 576), "unexpected weight"),
])
def test_sites_without_a_served_site_are_a_400_naming_them(tmp_path, key, shape, message):
    name = key if key.endswith("lora_A") else f"{key}.ia3_l"
    directory = _adapter(tmp_path, {f"base_model.model.model.layers.1.{name}": torch.ones(shape)})
    with pytest.raises(InterventionFormatError) as err:
        load_intervention(directory, hidden_size=576)
    assert message in err.value.message and err.value.code == "invalid_peft_ia3"


def test_modules_to_save_is_refused(tmp_path):
    directory = tmp_path / "ia3"
    shutil.copytree(FIXTURES_PEFT / "ia3", directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(InterventionFormatError) as err:
        load_intervention(directory, hidden_size=576)
    assert err.value.param == "modules_to_save"


def _adapter(tmp_path: Path, weights: dict[str, torch.Tensor]) -> Path:
    directory = tmp_path / "ia3"
    directory.mkdir()
    config = json.loads((FIXTURES_PEFT / "ia3" / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(directory / "adapter_model.safetensors"))
    return directory
