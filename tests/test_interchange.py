"""Interchange interventions with a source per request: pyvene 0.1.8's own save dirs (saved without a
source, as a trained DAS is) served on the seeded tiny Llama give pyvene's greedy tokens for each
(base, source) pair, solo and in one burst with plain and steered requests; bad sources are 400s."""
from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file

from fixtures.tiny_models import build_tiny_model
from live_server import FIXTURES, ServerProcess
from steering_helpers import complete, random_loreft, register, tokens

DATA = FIXTURES.parent / "data_interchange"
DOC = json.loads((DATA / "cases.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, intervention_dir):
    from steer_serve.model import prepare_default_model

    root = tmp_path_factory.mktemp("interchange")
    build_tiny_model("LlamaForCausalLM", root / "model", prepare_default_model())
    proc = ServerProcess("--model", str(root / "model"), "--allowed-intervention-dir", str(DATA),
                         "--allowed-intervention-dir", str(intervention_dir), "--max-interventions", "8",
                         "--max-rank", "128", "--max-model-len", "512", "--max-num-batched-tokens", "32", "--max-num-seqs", "16",
                         registry_dir=root / "registry", log_path=root / "server.log").start()
    with httpx.Client(base_url=proc.url, timeout=300) as client:
        for case in DOC["cases"]:
            response = client.post("/v1/interventions", json={"id": case["name"], "source": str(DATA / case["name"])})
            assert response.status_code == 201, response.text
        register(client, intervention_dir, "tiny-loreft", _tiny_loreft())
        yield client, proc
    proc.stop()


def _request(case: str, pair: dict, **fields) -> dict:
    ref = {"id": case, "positions": pair["positions"], "source": {"prompt": pair["source"], "positions": pair["positions"]}}
    return {"prompt": pair["base"], "max_tokens": DOC["new_tokens"], "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "interventions": [ref], **fields}


def test_interchange_equals_pyvene(tiny):
    """Each family, each (base, source) pair: pyvene's greedy tokens, and its first step's top-5 log-probabilities to 1e-4."""
    client, _ = tiny
    first = load_file(str(DATA / "first_step.safetensors"))
    for pair, plain in zip(DOC["pairs"], DOC["plain"]):
        assert tokens(complete(client, pair["base"], DOC["new_tokens"], ignore_eos=True)) == plain
    for case in DOC["cases"]:
        for i, (pair, expected) in enumerate(zip(DOC["pairs"], case["steered_ids"])):
            body = _request(case["name"], pair, logprobs=5, return_tokens_as_token_ids=True)
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]   # the first step
            ids, logprobs = first[f"{case['name']}.{i}.ids"].tolist(), first[f"{case['name']}.{i}.logprobs"]
            assert [int(t.removeprefix("token_id:")) for t in top] == ids[:5], (case["name"], i)
            got = torch.tensor(list(top.values()))
            assert (got - logprobs[:5]).abs().max() < 1e-4, (case["name"], i, got, logprobs[:5])
            assert tokens(response.json()) == expected, (case["name"], i)


def test_leading_subspaces_equal_pyvene_interchange_dim(tiny):
    """``subspaces`` = the first ``interchange_dim`` dimensions (all r of a low-rank rotation) is the same swap in
    pyvene: these requests skip the slot (their term carries the axes) and still give pyvene's tokens and first step."""
    client, _ = tiny
    first = load_file(str(DATA / "first_step.safetensors"))
    dims = {"vanilla": 64, "rotated_space": 16, "low_rank_rotated_space": 48}
    for case in (c for c in DOC["cases"] if c["name"] in dims):
        for i, (pair, expected) in enumerate(zip(DOC["pairs"], case["steered_ids"])):
            body = _request(case["name"], pair, logprobs=5, return_tokens_as_token_ids=True)
            body["interventions"][0]["subspaces"] = list(range(dims[case["name"]]))
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            got = torch.tensor(list(top.values()))
            assert (got - first[f"{case['name']}.{i}.logprobs"][:5]).abs().max() < 1e-4, (case["name"], i, got)
            assert tokens(response.json()) == expected, (case["name"], i)


def test_a_saved_subspace_partition_groups_the_subspaces(tiny, intervention_dir):
    """pyvene's ``subspace_partition`` (here written into the rotated space's saved config, as pyvene saves a
    representation's) makes ``subspaces`` name its groups: groups 0 and 1 = the 16 dimensions pyvene swapped."""
    client, _ = tiny
    target = intervention_dir / "rotated-partitioned"
    if not target.exists():
        shutil.copytree(DATA / "rotated_space", target)
        config = json.loads((target / "config.json").read_text())
        config["representations"][0][7] = [[0, 8], [8, 16], [16, 128]]
        (target / "config.json").write_text(json.dumps(config))
    response = client.post("/v1/interventions", json={"id": "rotated-partitioned", "source": str(target)})
    assert response.status_code in (201, 409), response.text
    case = next(c for c in DOC["cases"] if c["name"] == "rotated_space")
    for i, (pair, expected) in enumerate(zip(DOC["pairs"], case["steered_ids"])):
        body = _request("rotated-partitioned", pair)
        body["interventions"][0]["subspaces"] = [1, 0]
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert tokens(response.json()) == expected, i
    body["interventions"][0]["subspaces"] = [3]
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "interventions[0].subspaces"


def test_interchange_in_a_burst_with_plain_and_steered(tiny):
    """Every family and pair at once, beside plain requests and a LoReFT on every token of layer 0."""
    client, proc = tiny
    steered = [tokens(complete(client, pair["base"], DOC["new_tokens"], ignore_eos=True, intervention="tiny-loreft"))
               for pair in DOC["pairs"]]

    async def burst():
        async with httpx.AsyncClient(base_url=proc.url, timeout=600) as c:
            jobs = []
            for case in DOC["cases"]:
                for i, pair in enumerate(DOC["pairs"]):
                    jobs.append((case["steered_ids"][i], c.post("/v1/completions", json=_request(case["name"], pair))))
            for i, pair in enumerate(DOC["pairs"]):
                plain = {"prompt": pair["base"], "max_tokens": DOC["new_tokens"], "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True}
                jobs.append((DOC["plain"][i], c.post("/v1/completions", json=plain)))
                jobs.append((steered[i], c.post("/v1/completions", json={**plain, "intervention": "tiny-loreft"})))
            replies = await asyncio.gather(*(job for _, job in jobs))
            return [(expected, reply) for (expected, _), reply in zip(jobs, replies)]

    for expected, reply in asyncio.run(burst()):
        assert reply.status_code == 200, reply.text
        assert tokens(reply.json()) == expected


def _tiny_loreft():
    from steer_serve.interventions.base import Intervention

    iv = random_loreft(3, layer=0, width=128, strength=6.0)
    return Intervention(iv.edits, 128, positions="all")


_SOURCED = {"id": "rotated_space", "positions": "l1", "source": {"prompt": [5, 6, 7, 8], "positions": "l1"}}


@pytest.mark.parametrize("ref,param", [
    ({"id": "rotated_space", "positions": "l1"}, "interventions[0].source"),
    ({"id": "rotated_space", "positions": "l2", "source": {"prompt": [5, 6, 7, 8], "positions": "l1"}},
     "interventions[0].source.positions"),
    ({"id": "rotated_space", "positions": "all", "source": {"prompt": [5, 6, 7, 8], "positions": "l1"}},
     "interventions[0].positions"),
    ({"id": "rotated_space", "positions": "l2", "source": {"prompt": [5, 6], "positions": "l2"}},
     "interventions[0].source.prompt"),
    ({"id": "rotated_space", "positions": "l1", "source": {"prompt": list(range(600, 1200)), "positions": "l1"}},
     "interventions[0].source.prompt"),
    ({"id": "tiny-loreft", "source": {"prompt": [5, 6, 7, 8], "positions": "l1"}}, "interventions[0].source"),
    ({"id": "rotated_space", "positions": "l1", "subspaces": [0]}, "interventions[0].subspaces"),
    ({**_SOURCED, "id": "boundless_rotated_space", "subspaces": [0]}, "interventions[0].subspaces"),
    ({**_SOURCED, "subspaces": []}, "interventions[0].subspaces"),
    ({**_SOURCED, "subspaces": [3, 1, 3]}, "interventions[0].subspaces"),
    ({**_SOURCED, "subspaces": [128]}, "interventions[0].subspaces"),
    ({**_SOURCED, "id": "low_rank_rotated_space", "subspaces": [48]}, "interventions[0].subspaces"),
    ({**_SOURCED, "id": "vanilla", "subspaces": [-1]}, "interventions[0].subspaces"),
])
def test_interchange_refusals(tiny, ref, param):
    client, _ = tiny
    response = client.post("/v1/completions", json={"prompt": [5, 6, 7, 8, 9], "max_tokens": 1, "interventions": [ref]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("subspaces", [[0.5], [True], "0"])
def test_subspaces_must_be_integers(tiny, subspaces):
    client, _ = tiny
    ref = {**_SOURCED, "subspaces": subspaces}
    response = client.post("/v1/completions", json={"prompt": [5, 6, 7, 8, 9], "max_tokens": 1, "interventions": [ref]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].replace("[", ".").replace("]", "").startswith("interventions.0.subspaces")


def test_a_chat_form_source_is_its_chat_template_rendering(small_server, intervention_dir, tiny):
    """``source.messages`` gives the tokens of the same source given as the ids the model's chat template
    renders (transformers' own ``apply_chat_template``, generation prompt on); a model without a chat
    template (the tiny one) and malformed forms are 400s naming the field."""
    from transformers import AutoTokenizer

    from steer_serve.formats.native import save_native
    from steer_serve.interventions.base import Edit, Intervention, Placement
    from steer_serve.model import prepare_default_model

    gen = torch.Generator().manual_seed(6)
    rotate = torch.linalg.qr(torch.randn(576, 8, generator=gen))[0].contiguous()
    edit = Edit("low_rank_rotated_space", Placement(12, "block_output"), {"rotate_layer": rotate,
                                                                           "source": torch.zeros(576)},
                {"source": "request"})
    save_native(Intervention([edit], 576, positions="l1"), intervention_dir / "das-chat")
    messages = [{"role": "user", "content": "The capital of Italy is"}]
    rendered = AutoTokenizer.from_pretrained(prepare_default_model()).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def body(source):
        ref = {"id": "das-chat", "positions": "l1", "source": {**source, "positions": "l1"}}
        return {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "interventions": [ref]}

    with httpx.Client(base_url=small_server.url, timeout=300) as client:
        response = client.post("/v1/interventions", json={"id": "das-chat", "source": str(intervention_dir / "das-chat")})
        assert response.status_code == 201, response.text
        replies = [client.post("/v1/completions", json=body(form)) for form in ({"prompt": rendered},
                                                                                 {"messages": messages})]
        assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
        assert tokens(replies[0].json()) == tokens(replies[1].json())
        for source in ({"messages": messages, "prompt": [5, 6]}, {},
                       {"messages": [{"role": "user", "content": 3}]}):
            response = client.post("/v1/completions", json=body(source))
            assert response.status_code == 400, (source, response.text)
            param = response.json()["error"]["param"]   # pydantic's dotted path for the form, ours for the template
            assert param.replace("[", ".").replace("]", "").startswith("interventions.0.source"), response.text
    client, _ = tiny
    ref = {"id": "rotated_space", "positions": "l1", "source": {"messages": messages, "positions": "l1"}}
    response = client.post("/v1/completions", json={"prompt": [5, 6, 7, 8], "max_tokens": 1, "interventions": [ref]})
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"], response.text
    assert response.json()["error"]["param"] == "interventions[0].source.messages"


def test_capture_equals_pyvene_collect(tiny):
    """``capture`` returns what pyvene's ``CollectIntervention`` collects (keep_last_dim: one row per position)."""
    from test_capture import decode

    client, _ = tiny
    collected = load_file(str(DATA / "collect.safetensors"))
    for i, case in enumerate(DOC["collect"]):
        site = {"layer": case["layer"], "component": case["component"], "positions": case["positions"]}
        body = complete(client, case["prompt"], 1, capture=[site])
        got = torch.from_numpy(decode(body["choices"][0]["captures"][0]).copy())
        assert got.shape == collected[str(i)].shape
        assert (got - collected[str(i)]).abs().max() <= 1e-5 * collected[str(i)].abs().max(), case


def test_interchange_on_the_default_model_under_chunked_prefill(small_server, intervention_dir):
    """A low-rank rotated-space DAS at layer 10 of the default model, ``l2`` ↔ ``l2``, a 70-token base and a
    40-token source prefilled in 32-token chunks: the tokens of transformers with pyvene's interchange math
    hooked at ``model.layers.10`` on the prompt forward, given the source run's own layer-10 rows."""
    from transformers import AutoModelForCausalLM

    from steer_serve.formats.native import save_native
    from steer_serve.interventions import get_family
    from steer_serve.interventions.base import Edit, Intervention, Placement
    from steer_serve.model import prepare_default_model
    from test_capture import LONG, hf_activations

    gen = torch.Generator().manual_seed(5)
    rotate = torch.linalg.qr(torch.randn(576, 8, generator=gen))[0].contiguous()   # the small server's max rank
    params = {"rotate_layer": rotate, "source": torch.zeros(576)}
    edit = Edit("low_rank_rotated_space", Placement(10, "block_output"), params, {"source": "request"})
    save_native(Intervention([edit], 576, positions="l2"), intervention_dir / "das-default")
    base, source = LONG, LONG[5:45]
    with httpx.Client(base_url=small_server.url, timeout=300) as client:
        response = client.post("/v1/interventions", json={"id": "das-default", "source": str(intervention_dir / "das-default")})
        assert response.status_code in (201, 409), response.text
        ref = {"id": "das-default", "positions": "l2", "source": {"prompt": source, "positions": "l2"}}
        got = tokens(complete(client, base, 12, ignore_eos=True, interventions=[ref]))
        plain = tokens(complete(client, base, 12, ignore_eos=True))
    rows = hf_activations(source, [("model.layers.10", "output")])[0][-2:]
    family = get_family("low_rank_rotated_space")
    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()

    def interchange(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] != len(base):
            return out
        h = h.clone()
        for i, position in enumerate((len(base) - 2, len(base) - 1)):
            h[0, position] = family.apply(h[0, position:position + 1], {**params, "source": rows[i]}, {})[0]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.model.layers[10].register_forward_hook(interchange)
    with torch.no_grad():
        out = model.generate(torch.tensor([base]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert got == out[0, len(base):].tolist()
    assert got != plain
