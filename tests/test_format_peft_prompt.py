"""PEFT prompt tuning / P-tuning / multitask prompt tuning read as virtual tokens, engine-free.

Reference: the embeddings peft 0.21.2's reloaded ``PeftModel`` prepends (``get_prompt``), recorded by
``tests/fixtures/make_peft_fixtures.py`` next to each ``save_pretrained`` directory; the served tokens
are compared with ``PeftModel.generate`` in ``test_peft_methods_serving.py``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steer_serve.formats.adapters import adapter_format
from steer_serve.formats.errors import InterventionFormatError
from steer_serve.formats.peft_prompt import load_prompt_adapter, prompt_format

FIXTURES_PEFT = Path(__file__).parent / "fixtures" / "data_peft"
METHODS = ["prompt_tuning", "p_tuning", "multitask_prompt_tuning"]
HIDDEN = 576


def case(method: str) -> dict:
    return json.loads((FIXTURES_PEFT / f"{method}.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_virtual_tokens_equal_peft_get_prompt(method, tmp_path):
    directory = FIXTURES_PEFT / method
    assert prompt_format(directory) == f"peft_{method}" and adapter_format(directory) is None
    prompt = load_prompt_adapter(directory, tmp_path, hidden_size=HIDDEN, task_id=case(method).get("task_id"))
    want = load_file(str(FIXTURES_PEFT / f"{method}.virtual.safetensors"))["virtual_tokens"]
    assert prompt.virtual_tokens.shape == (case(method)["num_virtual_tokens"], HIDDEN)
    torch.testing.assert_close(prompt.virtual_tokens, want, rtol=0, atol=1e-6)
    again = load_prompt_adapter(prompt.path, tmp_path, hidden_size=HIDDEN)  # the owned copy reads back as saved
    assert torch.equal(again.virtual_tokens, prompt.virtual_tokens) and again.content_hash == prompt.content_hash


def test_multitask_needs_a_task_and_others_take_none(tmp_path):
    with pytest.raises(InterventionFormatError) as err:
        load_prompt_adapter(FIXTURES_PEFT / "multitask_prompt_tuning", tmp_path, hidden_size=HIDDEN)
    assert err.value.param == "task_id" and "[0, 2)" in err.value.message
    with pytest.raises(InterventionFormatError) as err:
        load_prompt_adapter(FIXTURES_PEFT / "multitask_prompt_tuning", tmp_path, hidden_size=HIDDEN, task_id=2)
    assert err.value.param == "task_id"
    with pytest.raises(InterventionFormatError) as err:
        load_prompt_adapter(FIXTURES_PEFT / "prompt_tuning", tmp_path, hidden_size=HIDDEN, task_id=0)
    assert err.value.param == "task_id"
    assert list(tmp_path.iterdir()) == []


def test_tasks_give_different_tokens(tmp_path):
    first, second = (load_prompt_adapter(FIXTURES_PEFT / "multitask_prompt_tuning", tmp_path, hidden_size=HIDDEN,
                                         task_id=t) for t in (0, 1))
    assert not torch.equal(first.virtual_tokens, second.virtual_tokens)
    assert first.content_hash != second.content_hash


def test_width_other_than_the_model_is_refused(tmp_path):
    with pytest.raises(InterventionFormatError) as err:
        load_prompt_adapter(FIXTURES_PEFT / "prompt_tuning", tmp_path / "out", hidden_size=HIDDEN + 1)
    assert err.value.param == "token_dim"


def test_encoder_decoder_prompts_are_refused(tmp_path):
    directory = tmp_path / "pt"
    shutil.copytree(FIXTURES_PEFT / "prompt_tuning", directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "num_transformer_submodules": 2}))
    with pytest.raises(InterventionFormatError) as err:
        load_prompt_adapter(directory, tmp_path / "out", hidden_size=HIDDEN)
    assert err.value.param == "num_transformer_submodules"
