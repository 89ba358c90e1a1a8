"""PEFT methods converted to a LoRA at registration (AdaLoRA, LoHa, LoKr, VeRA) and those refused, engine-free.

Reference: peft 0.21.2's own ``get_delta_weight`` on the adapter reloaded with ``PeftModel.from_pretrained``,
recorded by ``tests/fixtures/make_peft_fixtures.py`` (first rows of one module's ΔW and ΔW times a probe).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steer_serve.formats.adapters import adapter_format, load_weight_adapter
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.model import DEFAULT_MODEL_NAME, cache_dir

FIXTURES_PEFT = Path(__file__).parent / "fixtures" / "data_peft"
CONVERTED = {"adalora": 4, "loha": 4, "lokr": 8, "vera": 8}   # method → LoRA rank once converted
REFUSED = ["prefix_tuning", "adaption_prompt", "oft", "boft", "poly"]


@pytest.fixture(scope="module")
def base_model_dir():
    path = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (path / "model.safetensors").is_file():
        pytest.skip("the default model is not converted (python -m steer_serve.model)")
    return str(path)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("method", sorted(CONVERTED))
def test_converted_delta_equals_peft(method, base_model_dir, tmp_path):
    assert adapter_format(FIXTURES_PEFT / method) == f"peft_{method}"
    adapter = load_weight_adapter(FIXTURES_PEFT / method, tmp_path, base_model_dir=base_model_dir, max_rank=16)
    assert adapter.rank == CONVERTED[method] and adapter.source_format == f"peft_{method}"
    assert adapter.target_modules == ["q_proj", "v_proj"]
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == CONVERTED[method]
    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    with safe_open(str(FIXTURES_PEFT / f"{method}.delta.safetensors"), framework="pt") as f:
        module = f.metadata()["module"]
        reference = {k: f.get_tensor(k) for k in f.keys()}
    a = weights[f"base_model.model.{module}.lora_A.weight"].double()
    b = weights[f"base_model.model.{module}.lora_B.weight"].double()
    delta = b @ a
    rows = reference["delta_rows"].shape[0]
    assert relative_error(delta[:rows], reference["delta_rows"].double()) < 1e-6
    assert relative_error(delta @ reference["probe"].double(), reference["delta_probe"].double()) < 1e-6
    assert len({k.rsplit(".", 2)[0] for k in weights}) == 8   # 4 layers × q_proj, v_proj


def test_adalora_keeps_init_r_after_its_rank_pattern(base_model_dir, tmp_path):
    """The recorded module had one of its 4 ranks masked: peft still divides by init_r, and so must we."""
    saved = load_file(str(FIXTURES_PEFT / "adalora" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.4.self_attn.v_proj.lora_A"].shape[0] == 3
    config = json.loads((FIXTURES_PEFT / "adalora" / "adapter_config.json").read_text())
    wrong = tmp_path / "adalora-init-r-2"
    shutil.copytree(FIXTURES_PEFT / "adalora", wrong)
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "init_r": 2}))
    adapter = load_weight_adapter(wrong, tmp_path / "out", base_model_dir=base_model_dir, max_rank=16)
    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    with safe_open(str(FIXTURES_PEFT / "adalora.delta.safetensors"), framework="pt") as f:
        module, reference = f.metadata()["module"], f.get_tensor("delta_probe").double()
        probe = f.get_tensor("probe").double()
    delta = (weights[f"base_model.model.{module}.lora_B.weight"].double()
             @ weights[f"base_model.model.{module}.lora_A.weight"].double())
    assert relative_error(delta @ probe, reference * 2) < 1e-5   # (4 + 1e-5) / (2 + 1e-5)


@pytest.mark.parametrize("method", sorted(CONVERTED))
def test_rank_above_max_lora_rank_is_refused_before_writing(method, base_model_dir, tmp_path):
    with pytest.raises(InterventionFormatError) as err:
        load_weight_adapter(FIXTURES_PEFT / method, tmp_path, base_model_dir=base_model_dir,
                            max_rank=CONVERTED[method] - 1)
    assert err.value.code == "rank_too_large"
    assert f"rank {CONVERTED[method]}" in str(err.value) and f"--max-lora-rank {CONVERTED[method] - 1}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", REFUSED)
def test_unservable_methods_are_refused_by_name(method):
    peft_type = json.loads((FIXTURES_PEFT / "refused" / method / "adapter_config.json").read_text())["peft_type"]
    with pytest.raises(InterventionFormatError) as err:
        adapter_format(FIXTURES_PEFT / "refused" / method)
    assert err.value.code == "unsupported_peft_type" and f"PEFT {peft_type} adapters" in str(err.value)


@pytest.mark.parametrize("option, value", [("modules_to_save", ["lm_head"]), ("alpha_pattern", {"q_proj": 2})])
def test_options_that_change_the_delta_are_refused(option, value, base_model_dir, tmp_path):
    adapter = tmp_path / "loha"
    shutil.copytree(FIXTURES_PEFT / "loha", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    with pytest.raises(InterventionFormatError) as err:
        load_weight_adapter(adapter, tmp_path / "out", base_model_dir=base_model_dir, max_rank=16)
    assert option in str(err.value)


def test_vera_without_its_projection_is_refused(base_model_dir, tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "vera"
    shutil.copytree(FIXTURES_PEFT / "vera", adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "vera_A" not in k and "vera_B" not in k},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(InterventionFormatError) as err:
        load_weight_adapter(adapter, tmp_path / "out", base_model_dir=base_model_dir, max_rank=16)
    assert "save_projection" in str(err.value)


def test_tensors_of_inconsistent_shapes_are_a_format_error(base_model_dir, tmp_path):
    from safetensors.torch import save_file

    adapter = tmp_path / "loha"
    shutil.copytree(FIXTURES_PEFT / "loha", adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.4.self_attn.q_proj.hada_w2_b"
    save_file({**weights, key: weights[key][:, :100].contiguous()}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(InterventionFormatError) as err:
        load_weight_adapter(adapter, tmp_path / "out", base_model_dir=base_model_dir, max_rank=16)
    assert "inconsistent shapes" in str(err.value)


def test_dora_is_its_lora_plus_output_scales(base_model_dir, tmp_path):
    """DoRA's y = g ⊙ (W + s·BA)x, g = m / ‖W + s·BA‖ per row (peft/tuners/lora/dora.py): the LoRA pair and g."""
    adapter = load_weight_adapter(FIXTURES_PEFT / "dora", tmp_path, base_model_dir=base_model_dir, max_rank=16)
    config = json.loads((FIXTURES_PEFT / "dora" / "adapter_config.json").read_text())
    saved = load_file(str(FIXTURES_PEFT / "dora" / "adapter_model.safetensors"))
    served = load_file(str(adapter.path / "adapter_model.safetensors"))
    assert adapter.source_format == "peft_dora" and adapter.rank == config["r"]
    sites = {"q_proj": "query_output", "v_proj": "value_output", "o_proj": "attention_output",
             "down_proj": "mlp_output"}
    assert set(adapter.output_scales) == {(layer, c) for layer in (4, 5) for c in sites.values()}
    with safe_open(str(Path(base_model_dir) / "model.safetensors"), framework="pt") as f:
        for layer in (4, 5):
            for name, component in sites.items():
                module = f"model.layers.{layer}.{'mlp' if name == 'down_proj' else 'self_attn'}.{name}"
                prefix = f"base_model.model.{module}"
                a, b = saved[f"{prefix}.lora_A.weight"], saved[f"{prefix}.lora_B.weight"]
                scaled_b = b * config["lora_alpha"] / config["r"]
                magnitude = next(v for k, v in saved.items() if k.startswith(f"{prefix}.lora_magnitude_vector"))
                g = magnitude / (f.get_tensor(f"{module}.weight") + scaled_b @ a).norm(dim=1)
                torch.testing.assert_close(adapter.output_scales[(layer, component)], g, rtol=1e-5, atol=0)
                torch.testing.assert_close(served[f"{prefix}.lora_B.weight"] @ served[f"{prefix}.lora_A.weight"],
                                           scaled_b @ a, rtol=1e-5, atol=1e-7)
    again = load_weight_adapter(adapter.path, tmp_path, base_model_dir=base_model_dir, max_rank=16)
    assert again.content_hash == adapter.content_hash and again.output_scales.keys() == adapter.output_scales.keys()


def test_dora_on_a_module_without_a_served_output_site_is_refused(base_model_dir, tmp_path):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    config = json.loads((FIXTURES_PEFT / "dora" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.1.mlp.gate_proj"
    save_file({f"{prefix}.lora_A.weight": torch.ones(2, 576), f"{prefix}.lora_B.weight": torch.ones(1536, 2),
               f"{prefix}.lora_magnitude_vector": torch.ones(1536)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(InterventionFormatError) as err:
        load_weight_adapter(adapter, tmp_path / "out", base_model_dir=base_model_dir, max_rank=16)
    assert "mlp.gate_proj's output has no served site" in err.value.message
