"""GIFT checkpoints written by GIFT's own ``GIFTWrapperForCausalLM.save`` (tests/fixtures/_gift_worker.py,
tiny Llama): the LoRA pairs reproduce GIFT's own ΔW for every targeted module."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.gift_wrapper import gift_root, gift_wrapper_to_lora, read_gift_wrapper

DATA = Path(__file__).parent / "fixtures" / "data_gift"
BASE = load_file(str(Path(__file__).parent / "fixtures" / "data" / "tiny_llama" / "model.safetensors"))


@pytest.mark.parametrize("case, rank", [("gift_identity", 4), ("gift_gelu_bias", 4), ("gift_shared_bf16", 5)])
def test_lora_pairs_equal_gifts_own_delta(case, rank):
    expected = load_file(str(DATA / case / "delta.safetensors"))
    pairs = gift_wrapper_to_lora(read_gift_wrapper(DATA / case / "save"), BASE)
    assert sorted(pairs) == sorted(expected)
    for module, (a, b) in pairs.items():
        assert a.shape[0] == rank and b.shape[1] == rank
        want = expected[module].float()
        tol = 1e-2 if case.endswith("bf16") else 1e-6  # GIFT rounds its bf16 ΔW; LoRA keeps the product exact
        torch.testing.assert_close(b @ a, want, rtol=tol, atol=tol * want.abs().max().item())


def test_config_dir_and_errors(tmp_path):
    assert gift_root(DATA / "gift_identity" / "save" / "config") == DATA / "gift_identity" / "save"
    assert gift_root(DATA / "gift_identity") is None
    with pytest.raises(InterventionFormatError, match="matches no linear layer"):
        gift_wrapper_to_lora(read_gift_wrapper(DATA / "gift_identity" / "save"), {"x.weight": torch.zeros(2, 2)})


def test_registers_as_a_lora_adapter(tmp_path):
    from steer_serve.formats.adapters import adapter_format, load_weight_adapter

    save = DATA / "gift_gelu_bias" / "save"
    assert adapter_format(save) == adapter_format(save / "config") == "gift"
    adapter = load_weight_adapter(save, tmp_path, base_model_dir=str(Path(__file__).parent / "fixtures" / "data" /
                                                                     "tiny_llama"), max_rank=16)
    assert adapter.rank == 4 and adapter.target_modules == ["down_proj", "q_proj"]
    with pytest.raises(InterventionFormatError, match="rank 4 exceeds"):
        load_weight_adapter(save, tmp_path / "b", base_model_dir=str(Path(__file__).parent / "fixtures" / "data" /
                                                                     "tiny_llama"), max_rank=2)
