"""GIFT checkpoints: read the WeGeFT/PEFT layout, express as LoRA pairs, write a PEFT LoRA dir."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from steer_serve.formats import detect_format, load_intervention
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.gift import convert_gift_dir, gift_to_lora, read_gift_dir, write_peft_lora_dir

D, KV, RANK, ALPHA, LAYERS = 8, 4, 2, 6.0, 3
TIED = [[r"model.layers.\d+.self_attn.q_proj"], [r"model.layers.\d+.self_attn.v_proj"]]


def base_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(32, D, generator=g), "lm_head.weight": torch.randn(32, D, generator=g)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(D, D, generator=g)
        sd[p + "self_attn.v_proj.weight"] = torch.randn(KV, D, generator=g)  # GQA: out != in
        sd[p + "self_attn.o_proj.weight"] = torch.randn(D, D, generator=g)  # not targeted
        sd[p + "input_layernorm.weight"] = torch.ones(D)
    return sd


def write_gift(path, *, tied=True, config=None, owners=None, seed=1):
    """A checkpoint as the GIFT PEFT fork saves it: phi/psi only on each tied group's first module."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    owners = owners if owners is not None else (
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"] if tied else
        [f"model.layers.{l}.self_attn.{m}" for l in range(LAYERS) for m in ("q_proj", "v_proj")])
    tensors = {}
    for module in owners:
        for kind in ("phi", "psi"):
            tensors[f"base_model.model.{module}.wegeft_{kind}.weight"] = torch.randn(RANK, D, generator=g)
    save_file(tensors, path / "adapter_model.safetensors")
    cfg = {"peft_type": "WeGeFT", "r": RANK, "wegeft_alpha": ALPHA, "target_modules": ["v_proj", "q_proj"],
           "tied_modules": TIED if tied else None, "transform_dim": {"q_proj": "input", "v_proj": "input"},
           "base_model_name_or_path": "org/tiny", "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
           "task_type": "CAUSAL_LM"}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


def upstream_forward(x, weight, phi, psi, scaling):
    """The GIFT fork's ``_forward_input_perspective`` for one linear layer (no bias)."""
    result = F.linear(x, weight)
    w_phi = F.linear(weight, phi)  # phi(weights): W φᵀ
    return result + F.linear(F.linear(x, psi), w_phi) * scaling


def test_read_tied_checkpoint(tmp_path):
    tensors = write_gift(tmp_path / "g")
    ckpt = read_gift_dir(tmp_path / "g")
    assert (ckpt.rank, ckpt.alpha, ckpt.scaling, ckpt.base_model) == (RANK, ALPHA, ALPHA / RANK, "org/tiny")
    assert sorted(ckpt.phi) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert torch.equal(ckpt.psi["model.layers.0.self_attn.v_proj"],
                       tensors["base_model.model.model.layers.0.self_attn.v_proj.wegeft_psi.weight"])
    assert ckpt.owner("model.layers.2.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert ckpt.owner("model.layers.2.self_attn.v_proj") == "model.layers.0.self_attn.v_proj"
    assert ckpt.is_target("model.layers.1.self_attn.v_proj") and not ckpt.is_target("model.layers.1.self_attn.o_proj")
    assert detect_format(tmp_path / "g") == "gift"


@pytest.mark.parametrize("tied", [True, False])
def test_lora_pairs_reproduce_gift(tmp_path, tied):
    write_gift(tmp_path / "g", tied=tied)
    ckpt = read_gift_dir(tmp_path / "g")
    sd = base_state_dict()
    pairs = gift_to_lora(ckpt, sd)
    expected = sorted(f"model.layers.{l}.self_attn.{m}" for l in range(LAYERS) for m in ("q_proj", "v_proj"))
    assert sorted(pairs) == expected
    x = torch.randn(5, D)
    for module, (A, B) in pairs.items():
        owner = ckpt.owner(module)
        W, phi, psi = sd[module + ".weight"], ckpt.phi[owner], ckpt.psi[owner]
        assert A.shape == (RANK, D) and B.shape == (W.shape[0], RANK)
        torch.testing.assert_close(B @ A, ckpt.scaling * (W @ phi.T) @ psi, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(F.linear(x, W + B @ A), upstream_forward(x, W, phi, psi, ckpt.scaling),
                                   rtol=1e-5, atol=1e-5)
    if tied:  # A = ψ is shared by every layer of a target module; B differs per layer
        assert torch.equal(pairs[expected[0]][0], pairs[expected[2]][0])
        assert not torch.equal(pairs[expected[0]][1], pairs[expected[2]][1])


def test_layers_to_transform(tmp_path):
    write_gift(tmp_path / "g", config={"layers_to_transform": [1]})
    assert sorted(gift_to_lora(read_gift_dir(tmp_path / "g"), base_state_dict())) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_write_peft_lora_dir(tmp_path):
    write_gift(tmp_path / "g")
    sd = base_state_dict()
    out = convert_gift_dir(tmp_path / "g", tmp_path / "lora", sd)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == RANK
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["base_model_name_or_path"] == "org/tiny"
    tensors = load_file(out / "adapter_model.safetensors")
    pairs = gift_to_lora(read_gift_dir(tmp_path / "g"), sd)
    assert len(tensors) == 2 * len(pairs)
    for module, (A, B) in pairs.items():
        assert torch.equal(tensors[f"base_model.model.{module}.lora_A.weight"], A)
        assert torch.equal(tensors[f"base_model.model.{module}.lora_B.weight"], B)
    with pytest.raises(FileExistsError):
        convert_gift_dir(tmp_path / "g", tmp_path / "lora", sd)
    half = write_peft_lora_dir(pairs, tmp_path / "lora16", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(half / "adapter_model.safetensors").values())


def test_vllm_loads_the_written_lora_dir(tmp_path):
    """vLLM's own LoRA loader reads the directory and yields the same ΔW = scaling · B A."""
    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    write_gift(tmp_path / "g")
    sd = base_state_dict()
    out = convert_gift_dir(tmp_path / "g", tmp_path / "lora", sd)
    helper = PEFTHelper.from_local_dir(str(out), max_position_embeddings=None)
    model = LoRAModel.from_local_checkpoint(str(out), {"q_proj", "v_proj"}, helper, lora_model_id=1,
                                            device="cpu", dtype=torch.float32)
    ckpt = read_gift_dir(tmp_path / "g")
    assert sorted(model.loras) == sorted(gift_to_lora(ckpt, sd))
    for module, lora in model.loras.items():
        owner = ckpt.owner(module)
        expected = ckpt.scaling * (sd[module + ".weight"] @ ckpt.phi[owner].T) @ ckpt.psi[owner]
        torch.testing.assert_close(lora.scaling * lora.lora_b @ lora.lora_a, expected, rtol=1e-5, atol=1e-5)


def test_gift_is_not_loaded_as_a_hidden_state_intervention(tmp_path):
    write_gift(tmp_path / "g")
    with pytest.raises(InterventionFormatError, match="GIFT checkpoints change weights") as e:
        load_intervention(tmp_path / "g")
    assert e.value.code == "weight_delta_format"


@pytest.mark.parametrize("config, match", [
    ({"peft_type": "LORA"}, "peft_type 'LORA'"),
    ({"transform_dim": {"q_proj": "output", "v_proj": "input"}}, "transform_dim 'output' for q_proj"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern is not supported"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 3}, r"expected 3 rows \(r\)"),
    ({"target_modules": []}, "target_modules is missing"),
])
def test_config_errors(tmp_path, config, match):
    write_gift(tmp_path / "g", config=config)
    with pytest.raises(InterventionFormatError, match=match):
        read_gift_dir(tmp_path / "g")


def test_weight_errors(tmp_path):
    write_gift(tmp_path / "a", owners=["model.layers.0.self_attn.q_proj"])
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.wegeft_psi.weight"]
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(InterventionFormatError, match="needs both wegeft_phi and wegeft_psi"):
        read_gift_dir(tmp_path / "a")

    write_gift(tmp_path / "b")
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(D)
    save_file(tensors, tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(InterventionFormatError, match="unexpected tensor .*q_proj.bias"):
        read_gift_dir(tmp_path / "b")

    write_gift(tmp_path / "c")
    tensors = load_file(tmp_path / "c" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.wegeft_phi.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "c" / "adapter_model.safetensors")
    with pytest.raises(InterventionFormatError, match="holds NaN/Inf"):
        read_gift_dir(tmp_path / "c")

    (tmp_path / "c" / "adapter_model.safetensors").unlink()
    with pytest.raises(InterventionFormatError, match="missing adapter_model.safetensors"):
        read_gift_dir(tmp_path / "c")


def test_conversion_errors(tmp_path):
    write_gift(tmp_path / "untied", tied=False, owners=["model.layers.0.self_attn.q_proj",
                                                        "model.layers.0.self_attn.v_proj"])
    with pytest.raises(InterventionFormatError, match="model.layers.1.self_attn.q_proj has no wegeft_phi/psi"):
        gift_to_lora(read_gift_dir(tmp_path / "untied"), base_state_dict())

    write_gift(tmp_path / "g")
    ckpt = read_gift_dir(tmp_path / "g")
    wrong = {k: torch.zeros(v.shape[0], 2 * D) if k.endswith("q_proj.weight") else v for k, v in base_state_dict().items()}
    with pytest.raises(InterventionFormatError, match=r"base weight \(8, 16\) does not fit wegeft_phi \(2, 8\)"):
        gift_to_lora(ckpt, wrong)
    with pytest.raises(InterventionFormatError, match="no module of the base model matches"):
        gift_to_lora(ckpt, {"model.layers.0.mlp.up_proj.weight": torch.zeros(D, D)})
