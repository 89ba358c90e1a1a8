"""Foundation: the OpenAI surface over the real engine and the real server (issue: foundation)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from live_server import REPO

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_health_and_models(client, server):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"


def test_greedy_chat_says_paris(client):
    body = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 24, "temperature": 0}).json()
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "Paris" in message["content"]
    assert 0 < body["usage"]["completion_tokens"] <= 24


def _vllm_reference(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from vLLM's own ``LLM.generate`` with the stock Llama (our plugin disabled)."""
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        from steer_serve.model import prepare_default_model
        if __name__ == "__main__":
            llm = LLM(str(prepare_default_model()), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
            outs = llm.generate([{{"prompt_token_ids": p}} for p in {prompts!r}],
                                SamplingParams(temperature=0, max_tokens={max_tokens}))
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """)
    env = {"VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **env}, cwd=REPO)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def test_completions_by_token_ids_equal_vllm_generate(client):
    prompts = [[504, 3575, 282, 4649, 314], [1780, 314, 253, 1345, 282, 3233], [19556, 1172, 28, 2013, 28]]
    reference = _vllm_reference(prompts, 24)
    for prompt, expected in zip(prompts, reference):
        body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                     "return_token_ids": True}).json()
        assert body["choices"][0]["token_ids"] == expected
        assert body["choices"][0]["prompt_token_ids"] == prompt


def _stream_text(client, path: str, payload: dict) -> list[dict]:
    chunks = []
    with client.stream("POST", path, json={**payload, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in response.iter_lines() if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunks.append(json.loads(line[len("data: "):]))
    return chunks


def test_streaming_concatenates_to_the_plain_answer(client):
    payload = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    plain = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    chunks = _stream_text(client, "/v1/completions", payload)
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain

    chat = {"messages": CHAT, "max_tokens": 20, "temperature": 0}
    plain_chat = client.post("/v1/chat/completions", json=chat).json()
    chunks = _stream_text(client, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain_chat["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == plain_chat["usage"]["completion_tokens"]


def test_sampling_fields(client):
    body = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "n": 3, "temperature": 0.9,
                                                "seed": 7, "logprobs": 2, "top_p": 0.9}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) > 0
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"])
    again = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "n": 3, "temperature": 0.9,
                                                 "seed": 7, "logprobs": 2, "top_p": 0.9}).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]
    stopped = client.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0,
                                                   "stop": [" 7"]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and " 7" not in stopped["text"]
    chat = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "temperature": 0,
                                                     "logprobs": True, "top_logprobs": 3}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 3


def test_openai_sdk(server):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    reply = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    stream = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                    max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream).strip()
    assert [m.id for m in sdk.models.list()][0] == "SmolLM2-135M-Instruct"


def test_openai_sdk_parse_responses_and_prompt_scoring(server, client, intervention_dir):
    """The SDK's structured `parse`, `responses.create`, and lm-eval's scoring call, also under an intervention."""
    openai = pytest.importorskip("openai")
    from typing import Literal

    from pydantic import BaseModel

    from steering_helpers import random_loreft, register

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]

    register(client, intervention_dir, "sdk-steer", random_loreft(seed=43, positions="all"))
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    for steer in ({}, {"extra_body": {"interventions": [{"id": "sdk-steer", "scale": 0.3}]}}):
        try:
            parsed = sdk.chat.completions.parse(model="SmolLM2-135M-Instruct", messages=CHAT, response_format=Verdict,
                                                max_tokens=64, temperature=0, **steer)
        except openai.LengthFinishReasonError as exc:
            raise AssertionError((steer, exc.completion.choices[0].message.content)) from None
        assert isinstance(parsed.choices[0].message.parsed, Verdict), (steer, parsed.choices[0].message.content)
        response = sdk.responses.create(model="SmolLM2-135M-Instruct", input="Say hello.", max_output_tokens=8,
                                        temperature=0, **steer)
        assert response.output_text
    scored = [sdk.completions.create(model=model, prompt="The capital of France is Paris", echo=True, logprobs=1,
                                     max_tokens=0, temperature=0) for model in ("SmolLM2-135M-Instruct", "sdk-steer")]
    plain, steered = (s.choices[0].logprobs.token_logprobs for s in scored)
    assert plain[0] is None and steered[0] is None and len(plain) == len(steered) > 3
    assert plain[1:] != steered[1:]                        # the prompt was scored with the edit applied


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "max_tokens": 10**7}, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": [10**9], "max_tokens": 2}, ""),                                  # vLLM's error names no param
])
def test_bad_requests_get_openai_errors(client, payload, param):
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "")


def test_malformed_json_and_missing_messages(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()
    response = client.post("/v1/chat/completions", json={"max_tokens": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert client.get("/health").status_code == 200
