"""Activation capture per request (``capture``): the rows equal a transformers forward hooked at the
module pyvene names, under chunked prefill (``small_server``: 32-token steps), with the prefix cache
warm, after the request's own interventions, streamed, and in bf16; limits are 400s."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from steering_helpers import complete, random_loreft, register

#: A 70-token prompt: three chunks of the small server's 32-token steps.
LONG = [504, 3575, 282, 4649, 314, 1780, 314, 253, 1345, 282, 3233, 30] * 5 + [19556, 1172, 28, 2013, 28, 216,
                                                                               2020, 253, 655, 28]
#: (capture site, transformers module, "output" | "input", columns of the module's tensor or None)
SITES = [
    ({"layer": 15, "component": "block_output", "positions": "prompt"}, "model.layers.15", "output"),
    ({"layer": 0, "component": "block_input", "positions": "f2+l2"}, "model.layers.0", "input"),
    ({"layer": 8, "component": "attention_value_output", "positions": "l3"}, "model.layers.8.self_attn.o_proj", "input"),
    ({"layer": 8, "component": "query_output", "positions": "f1"}, "model.layers.8.self_attn.q_proj", "output"),
    ({"layer": 8, "component": "mlp_activation", "positions": "l1"}, "model.layers.8.mlp.act_fn", "output"),
    ({"layer": 29, "component": "mlp_output", "positions": "all"}, "model.layers.29.mlp", "output"),
]
TOLERANCE = 1e-5   # relative to the largest magnitude of the site's reference rows


def decode(capture: dict) -> np.ndarray:
    raw = base64.b64decode(capture["data"])
    if capture["dtype"] == "bfloat16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        data = bits.view(np.float32)
    else:
        data = np.frombuffer(raw, dtype="<f4")
    return data.reshape(capture["shape"])


def hf_activations(token_ids: list[int], modules: list[tuple[str, str]], edit=None) -> list[torch.Tensor]:
    """Each module's tensor (``[tokens, width]``) in one transformers forward over ``token_ids``;
    ``edit`` = (module, function) hooked first, as a request's own intervention."""
    from transformers import AutoModelForCausalLM

    from steer_serve.model import prepare_default_model

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    seen: list[torch.Tensor | None] = [None] * len(modules)
    if edit is not None:
        from steering_helpers import hook_hf_module

        hook_hf_module(model.get_submodule(edit[0]), "output", edit[1])
    for i, (name, where) in enumerate(modules):
        module = model.get_submodule(name)
        if where == "input":
            module.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None))[0].clone()),
                with_kwargs=True)
        else:
            module.register_forward_hook(
                lambda m, args, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0].clone()))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    return seen


def _positions(spec: str, prompt_len: int, total: int) -> list[int]:
    from steer_serve.interventions.positions import parse_positions

    p = np.arange(total)
    return p[parse_positions(spec).mask(p, prompt_len)].tolist()


def _check_against(captures: list[dict], reference: list[torch.Tensor], prompt_len: int, total: int) -> None:
    assert len(captures) == len(SITES)
    for capture, (site, module, _), ref in zip(captures, SITES, reference):
        assert (capture["layer"], capture["component"]) == (site["layer"], site["component"])
        positions = _positions(site["positions"], prompt_len, total)
        assert capture["positions"] == positions, site
        expected = ref[positions].numpy()
        got = decode(capture)
        assert got.shape == expected.shape == tuple(capture["shape"])
        error = np.abs(got - expected).max() / np.abs(expected).max()
        assert error < TOLERANCE, (site, error)


@pytest.fixture(scope="module")
def small(small_server):
    with httpx.Client(base_url=small_server.url, timeout=300) as c:
        yield c


def test_capture_equals_transformers_under_chunked_prefill(small):
    """Six sites of six hook kinds, a 70-token prompt prefilled in 32-token chunks; ``all`` at the last
    layer also covers the generated tokens the model reads (every one but the last sampled)."""
    body = complete(small, LONG, 4, capture=[s for s, _, _ in SITES], ignore_eos=True)
    generated = body["choices"][0]["token_ids"]
    total = len(LONG) + len(generated) - 1
    reference = hf_activations(LONG + generated[:-1], [(m, w) for _, m, w in SITES])
    _check_against(body["choices"][0]["captures"], reference, len(LONG), total)


def test_capture_with_prefix_cache_warm_streamed_and_bf16(small):
    """The prompt cached by a plain request first: the capture request recomputes it (its own cache salt);
    streaming puts the same captures in the final chunk; bf16 is the float32 rows rounded."""
    site = [{"layer": 15, "component": "block_output", "positions": "prompt"}]
    complete(small, LONG, 1)
    plain = complete(small, LONG, 1, capture=site)
    again = complete(small, LONG, 1, capture=site)
    assert plain["choices"][0]["captures"] == again["choices"][0]["captures"]
    with small.stream("POST", "/v1/completions", json={"prompt": LONG, "max_tokens": 3, "temperature": 0,
                                                       "stream": True, "capture": site}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    with_captures = [c for c in chunks if c["choices"] and "captures" in c["choices"][0]]
    assert len(with_captures) == 1 and with_captures[0]["choices"][0]["finish_reason"] is not None
    assert with_captures[0]["choices"][0]["captures"] == plain["choices"][0]["captures"]
    bf16 = complete(small, LONG, 1, capture=[{**site[0], "dtype": "bfloat16"}])["choices"][0]["captures"][0]
    rounded = torch.from_numpy(decode(plain["choices"][0]["captures"][0]).copy()).to(torch.bfloat16).float().numpy()
    assert bf16["dtype"] == "bfloat16" and np.array_equal(decode(bf16), rounded)


def test_capture_after_the_requests_own_intervention(client, intervention_dir):
    """A LoReFT at layer 10 (all positions) changes what layer 20 sees; the capture is after it, as pyvene
    collects on the intervened model. Chat requests capture too."""
    iv = random_loreft(41, layer=10, positions="all")
    register(client, intervention_dir, "capture-loreft", iv)
    site = {"layer": 20, "component": "block_output", "positions": "l4"}
    body = complete(client, LONG[:20], 1, capture=[site], intervention="capture-loreft")
    from steer_serve.interventions import reference_apply

    edit = ("model.layers.10", lambda h: reference_apply(iv, h.reshape(-1, h.shape[-1])).reshape(h.shape))
    steered = hf_activations(LONG[:20], [("model.layers.20", "output")], edit)[0][16:20].numpy()
    plain = hf_activations(LONG[:20], [("model.layers.20", "output")])[0][16:20].numpy()
    got = decode(body["choices"][0]["captures"][0])
    assert np.abs(got - steered).max() / np.abs(steered).max() < TOLERANCE
    assert np.abs(got - plain).max() > 1e-2
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                                                     "capture": [site]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["captures"][0]["shape"] == [4, 576]


@pytest.mark.parametrize("fields,param", [
    ({"capture": [{"layer": 1, "component": "block_output", "positions": "l1"}] * 9}, "capture"),
    ({"capture": [{"layer": 1, "component": "mlp_activation", "positions": "all"}] * 8}, "capture"),
    ({"capture": [{"layer": 30, "component": "block_output", "positions": "l1"}]}, "capture[0].layer"),
    ({"capture": [{"layer": 1, "component": "head_query_output", "positions": "l1"}]}, "capture[0].component"),
    ({"capture": [{"layer": 1, "component": "block_output", "positions": "l1"}], "n": 2}, "capture"),
    ({"capture": [{"layer": 1, "component": "block_output", "positions": "middle"}]}, None),
    ({"vllm_xargs": {"steer_capture": "x"}}, "vllm_xargs"),
])
def test_capture_refusals(client, fields, param):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, **fields})
    assert response.status_code == 400, response.text
    if param is not None:
        assert response.json()["error"]["param"] == param


POSITIVE = ["I love this movie, it is", "What a wonderful day, I feel"]
NEGATIVE = ["I hate this movie, it is", "What a terrible day, I feel"]


def _mean_rows(client, prompt: str, layer: int) -> torch.Tensor:
    site = {"layer": layer, "component": "block_output", "positions": "l2"}
    body = complete(client, prompt, 1, capture=[site])
    return torch.from_numpy(decode(body["choices"][0]["captures"][0]).copy()).mean(0)


@pytest.mark.parametrize("method", ["mean_difference", "pca"])
def test_derived_vectors_equal_the_offline_computation_on_captures(client, method):
    """``derive`` on the served model equals the same computation done here on captured activations; the
    registered vector is what the layer's output moves by when it is applied."""
    name = f"derived-{method}"
    spec = {"method": method, "positive": POSITIVE, "negative": NEGATIVE, "layers": [6, 12], "positions": "l2"}
    response = client.post("/v1/interventions", json={"id": name, "derive": spec, "positions": "all"})
    assert response.status_code == 201, response.text
    derived = response.json()["derived"]
    for i, layer in enumerate(spec["layers"]):
        pos = torch.stack([_mean_rows(client, p, layer) for p in POSITIVE])
        neg = torch.stack([_mean_rows(client, p, layer) for p in NEGATIVE])
        expected = pos.mean(0) - neg.mean(0)
        if method == "pca":
            differences = (pos - neg).double()
            _, singular, vh = torch.linalg.svd(differences - differences.mean(0), full_matrices=False)
            direction = vh[0].float()
            expected = direction if direction @ expected >= 0 else -direction
            assert abs(derived[i]["explained_variance"] - float(singular[0] ** 2 / (singular ** 2).sum())) < 1e-5
        assert derived[i]["layer"] == layer
        assert abs(derived[i]["norm"] - float(expected.norm())) <= 1e-5 * float(expected.norm())
        if i == 0:   # the first layer's output moves by exactly its vector (nothing upstream changed)
            steered = _mean_rows_with(client, POSITIVE[0], layer, name)
            moved = steered - _mean_rows(client, POSITIVE[0], layer)
            assert (moved - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def _mean_rows_with(client, prompt: str, layer: int, intervention: str) -> torch.Tensor:
    site = {"layer": layer, "component": "block_output", "positions": "l2"}
    body = complete(client, prompt, 1, capture=[site], intervention=intervention)
    return torch.from_numpy(decode(body["choices"][0]["captures"][0]).copy()).mean(0)


@pytest.mark.parametrize("derive,param", [
    ({"negative": NEGATIVE[:1]}, "derive.negative"),
    ({"positive": []}, None),
    ({"layers": [30]}, "derive.layers"),
    ({"component": "head_query_output"}, "derive.component"),
    ({"method": "pca", "positive": POSITIVE[:1], "negative": NEGATIVE[:1]}, "derive.positive"),
])
def test_derive_refusals_register_nothing(client, derive, param):
    spec = {"method": "mean_difference", "positive": POSITIVE, "negative": NEGATIVE, "layers": [6], **derive}
    response = client.post("/v1/interventions", json={"id": "derived-bad", "derive": spec})
    assert response.status_code == 400, response.text
    if param is not None:
        assert response.json()["error"]["param"] == param
    assert client.get("/v1/interventions/derived-bad").status_code == 404
