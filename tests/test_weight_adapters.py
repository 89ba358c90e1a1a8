"""Weight-space adapters (PEFT LoRA, GIFT) per request through vLLM's LoRA slots, beside ReFT.

References: PEFT's own ``PeftModel.generate`` and a reference GIFT forward (``y = xWᵀ + s·((xψᵀ)φ)Wᵀ``),
both recorded by ``tests/fixtures/make_lora_fixtures.py`` with transformers 4.45 in float32.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

from live_server import FIXTURES_LORA
from steering_helpers import complete, random_loreft, register, tokens


@pytest.fixture(scope="module")
def lora_client(small_server):
    with httpx.Client(base_url=small_server.url, timeout=600, limits=httpx.Limits(max_connections=32)) as c:
        for name in ("peft_lora", "gift"):
            response = c.post("/v1/interventions", json={"id": name, "source": str(FIXTURES_LORA / name)})
            assert response.status_code in (201, 409), response.text
        yield c


@pytest.mark.parametrize("name", ["peft_lora", "gift"])
def test_greedy_equals_reference(lora_client, name):
    case = json.loads((FIXTURES_LORA / f"{name}.json").read_text())
    described = lora_client.get(f"/v1/interventions/{name}").json()
    assert described["kind"] == "adapter" and described["format"] == name
    for prompt in case["prompts"]:
        steered = complete(lora_client, prompt["prompt_ids"], case["max_new_tokens"], intervention=name)
        assert tokens(steered) == prompt["steered_ids"], prompt["text"]
        assert tokens(complete(lora_client, prompt["prompt_ids"], case["max_new_tokens"])) == prompt["unsteered_ids"]


def test_mixed_batch_of_adapters_and_interventions(lora_client, intervention_dir):
    register(lora_client, intervention_dir, "lora-mix-reft", random_loreft(77, 12, positions="all"))
    prompts = [[504, 3575, 282, 4649, 314], [1780, 314, 253, 1345, 282, 3233, 30], [19556, 1172, 28, 2013, 28, 216]]
    mixes = [{}, {"intervention": "peft_lora"}, {"intervention": "gift"}, {"intervention": "lora-mix-reft"},
             {"interventions": [{"id": "peft_lora"}, {"id": "lora-mix-reft"}]},
             {"interventions": [{"id": "gift"}, {"id": "lora-mix-reft", "scale": 0.5}]}]
    reqs = [(prompts[i % 3], mixes[i % len(mixes)]) for i in range(12)]
    alone = [tokens(complete(lora_client, p, 16, **m)) for p, m in reqs]
    with cf.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: tokens(complete(lora_client, r[0], 16, **r[1])), reqs))
    assert together == alone
    by_mix = {json.dumps(m): alone[i] for i, (p, m) in enumerate(reqs) if p == prompts[0]}
    assert len(set(map(tuple, by_mix.values()))) == len(by_mix), "every mix should give different tokens"


def test_adapter_rules(lora_client, server):
    two = lora_client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                    "interventions": [{"id": "peft_lora"}, {"id": "gift"}]})
    assert two.status_code == 400 and "at most one weight-space adapter" in two.json()["error"]["message"]
    patch = lora_client.patch("/v1/interventions/gift", json={"scale": 2.0})
    assert patch.status_code == 400
    with httpx.Client(base_url=server.url, timeout=60) as plain:
        refused = plain.post("/v1/interventions", json={"id": "x", "source": str(FIXTURES_LORA / "peft_lora")})
    assert refused.status_code == 400 and refused.json()["error"]["code"] in ("adapters_disabled", "source_not_allowed")
