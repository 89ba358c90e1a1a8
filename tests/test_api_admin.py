"""Intervention management, the OpenAI SDK end to end, and the OpenAPI document (issue 7)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from steer_serve.formats.native import save_native
from steering_helpers import complete, random_loreft, register, tokens

PROMPT = [504, 3575, 282, 4649, 314]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def registry_file(server) -> dict:
    """The server's persisted registry (``--registry-dir``/registry.json)."""
    directory = Path(server.args[server.args.index("--registry-dir") + 1])
    return json.loads((directory / "registry.json").read_text())


def test_register_get_list_patch_delete(client, server, intervention_dir):
    created = register(client, intervention_dir, "admin-life", random_loreft(301, layer=12))
    assert created["id"] == "admin-life" and created["object"] == "intervention"
    plain = tokens(complete(client, PROMPT))
    steered = tokens(complete(client, PROMPT, intervention="admin-life"))
    assert steered != plain
    described = client.get("/v1/interventions/admin-life").json()
    assert described["status"] == "loaded" and described["slot"] >= 1 and described["in_flight"] == 0
    assert described["families"] == ["loreft"] and described["layers"] == [12]
    assert described["base_model"] == "SmolLM2-135M-Instruct" and described["format"] == "native"
    assert described["edits"][0]["placement"] == {"layer": 12, "component": "block_output", "head": None}
    assert described["edits"][0]["params"]["rotate_layer"] == {"shape": [576, 4], "dtype": "float32"}
    assert described["created"] > 1.7e9 and len(described["content_hash"]) == 32
    assert "admin-life" in [i["id"] for i in client.get("/v1/interventions").json()["data"]]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["admin-life"]["parent"] == "SmolLM2-135M-Instruct"
    assert tokens(complete(client, PROMPT, model="admin-life")) == steered

    patched = client.patch("/v1/interventions/admin-life", json={"scale": 0.0})
    assert patched.status_code == 200 and patched.json()["scale"] == 0.0
    assert tokens(complete(client, PROMPT, intervention="admin-life")) == plain       # h + 0·(f(h) − h) = h
    assert tokens(complete(client, PROMPT, intervention="admin-life", intervention_scale=1.0)) == steered
    patched = client.patch("/v1/interventions/admin-life", json={"scale": 1.0, "positions": "generated"}).json()
    assert patched["positions"] == "generated" and patched["scale"] == 1.0
    record = next(r for r in registry_file(server)["interventions"] if r["id"] == "admin-life")
    assert (record["scale"], record["positions"]) == (1.0, "generated")
    assert tokens(complete(client, PROMPT, intervention="admin-life", intervention_positions="all")) == steered

    deleted = client.delete("/v1/interventions/admin-life")
    assert deleted.status_code == 200 and deleted.json() == {"id": "admin-life", "object": "intervention",
                                                              "deleted": True}
    assert client.get("/v1/interventions/admin-life").status_code == 404
    assert "admin-life" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.post("/v1/completions", json={"prompt": "x", "intervention": "admin-life"}).status_code == 404
    assert "admin-life" not in [r["id"] for r in registry_file(server)["interventions"]]


def test_upload_equals_registration_from_a_path(client, intervention_dir):
    iv = random_loreft(302, layer=20)
    source = intervention_dir / "admin-upload-src"
    save_native(iv, source)
    by_path = client.post("/v1/interventions", json={"id": "admin-by-path", "source": str(source),
                                                    "positions": "l1"})
    assert by_path.status_code == 201, by_path.text
    files = {name: (name, (source / name).read_bytes()) for name in ("intervention.json", "weights.safetensors")}
    uploaded = client.post("/v1/interventions", data={"id": "admin-uploaded", "positions": "l1"}, files=files)
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["source"] == "upload" and uploaded.json()["positions"] == "l1"
    assert uploaded.json()["content_hash"] == by_path.json()["content_hash"]
    assert tokens(complete(client, PROMPT, intervention="admin-uploaded")) == \
        tokens(complete(client, PROMPT, intervention="admin-by-path"))
    missing = client.post("/v1/interventions", data={"id": "admin-half"}, files={"intervention.json": files[
        "intervention.json"]})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "weights.safetensors"
    bad_id = client.post("/v1/interventions", data={"id": "../evil"}, files=files)
    assert bad_id.status_code == 400 and bad_id.json()["error"]["param"] == "id"
    assert client.get("/v1/interventions/admin-half").status_code == 404


@pytest.fixture(scope="module")
def sdk_interventions(server, intervention_dir):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        for i, name in enumerate(("sdk-a", "sdk-b", "sdk-c")):
            register(c, intervention_dir, name, random_loreft(310 + i, layer=8 + 6 * i))
    return ["sdk-a", "sdk-b", "sdk-c"]


def test_openai_sdk_sync(server, client, sdk_interventions):
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    a, b, _ = sdk_interventions
    reference = tokens(complete(client, PROMPT, 16, intervention=a))
    by_model = sdk.completions.create(model=a, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert by_model.choices[0].model_extra["token_ids"] == reference
    by_field = sdk.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=16, temperature=0,
                                      user="sdk-user", extra_body={"intervention": a, "return_token_ids": True})
    assert by_field.choices[0].model_extra["token_ids"] == reference
    combo = dict(model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=12, temperature=0,
                 extra_body={"interventions": [{"id": a, "scale": 0.5}, {"id": b, "positions": "all"}]})
    chat = sdk.chat.completions.create(**combo)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 12
    stream = sdk.chat.completions.create(**combo, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and chunks[-1].choices == []
    sampled = sdk.completions.create(model=b, prompt="Once upon a time", max_tokens=8, n=2, seed=11,
                                     temperature=0.8, logprobs=2, stop=["\n\n"])
    again = sdk.completions.create(model=b, prompt="Once upon a time", max_tokens=8, n=2, seed=11,
                                   temperature=0.8, logprobs=2, stop=["\n\n"])
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len(sampled.choices) == 2 and sampled.choices[0].logprobs.token_logprobs
    with pytest.raises(openai.NotFoundError) as err:
        sdk.completions.create(model="SmolLM2-135M-Instruct", prompt="x", extra_body={"intervention": "ghost"})
    assert err.value.code == "intervention_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=a, messages=CHAT, max_tokens=0)


def test_openai_sdk_async_streaming_in_parallel(server, client, sdk_interventions):
    expected = {name: client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                                           "model": name}).json()["choices"][0]["text"]
                for name in sdk_interventions}

    async def run() -> dict:
        sdk = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(name):
            stream = await sdk.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                                  stream=True)
            return name, "".join([chunk.choices[0].text async for chunk in stream])

        async with sdk:
            return dict(await asyncio.gather(*(one(n) for n in sdk_interventions * 2)))

    assert asyncio.run(run()) == expected
    assert len(set(expected.values())) == 3


def test_openapi_documents_every_route_with_examples(client):
    schema = client.get("/openapi.json").json()
    routes = {(p, m.upper()) for p, ops in schema["paths"].items() for m in ops}
    assert routes == {("/v1/models", "GET"), ("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                      ("/v1/models/{model_id}", "GET"), ("/v1/responses", "POST"),
                      ("/v1/responses/{response_id}", "GET"), ("/v1/responses/{response_id}/cancel", "POST"),
                      ("/tokenize", "POST"), ("/detokenize", "POST"), ("/version", "GET"), ("/ping", "GET"),
                      ("/ping", "POST"), ("/v1/interventions", "GET"), ("/v1/interventions", "POST"),
                      ("/v1/interventions/{intervention_id}", "GET"), ("/v1/interventions/{intervention_id}", "PATCH"),
                      ("/v1/interventions/{intervention_id}", "DELETE"), ("/health", "GET"), ("/ready", "GET"),
                      ("/metrics", "GET")}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") and op.get("tags"), where
            assert "422" not in op["responses"], where
            success = next(r for code, r in op["responses"].items() if code.startswith("2"))
            assert any("example" in c or "examples" in c for c in success["content"].values()), where
            for code, response in op["responses"].items():
                if code[0] in "45":
                    content = response["content"]["application/json"]
                    assert content["schema"]["$ref"].endswith("/ErrorResponse") and "example" in content, where
            for media in op.get("requestBody", {}).get("content", {}).values():
                ref = media["schema"].get("$ref")
                body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else media["schema"]
                assert ref is None or body.get("examples"), f"{where}: request body without examples"
    components = schema["components"]["schemas"]
    for name in ("InterventionRef", "InterventionCreate", "InterventionPatch"):
        undocumented = [f for f, prop in components[name]["properties"].items() if not prop.get("description")]
        assert not undocumented, f"{name}: fields without a description: {undocumented}"
    steering = ("intervention", "interventions", "intervention_scale", "intervention_positions")
    for name in ("SteerCompletionRequest", "SteerChatCompletionRequest", "SteerResponsesRequest"):
        properties = components[name]["properties"]   # vLLM's fields, documented by vLLM, plus ours
        assert {"vllm_xargs", *steering} <= set(properties), name
        assert all(properties[f].get("description") for f in steering), name
    assert schema["paths"]["/v1/completions"]["post"]["responses"]["429"]["headers"]["Retry-After"]
    multipart = schema["paths"]["/v1/interventions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"intervention.json", "weights.safetensors"} <= set(multipart["schema"]["required"])
