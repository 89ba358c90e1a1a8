"""PEFT AdaLoRA / LoHa / LoKr / VeRA adapters per request through the LoRA slots, beside ReFT and plain requests.

Reference: peft 0.21.2's own ``PeftModel.generate`` (no merge) on each adapter as saved, recorded by
``tests/fixtures/make_peft_fixtures.py``. The conversion's math is checked engine-free in
``test_format_peft_methods.py``; this checks the served tokens and the API's refusals.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from live_server import FIXTURES_PEFT
from steering_helpers import complete, random_loreft, register, tokens

METHODS = ["adalora", "loha", "lokr", "vera"]


@pytest.fixture(scope="module")
def peft_client(small_server):
    with httpx.Client(base_url=small_server.url, timeout=600, limits=httpx.Limits(max_connections=16)) as c:
        for method in METHODS:
            response = c.post("/v1/interventions", json={"id": f"peft-{method}", "source": str(FIXTURES_PEFT / method)})
            assert response.status_code in (201, 409), response.text
        yield c


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_peft_generate(peft_client, method):
    case = json.loads((FIXTURES_PEFT / f"{method}.json").read_text())
    described = peft_client.get(f"/v1/interventions/peft-{method}").json()
    assert described["kind"] == "adapter" and described["format"] == f"peft_{method}"
    for prompt in case["prompts"]:
        steered = complete(peft_client, prompt["prompt_ids"], case["max_new_tokens"], intervention=f"peft-{method}")
        assert tokens(steered) == prompt["steered_ids"], (method, prompt["text"])


def test_mixed_burst_equals_peft_generate(peft_client, intervention_dir):
    """Every method, a ReFT intervention, a ReFT + adapter mix and a plain request in one concurrent burst."""
    register(peft_client, intervention_dir, "peft-mix-reft", random_loreft(91, 12, positions="all"))
    cases = {m: json.loads((FIXTURES_PEFT / f"{m}.json").read_text()) for m in METHODS}
    prompt = cases["loha"]["prompts"][0]
    n = cases["loha"]["max_new_tokens"]
    mixes = [{}, {"intervention": "peft-mix-reft"},
             {"interventions": [{"id": "peft-loha"}, {"id": "peft-mix-reft"}]},
             *({"intervention": f"peft-{m}"} for m in METHODS)]
    alone = [tokens(complete(peft_client, prompt["prompt_ids"], n, **m)) for m in mixes[:3]]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        together = list(pool.map(lambda m: tokens(complete(peft_client, prompt["prompt_ids"], n, **m)), mixes))
    assert together[0] == prompt["unsteered_ids"]
    assert together[:3] == alone
    assert len({tuple(t) for t in together[:3]}) == 3
    for method, got in zip(METHODS, together[3:]):
        assert got == cases[method]["prompts"][0]["steered_ids"], method


@pytest.mark.parametrize("method", ["prefix_tuning", "oft", "poly"])
def test_unservable_method_is_a_400_naming_it(peft_client, method):
    response = peft_client.post("/v1/interventions", json={"id": f"refused-{method}",
                                                           "source": str(FIXTURES_PEFT / "refused" / method)})
    peft_type = json.loads((FIXTURES_PEFT / "refused" / method / "adapter_config.json").read_text())["peft_type"]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_peft_type" and f"PEFT {peft_type} adapters" in error["message"]
    assert peft_client.get(f"/v1/interventions/refused-{method}").status_code == 404


def test_rank_above_max_lora_rank_is_a_400_with_the_numbers(peft_client, intervention_dir):
    """LoHa of r = 5 is a LoRA of rank 25, above the server's --max-lora-rank 16."""
    wide = intervention_dir / "loha-r5"
    wide.mkdir(exist_ok=True)
    config = json.loads((FIXTURES_PEFT / "loha" / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
    gen = torch.Generator().manual_seed(5)
    weights = load_file(str(FIXTURES_PEFT / "loha" / "adapter_model.safetensors"))
    save_file({k: torch.randn((v.shape[0], 5) if k.endswith("_a") else (5, v.shape[1]), generator=gen)
               for k, v in weights.items()}, str(wide / "adapter_model.safetensors"))
    response = peft_client.post("/v1/interventions", json={"id": "loha-r5", "source": str(wide)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "rank_too_large" and "rank 25" in error["message"] and "16" in error["message"]
    assert peft_client.get("/v1/interventions/loha-r5").status_code == 404


IA3 = ["ia3", "ia3_sites"]


@pytest.fixture(scope="module")
def ia3_client(peft_client):
    for name in IA3:
        response = peft_client.post("/v1/interventions", json={"id": f"peft-{name}", "source": str(FIXTURES_PEFT / name)})
        assert response.status_code in (201, 409), response.text
    return peft_client


@pytest.mark.parametrize("name", IA3)
def test_ia3_greedy_equals_peft_generate(ia3_client, name):
    """IA3 served by the intervention slots on a server with LoRA on: its k/v/q slices and o_proj input
    hooks sit on vLLM's LoRA layers, and still fire."""
    case = json.loads((FIXTURES_PEFT / f"{name}.json").read_text())
    described = ia3_client.get(f"/v1/interventions/peft-{name}").json()
    assert described["kind"] == "intervention" and described["format"] == "peft_ia3"
    for prompt in case["prompts"]:
        steered = complete(ia3_client, prompt["prompt_ids"], case["max_new_tokens"], intervention=f"peft-{name}")
        assert tokens(steered) == prompt["steered_ids"], (name, prompt["text"])


def test_ia3_in_a_mixed_burst_equals_peft_generate(ia3_client, intervention_dir):
    """IA3, a ReFT intervention, a converted adapter, IA3 + adapter, IA3 + ReFT and a plain request at once."""
    register(ia3_client, intervention_dir, "peft-mix-reft", random_loreft(91, 12, positions="all"))
    ia3, loha = (json.loads((FIXTURES_PEFT / f"{m}.json").read_text()) for m in ("ia3", "loha"))
    prompt, n = ia3["prompts"][1], ia3["max_new_tokens"]
    mixes = [{}, {"intervention": "peft-ia3"}, {"intervention": "peft-loha"}, {"intervention": "peft-mix-reft"},
             {"interventions": [{"id": "peft-ia3"}, {"id": "peft-loha"}]},
             {"interventions": [{"id": "peft-ia3"}, {"id": "peft-mix-reft"}]}]
    alone = [tokens(complete(ia3_client, prompt["prompt_ids"], n, **m)) for m in mixes]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        together = list(pool.map(lambda m: tokens(complete(ia3_client, prompt["prompt_ids"], n, **m)), mixes))
    assert together == alone
    assert together[:3] == [prompt["unsteered_ids"], prompt["steered_ids"], loha["prompts"][1]["steered_ids"]]
    assert len({tuple(t) for t in together}) == len(mixes)


PROMPT_METHODS = ["prompt_tuning", "p_tuning", "multitask_prompt_tuning"]


@pytest.fixture(scope="module")
def prompt_client(ia3_client):
    for method in PROMPT_METHODS:
        task = json.loads((FIXTURES_PEFT / f"{method}.json").read_text()).get("task_id")
        response = ia3_client.post("/v1/interventions", json={"id": f"peft-{method}", "source": str(FIXTURES_PEFT / method),
                                                              **({"task_id": task} if task is not None else {})})
        assert response.status_code in (201, 409), response.text
    return ia3_client


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_methods_greedy_equal_peft_generate(prompt_client, method):
    """Virtual tokens prepended through vLLM's prompt embeddings (32-token chunked prefill on this server)."""
    case = json.loads((FIXTURES_PEFT / f"{method}.json").read_text())
    described = prompt_client.get(f"/v1/interventions/peft-{method}").json()
    assert described["kind"] == "prompt" and described["format"] == f"peft_{method}"
    assert described["num_virtual_tokens"] == case["num_virtual_tokens"]
    for prompt in case["prompts"]:
        steered = complete(prompt_client, prompt["prompt_ids"], case["max_new_tokens"], intervention=f"peft-{method}")
        assert tokens(steered) == prompt["steered_ids"], (method, prompt["text"])
        assert steered["usage"]["prompt_tokens"] == len(prompt["prompt_ids"]) + case["num_virtual_tokens"]


def test_prompt_tuning_on_a_text_prompt_and_in_a_mixed_burst(prompt_client, intervention_dir):
    """A text prompt is tokenized as vLLM does; prompt tuning, IA3, ReFT, prompt tuning + IA3 + adapter and a
    plain request in one concurrent burst equal each alone."""
    register(prompt_client, intervention_dir, "peft-mix-reft", random_loreft(91, 12, positions="all"))
    case = json.loads((FIXTURES_PEFT / "prompt_tuning.json").read_text())
    prompt, n = case["prompts"][0], case["max_new_tokens"]
    assert tokens(complete(prompt_client, prompt["text"], n, intervention="peft-prompt_tuning")) == prompt["steered_ids"]
    mixes = [{}, {"intervention": "peft-prompt_tuning"}, {"intervention": "peft-ia3"},
             {"intervention": "peft-mix-reft"},
             {"interventions": [{"id": "peft-prompt_tuning"}, {"id": "peft-ia3"}, {"id": "peft-loha"}]},
             {"interventions": [{"id": "peft-prompt_tuning"}, {"id": "peft-mix-reft"}]}]
    alone = [tokens(complete(prompt_client, prompt["prompt_ids"], n, **m)) for m in mixes]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        together = list(pool.map(lambda m: tokens(complete(prompt_client, prompt["prompt_ids"], n, **m)), mixes))
    assert together == alone
    assert together[:2] == [prompt["unsteered_ids"], prompt["steered_ids"]]
    assert len({tuple(t) for t in together}) == len(mixes)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "interventions"),
    ({"prompt": "Hi", "use_beam_search": True, "n": 2}, "use_beam_search"),
    ({"prompt": "Hi", "interventions": [{"id": "peft-prompt_tuning", "scale": 0.5}]}, "interventions"),
])
def test_prompt_methods_refuse_what_they_cannot_honour(prompt_client, body, param):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    fields = {} if "interventions" in body else {"intervention": "peft-prompt_tuning"}
    response = prompt_client.post(route, json={"max_tokens": 4, **fields, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_prompt_registration_refuses_fields_it_would_ignore(prompt_client):
    for extra in ({"positions": "l1"}, {"task_id": 0}):
        response = prompt_client.post("/v1/interventions", json={"id": "pt-extra", "source": str(FIXTURES_PEFT /
                                                                                                  "prompt_tuning"),
                                                                 **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == next(iter(extra))
    response = prompt_client.post("/v1/interventions", json={"id": "ia3-task", "source": str(FIXTURES_PEFT / "ia3"),
                                                             "task_id": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "task_id"


def test_dora_greedy_equals_peft_generate_alone_and_beside_ia3_and_reft(prompt_client, intervention_dir):
    """DoRA = its LoRA (LoRA slot) + its output scales (intervention slot) under one id; in a burst with IA3,
    a ReFT on the same request, prompt tuning and a plain request."""
    response = prompt_client.post("/v1/interventions", json={"id": "peft-dora", "source": str(FIXTURES_PEFT / "dora")})
    assert response.status_code in (201, 409), response.text
    described = prompt_client.get("/v1/interventions/peft-dora").json()
    assert described["kind"] == "adapter" and described["format"] == "peft_dora" and len(described["output_scales"]) == 8
    case = json.loads((FIXTURES_PEFT / "dora.json").read_text())
    for prompt in case["prompts"]:
        steered = complete(prompt_client, prompt["prompt_ids"], case["max_new_tokens"], intervention="peft-dora")
        assert tokens(steered) == prompt["steered_ids"], prompt["text"]
    register(prompt_client, intervention_dir, "peft-mix-reft", random_loreft(91, 12, positions="all"))
    prompt, n = case["prompts"][2], case["max_new_tokens"]
    mixes = [{}, {"intervention": "peft-dora"}, {"interventions": [{"id": "peft-dora"}, {"id": "peft-mix-reft"}]},
             {"interventions": [{"id": "peft-dora"}, {"id": "peft-prompt_tuning"}]}, {"intervention": "peft-ia3"}]
    alone = [tokens(complete(prompt_client, prompt["prompt_ids"], n, **m)) for m in mixes]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        together = list(pool.map(lambda m: tokens(complete(prompt_client, prompt["prompt_ids"], n, **m)), mixes))
    assert together == alone
    assert together[:2] == [prompt["unsteered_ids"], prompt["steered_ids"]]
