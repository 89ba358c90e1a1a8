"""Conditional steering (CAST) served per request equals a transformers forward with the same math
hooked in: the condition (IBM activation-steering's similarity of the prompt's mean, or last, row at a
layer to its projection on a condition direction) decides from the prompt whether the request's
interventions apply to its generated tokens. Alone, in one concurrent burst with plain and
unconditionally steered requests, and under chunked prefill; the decision is reported per choice."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch
from safetensors.torch import load_file

from live_server import REPO
from steering_helpers import HIDDEN, complete, register, tokens
from steer_serve.engine.condition import condition_met, condition_similarity
from steer_serve.interventions.base import Edit, Intervention, Placement

NEW_TOKENS = 12
CONDITION_LAYER, BEHAVIOUR_LAYER, STRENGTH = 12, 15, 4.0
#: steering-vectors' happy/sad mean differences (tests/fixtures/data_control_vectors): a real condition direction.
VECTORS = {int(k.split(".")[1]): v for k, v in
           load_file(str(REPO / "tests/fixtures/data_control_vectors/expected_vectors.safetensors")).items()
           if k.startswith("steering_vectors.")}
PROMPTS = {"happy": "I am so happy today, the sun is shining and my friends are laughing with me",
           "sad": "I feel so lonely and sad, everything is grey and nobody calls me anymore"}
#: longer than the small server's 32-token steps: its prefill is chunked
LONG_PROMPT = ("Tell me a story about a cheerful baker who wakes up early every morning, sings while kneading "
               "the dough, and shares warm bread with every neighbour on the little street")


def condition_vector() -> Intervention:
    edit = Edit("steering_vector", Placement(CONDITION_LAYER, "block_output"), {"vector": VECTORS[CONDITION_LAYER]})
    return Intervention([edit], HIDDEN)


def behaviour() -> Intervention:
    edit = Edit("steering_vector", Placement(BEHAVIOUR_LAYER, "block_output"),
                {"vector": STRENGTH * VECTORS[BEHAVIOUR_LAYER]})
    return Intervention([edit], HIDDEN, positions="all")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_serve.model import prepare_default_model

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the server's side runs with ignore_eos
    return model, AutoTokenizer.from_pretrained(prepare_default_model())


def hf_conditional(hf, prompt: str, threshold: float | None, comparator: str = "larger", aggregate: str = "mean",
                   steer: bool = True) -> tuple[list[int], float]:
    """transformers' greedy tokens and the condition's similarity: the behaviour vector is added to the
    block output at every prompt position, and at generated ones only if the condition holds (none
    without ``steer``; always with ``threshold`` None)."""
    model, tokenizer = hf
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cond_layer, beh_layer = CONDITION_LAYER, BEHAVIOUR_LAYER
    direction, vector = VECTORS[cond_layer], STRENGTH * VECTORS[beh_layer]
    seen = {}

    def condition_hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] > 1:   # the prompt's forward
            rows = h[0].float()
            seen["similarity"] = condition_similarity(rows.mean(0) if aggregate == "mean" else rows[-1], direction)
        return None

    def behaviour_hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        prefill = h.shape[1] > 1
        on = steer and (prefill or threshold is None or bool(condition_met(seen["similarity"], threshold, comparator)))
        new = h + vector if on else h
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles = [model.model.layers[cond_layer].register_forward_hook(condition_hook),
               model.model.layers[beh_layer].register_forward_hook(behaviour_hook)]
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    finally:
        for handle in handles:
            handle.remove()
    return out[0, ids.shape[1]:].tolist(), float(seen["similarity"])


def _register_both(client, intervention_dir):
    register(client, intervention_dir, "cast-condition", condition_vector())
    register(client, intervention_dir, "cast-behaviour", behaviour())


def _condition(threshold: float, **fields) -> dict:
    return {"intervention": "cast-condition", "layer": CONDITION_LAYER, "threshold": threshold} | fields


@pytest.fixture(scope="module")
def similarities(hf):
    return {name: hf_conditional(hf, prompt, None, steer=False)[1] for name, prompt in PROMPTS.items()}


def test_condition_decides_per_request_in_one_batch(server, intervention_dir, hf, similarities):
    """With the threshold between the two prompts' similarities one prompt meets the condition and one does
    not: each gets transformers' tokens (behaviour on its answer or not), its similarity to 1e-4 and its
    decision reported, alone and in one concurrent burst beside plain and unconditionally steered requests."""
    threshold = (similarities["happy"] + similarities["sad"]) / 2
    expected = {name: hf_conditional(hf, prompt, threshold) for name, prompt in PROMPTS.items()}
    met = {name: bool(condition_met(torch.tensor(s), threshold, "larger")) for name, s in similarities.items()}
    assert sorted(met.values()) == [False, True]
    steered_always = {name: hf_conditional(hf, prompt, None)[0] for name, prompt in PROMPTS.items()}
    plain = {name: hf_conditional(hf, prompt, None, steer=False)[0] for name, prompt in PROMPTS.items()}
    assert all(steered_always[n] != plain[n] for n in PROMPTS)   # the behaviour changes the answer
    with httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=16)) as client:
        _register_both(client, intervention_dir)

        def conditional(name):
            return complete(client, PROMPTS[name], NEW_TOKENS, intervention="cast-behaviour", ignore_eos=True,
                            condition=_condition(threshold))

        for name in PROMPTS:
            body = conditional(name)
            assert tokens(body) == expected[name][0], name
            decision = body["choices"][0]["condition"]
            assert decision["met"] is met[name] and abs(decision["similarity"] - similarities[name]) < 1e-4, decision
        jobs = [("conditional", n) for n in PROMPTS] * 2 + [("plain", n) for n in PROMPTS] + [("always", "sad")]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {job: pool.submit(
                conditional if job[0] == "conditional" else
                (lambda n: complete(client, PROMPTS[n], NEW_TOKENS, ignore_eos=True)) if job[0] == "plain" else
                (lambda n: complete(client, PROMPTS[n], NEW_TOKENS, intervention="cast-behaviour", ignore_eos=True)),
                job[1]) for job in set(jobs)}
        for (kind, name), future in futures.items():
            want = {"conditional": expected[name][0], "plain": plain[name], "always": steered_always[name]}[kind]
            assert tokens(future.result()) == want, (kind, name)


def test_comparator_and_last_row(server, intervention_dir, hf):
    """``comparator: "smaller"`` holds above the threshold, and ``aggregate: "last"`` takes the prompt's last row."""
    with httpx.Client(base_url=server.url, timeout=300) as client:
        _register_both(client, intervention_dir)
        _, last = hf_conditional(hf, PROMPTS["sad"], None, aggregate="last", steer=False)
        for comparator, threshold in (("smaller", last - 0.05), ("larger", last - 0.05)):
            want, _ = hf_conditional(hf, PROMPTS["sad"], threshold, comparator, "last")
            body = complete(client, PROMPTS["sad"], NEW_TOKENS, intervention="cast-behaviour", ignore_eos=True,
                            condition=_condition(threshold, comparator=comparator, aggregate="last"))
            assert tokens(body) == want, comparator
            decision = body["choices"][0]["condition"]
            assert decision["met"] is (comparator == "smaller") and abs(decision["similarity"] - last) < 1e-4


def test_condition_under_chunked_prefill_and_streaming(small_server, intervention_dir, hf):
    """On the server with 32-token steps a 40-token prompt's condition is summed over its chunks: the same
    similarity as transformers' one forward, the same tokens; a stream reports the decision in its final chunk."""
    _, similarity = hf_conditional(hf, LONG_PROMPT, None, steer=False)
    threshold = similarity + 0.01                       # met ("larger": the similarity is below it)
    expected, _ = hf_conditional(hf, LONG_PROMPT, threshold)
    with httpx.Client(base_url=small_server.url, timeout=300) as client:
        _register_both(client, intervention_dir)
        prompt_tokens = complete(client, LONG_PROMPT, 1)["usage"]["prompt_tokens"]
        assert prompt_tokens > 32
        body = complete(client, LONG_PROMPT, NEW_TOKENS, intervention="cast-behaviour", ignore_eos=True,
                        condition=_condition(threshold))
        assert tokens(body) == expected
        decision = body["choices"][0]["condition"]
        assert decision["met"] is True and abs(decision["similarity"] - similarity) < 1e-4
        with client.stream("POST", "/v1/completions", json={
                "prompt": LONG_PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
                "intervention": "cast-behaviour", "condition": _condition(threshold)}) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: {")]
        reported = [c["choices"][0]["condition"] for c in chunks if c["choices"] and "condition" in c["choices"][0]]
        assert len(reported) == 1 and reported[0]["met"] is True


@pytest.mark.parametrize("fields, status, words", [
    ({"condition": {"intervention": "cast-condition", "layer": CONDITION_LAYER}}, 400, "threshold"),
    ({"condition": _condition(0.1, comparator="above")}, 400, "comparator"),
    ({"condition": _condition(0.1, intervention="cast-missing")}, 404, "cast-missing"),
    ({"condition": _condition(0.1, layer=3)}, 400, "no steering vector"),
    ({"condition": _condition(0.1, layer=99)}, 400, "layer 99"),
    ({"condition": _condition(0.1, intervention="cast-behaviour-loreft", layer=6)}, 400, "no steering vector"),
    ({"condition": _condition(0.1), "intervention": None}, 400, "at least one"),
    ({"condition": _condition(0.1), "n": 2}, 400, "n = 1"),
])
def test_bad_conditions_are_refused(server, intervention_dir, fields, status, words):
    from steering_helpers import random_loreft

    with httpx.Client(base_url=server.url, timeout=300) as client:
        _register_both(client, intervention_dir)
        register(client, intervention_dir, "cast-behaviour-loreft", random_loreft(7, layer=6))
        body = {"prompt": "Hello", "max_tokens": 2, "intervention": "cast-behaviour", **fields}
        body = {k: v for k, v in body.items() if v is not None}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"], response.text
        assert client.get("/health").status_code == 200
