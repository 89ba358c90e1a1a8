"""Per-request interventions inside vLLM's continuous batch (issue: engine integration).

References: pyreft's own ``ReftModel.generate`` (recorded fixtures), each request run alone, and an
independent Hugging Face transformers forward with the reference family math hooked in.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch

from live_server import FIXTURES
from steering_helpers import HIDDEN, complete, hook_hf_module, random_loreft, random_vector, register, tokens

GENERATION = sorted((FIXTURES / "generation").glob("*.json"))
PROMPTS = [[504, 3575, 282, 4649, 314], [1780, 314, 253, 1345, 282, 3233, 30], [19556, 1172, 28, 2013, 28, 216],
           [2020, 253, 655, 28, 665, 436], [504, 1345, 282, 9371, 314]]


@pytest.mark.parametrize("path", GENERATION, ids=[p.stem for p in GENERATION])
def test_greedy_equals_pyreft_generate(client, path):
    case = json.loads(path.read_text())
    name = f"pyreft-{path.stem.replace('+', '-')}"
    response = client.post("/v1/interventions", json={"id": name, "source": str(FIXTURES / case["intervention_dir"]),
                                                      "positions": case["positions"]})
    assert response.status_code == 201, response.text
    for prompt in case["prompts"]:
        steered = complete(client, prompt["prompt_ids"], case["max_new_tokens"], intervention=name)
        plain = complete(client, prompt["prompt_ids"], case["max_new_tokens"])
        assert tokens(steered) == prompt["steered_ids"], prompt["text"]
        assert tokens(plain) == prompt["unsteered_ids"], prompt["text"]


@pytest.fixture(scope="module")
def six_interventions(server, intervention_dir):
    names = []
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for i, (layer, positions) in enumerate([(3, "all"), (10, "l1"), (15, "f1+l1"), (20, "prompt"),
                                                (25, "generated"), (12, "f2+l2")]):
            name = f"mix-{i}"
            register(client, intervention_dir, name, random_loreft(100 + i, layer, positions=positions))
            names.append(name)
    return names


def _requests(names):
    """16 requests mixing 6 interventions, a two-intervention combo and none."""
    reqs = []
    for i in range(16):
        fields = {}
        if i % 8 == 7:
            fields = {"interventions": [{"id": names[0]}, {"id": names[2], "scale": 0.5}]}
        elif i % 8:
            fields = {"intervention": names[i % 6]}
        reqs.append((PROMPTS[i % len(PROMPTS)], fields))
    return reqs


def test_no_cross_talk_in_one_batch(server, six_interventions):
    reqs = _requests(six_interventions)
    with httpx.Client(base_url=server.url, timeout=300) as c:
        alone = [tokens(complete(c, p, **f)) for p, f in reqs]
    with cf.ThreadPoolExecutor(16) as pool, httpx.Client(base_url=server.url, timeout=300,
                                                         limits=httpx.Limits(max_connections=32)) as c:
        together = list(pool.map(lambda r: tokens(complete(c, r[0], **r[1])), reqs))
    assert together == alone
    with httpx.Client(base_url=server.url, timeout=300) as c:
        plain = {tuple(p): tokens(complete(c, p)) for p, _ in reqs}
    steered_differs = [alone[i] != plain[tuple(p)] for i, (p, f) in enumerate(reqs) if f]
    assert sum(steered_differs) >= len(steered_differs) // 2, "interventions should change most outputs"
    for i, (p, f) in enumerate(reqs):
        if not f:
            assert alone[i] == plain[tuple(p)]


def _hf_greedy(prompt, max_new_tokens, hook_module_name=None, edit_fn=None, where="output", columns=None):
    """Greedy tokens from transformers with ``edit_fn`` hooked where pyvene hooks the component."""
    from transformers import AutoModelForCausalLM

    from steer_serve.model import prepare_default_model

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the server's side runs with ignore_eos
    if hook_module_name:
        hook_hf_module(model.get_submodule(hook_module_name), where, edit_fn, columns)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(prompt):].tolist()


#: SmolLM2-135M: 9 query heads and 3 key/value heads of 64, MLP 1536 wide.
_WIDTHS = {"query_output": 576, "key_output": 192, "value_output": 192, "mlp_activation": 1536,
           "attention_value_output": 576}
_HEADS = {"query_output": 9, "key_output": 3, "value_output": 3, "attention_value_output": 9}
#: Keys only move attention weights: a stronger edit is needed to change 16 greedy tokens.
_STRENGTH = {"key_output": 40.0}


@pytest.mark.parametrize("component,module,where,head", [
    ("block_input", "model.layers.8", "input", None),
    ("block_input", "model.layers.0", "input", None),   # the first layer gets no residual
    ("block_output", "model.layers.8", "output", None),
    ("block_output", "model.layers.29", "output", None),  # the last layer feeds the final norm
    ("attention_input", "model.layers.8.self_attn", "input", None),
    ("attention_output", "model.layers.8.self_attn", "output", None),
    ("attention_value_output", "model.layers.8.self_attn.o_proj", "input", None),
    ("head_attention_value_output", "model.layers.8.self_attn.o_proj", "input", 4),
    ("query_output", "model.layers.8.self_attn.q_proj", "output", None),
    ("key_output", "model.layers.8.self_attn.k_proj", "output", None),
    ("value_output", "model.layers.8.self_attn.v_proj", "output", None),
    ("head_key_output", "model.layers.8.self_attn.k_proj", "output", 1),
    ("head_value_output", "model.layers.8.self_attn.v_proj", "output", 2),
    ("mlp_input", "model.layers.8.mlp", "input", None),
    ("mlp_activation", "model.layers.8.mlp.act_fn", "output", None),
    ("mlp_output", "model.layers.8.mlp", "output", None),
])
def test_components_match_transformers_hooks(client, intervention_dir, component, module, where, head):
    """Every pyvene component (and per-head forms) on the default model: a LoReFT through the server
    gives the tokens of transformers with the same edit hooked on the module pyvene names."""
    from steer_serve.interventions import reference_apply

    layer = int(module.split(".")[2])
    base = component.removeprefix("head_")
    width = _WIDTHS.get(base, HIDDEN)
    iv = random_loreft(7, layer=layer, component=component, strength=_STRENGTH.get(base, 6.0), width=width, head=head,
                       num_heads=_HEADS.get(base))
    name = f"component-{component}-{layer}"
    register(client, intervention_dir, name, iv)

    def edit(h):
        flat = h.reshape(-1, h.shape[-1])
        return reference_apply(iv, flat).reshape(h.shape)

    prompt = PROMPTS[0]
    expected = _hf_greedy(prompt, 16, module, edit, where)
    assert tokens(complete(client, prompt, 16, intervention=name, ignore_eos=True)) == expected
    assert expected != _hf_greedy(prompt, 16)


def test_model_field_names_an_intervention(client, intervention_dir):
    register(client, intervention_dir, "as-model", random_vector(3, 6, "block_output"))
    by_model = complete(client, PROMPTS[1], model="as-model")
    by_field = complete(client, PROMPTS[1], intervention="as-model")
    assert tokens(by_model) == tokens(by_field) != tokens(complete(client, PROMPTS[1]))
    missing = client.post("/v1/completions", json={"prompt": "hi", "intervention": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "intervention_not_found"
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "as-model" in models


def test_scale_zero_equals_plain_and_scale_changes_output(client, intervention_dir):
    register(client, intervention_dir, "scaled", random_loreft(11, 14))
    plain = tokens(complete(client, PROMPTS[2]))
    assert tokens(complete(client, PROMPTS[2], interventions=[{"id": "scaled", "scale": 0.0}])) == plain
    assert tokens(complete(client, PROMPTS[2], interventions=[{"id": "scaled", "scale": 1.0}])) != plain


def test_prefix_cache_isolated_between_sets_and_shared_within(client, intervention_dir):
    register(client, intervention_dir, "cache-a", random_loreft(21, 9, positions="all"))
    register(client, intervention_dir, "cache-b", random_loreft(22, 9, positions="all"))
    long_prompt = "Describe the history of the city of Lyon in great detail. " * 30
    first = complete(client, long_prompt, 12, intervention="cache-a")
    other = complete(client, long_prompt, 12, intervention="cache-b")
    again = complete(client, long_prompt, 12, intervention="cache-a")
    plain = complete(client, long_prompt, 12)
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    assert tokens(again) == tokens(first)
    other_again = complete(client, long_prompt, 12, intervention="cache-b")
    assert other_again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    assert tokens(other_again) == tokens(other) != tokens(first)


def test_chunked_prefill_and_more_interventions_than_slots(small_server, server, intervention_dir):
    """2 slots, 32-token steps: 5 interventions in concurrent use; results equal the big server's."""
    long_prompt = "In the beginning the universe was created. This has made a lot of people very angry. " * 4
    names = [f"pool-{i}" for i in range(5)]
    positions = ["l1", "f1+l1", "all", "prompt", "generated"]
    with httpx.Client(base_url=server.url, timeout=300) as big, \
            httpx.Client(base_url=small_server.url, timeout=600, limits=httpx.Limits(max_connections=32)) as small:
        for i, name in enumerate(names):
            register(big, intervention_dir, name, random_loreft(40 + i, 5 + 4 * i, positions=positions[i]))
            register(small, intervention_dir, name, random_loreft(40 + i, 5 + 4 * i, positions=positions[i]))
        reqs = [(long_prompt if i % 2 else PROMPTS[i % 5], names[i % 5]) for i in range(10)]
        expected = [tokens(complete(big, p, 16, intervention=n)) for p, n in reqs]
        with cf.ThreadPoolExecutor(10) as pool:
            got = list(pool.map(lambda r: tokens(complete(small, r[0], 16, intervention=r[1])), reqs))
        assert got == expected
        listed = {e["id"]: e for e in small.get("/v1/interventions").json()["data"]}
        assert sum(1 for e in listed.values() if e["status"] == "loaded") <= 2
        assert all(e["in_flight"] == 0 for e in listed.values())
        metrics = small.get("/metrics").text
        assert "steer_slot_evictions " in metrics and "steer_slot_evictions 0.0" not in metrics
