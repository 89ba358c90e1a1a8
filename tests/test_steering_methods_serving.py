"""Directional ablation, projection clamps and norm-preserving steering served per request equal a
transformers forward with the same math hooked on each decoder block's output (``block_output``), alone
and in one concurrent burst with a plain request."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
import torch
from safetensors.torch import load_file

from live_server import REPO
from steering_helpers import HIDDEN, complete, register, tokens
from steer_serve.interventions import reference_apply
from steer_serve.interventions.base import Edit, Intervention, Placement

PROMPT = [504, 3575, 282, 4649, 314]
NEW_TOKENS = 16
#: steering-vectors' happy/sad mean differences (tests/fixtures/data_control_vectors): directions that matter.
VECTORS = {int(k.split(".")[1]): v for k, v in
           load_file(str(REPO / "tests/fixtures/data_control_vectors/expected_vectors.safetensors")).items()
           if k.startswith("steering_vectors.")}
METHODS = {
    "ablation": ("directional_ablation", lambda v: {"direction": v}, {}),
    "ablation-mean": ("directional_ablation", lambda v: {"direction": v}, {"mean": 6.0}),
    "clamp": ("projection_clamp", lambda v: {"direction": v}, {"lo": 8.0, "hi": 9.0}),
    "clamp-hi": ("projection_clamp", lambda v: {"direction": v}, {"hi": -4.0}),
    "norm-preserving": ("norm_preserving_steering", lambda v: {"vector": 2.0 * v}, {}),
}


def method_intervention(name: str) -> Intervention:
    family, params, config = METHODS[name]
    edits = [Edit(family, Placement(layer, "block_output"), params(v), dict(config)) for layer, v in VECTORS.items()]
    return Intervention(edits, HIDDEN)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from steer_serve.model import prepare_default_model

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the server's side runs with ignore_eos
    return model


def hf_greedy(model, iv: Intervention | None) -> list[int]:
    """transformers' greedy tokens with each edit applied to its block's output (every position)."""
    def hook(edit):
        def fn(_m, _args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = reference_apply(edit, h.reshape(-1, h.shape[-1])).reshape(h.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return fn

    handles = [model.model.layers[e.placement.layer].register_forward_hook(hook(e)) for e in (iv.edits if iv else [])]
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    finally:
        for h in handles:
            h.remove()
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def hf_plain(hf_model):
    return hf_greedy(hf_model, None)


@pytest.fixture(scope="module")
def registered(server, intervention_dir):
    with httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=16)) as client:
        for name in METHODS:
            register(client, intervention_dir, f"method-{name}", method_intervention(name))
        yield client


@pytest.mark.parametrize("name", list(METHODS))
def test_method_equals_transformers_hooks(registered, hf_model, hf_plain, name):
    expected = hf_greedy(hf_model, method_intervention(name))
    assert expected != hf_plain, "the edit must change the greedy tokens"
    got = tokens(complete(registered, PROMPT, NEW_TOKENS, intervention=f"method-{name}", ignore_eos=True))
    assert got == expected


def test_methods_in_one_burst_equal_alone(registered):
    mixes = [{}] + [{"intervention": f"method-{name}"} for name in METHODS]
    alone = [tokens(complete(registered, PROMPT, NEW_TOKENS, ignore_eos=True, **m)) for m in mixes]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        together = list(pool.map(lambda m: tokens(complete(registered, PROMPT, NEW_TOKENS, ignore_eos=True, **m)),
                                 mixes))
    assert together == alone
    assert len({tuple(t) for t in together}) == len(mixes)
