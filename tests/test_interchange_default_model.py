"""Interchange on the default model against pyvene 0.1.8's own outputs (``fixtures/data_interchange_default``):
DAS interventions trained briefly on a counterfactual task and saved without a source, served by the session
server with a source per request, with and without pyvene's ``subspaces``, alone and in one burst with plain and
steered requests. Boundless DAS (rank 576, above the session server's ``--max-rank``) gets a server of its own."""
from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import torch
from safetensors.torch import load_file

from live_server import FIXTURES, ServerProcess
from steering_helpers import complete, random_loreft, register, tokens

DATA = FIXTURES.parent / "data_interchange_default"
DOC = json.loads((DATA / "cases.json").read_text())
FIRST = load_file(str(DATA / "first_step.safetensors"))
BOUNDLESS = "boundless_rotated_space"
SESSION_CASES = [case for case in DOC["cases"] if case["family"] != BOUNDLESS]


def _servable(pair: dict) -> bool:
    """A window takes at most half of a prompt here (pyreft's ``l<n>``); pyvene's ``l3`` of 5 tokens is a 400."""
    count = int(pair["positions"][1:])
    return 2 * count <= min(len(pair["base"]), len(pair["source"]))


PAIRS = [i for i, pair in enumerate(DOC["pairs"]) if _servable(pair)]


def _id(case: dict) -> str:
    return f"pv-default-{case['intervention']}"


def _request(case: dict, pair: dict, **fields) -> dict:
    ref = {"id": _id(case), "positions": pair["positions"], "source": {"prompt": pair["source"],
                                                                        "positions": pair["positions"]}}
    if case["subspaces"] is not None:
        ref["subspaces"] = case["subspaces"]
    return {"prompt": pair["base"], "max_tokens": DOC["new_tokens"], "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "interventions": [ref], **fields}


def _register(client: httpx.Client, directory, cases: list[dict]) -> None:
    """pyvene's save dirs, copied into an allowed directory and registered as they are."""
    for name in sorted({case["intervention"] for case in cases}):
        case = next(c for c in cases if c["intervention"] == name)
        target = directory / _id(case)
        if not target.exists():
            shutil.copytree(DATA / name, target)
        response = client.post("/v1/interventions", json={"id": _id(case), "source": str(target)})
        assert response.status_code in (201, 409), response.text


def _check_alone(client: httpx.Client, cases: list[dict]) -> None:
    """pyvene's greedy tokens, and its first step's top-5 log-probabilities to 5e-4 (a rotated space's rank-k form
    assumes R Rᵀ = I, which holds to float precision only: ~1e-4 here at d = 576), for every case and pair."""
    for case in cases:
        for i in PAIRS:
            pair, expected = DOC["pairs"][i], case["steered_ids"][i]
            response = client.post("/v1/completions", json=_request(case, pair, logprobs=5,
                                                                     return_tokens_as_token_ids=True))
            assert response.status_code == 200, response.text
            top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            ids, logprobs = FIRST[f"{case['name']}.{i}.ids"].tolist(), FIRST[f"{case['name']}.{i}.logprobs"]
            assert [int(t.removeprefix("token_id:")) for t in top] == ids[:5], (case["name"], i)
            got = torch.tensor(list(top.values()))
            assert (got - logprobs[:5]).abs().max() < 5e-4, (case["name"], i, got, logprobs[:5])
            assert tokens(response.json()) == expected, (case["name"], i)


async def _burst(url: str, jobs: list[tuple[list[int], dict]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        replies = await asyncio.gather(*(c.post("/v1/completions", json=body) for _, body in jobs))
    for (expected, body), reply in zip(jobs, replies):
        assert reply.status_code == 200, reply.text
        assert tokens(reply.json()) == expected, body


def _plain(pair: dict, **fields) -> dict:
    return {"prompt": pair["base"], "max_tokens": DOC["new_tokens"], "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **fields}


def test_default_model_interchange_equals_pyvene(server, intervention_dir):
    """Vanilla, rotated and low-rank rotated spaces, each also with ``subspaces``: pyvene's tokens and first-step
    log-probabilities alone, then all at once beside plain requests and a LoReFT on every token."""
    with httpx.Client(base_url=server.url, timeout=300) as client:
        _register(client, intervention_dir, SESSION_CASES)
        for pair, plain in zip(DOC["pairs"], DOC["plain"]):
            assert tokens(complete(client, pair["base"], DOC["new_tokens"], ignore_eos=True)) == plain
        _check_alone(client, SESSION_CASES)
        register(client, intervention_dir, "das-mix-loreft", random_loreft(21, layer=6, strength=6.0))
        steered = [tokens(complete(client, pair["base"], DOC["new_tokens"], ignore_eos=True,
                                   intervention="das-mix-loreft")) for pair in DOC["pairs"]]
        unservable = [pair for pair in DOC["pairs"] if not _servable(pair)]
        for pair in unservable:
            response = client.post("/v1/completions", json=_request(SESSION_CASES[0], pair))
            assert response.status_code == 400 and "half the prompt" in response.json()["error"]["message"]
    jobs = [(case["steered_ids"][i], _request(case, DOC["pairs"][i])) for case in SESSION_CASES for i in PAIRS]
    for i, pair in enumerate(DOC["pairs"]):
        jobs += [(DOC["plain"][i], _plain(pair)), (steered[i], _plain(pair, intervention="das-mix-loreft"))]
    asyncio.run(_burst(server.url, jobs))


def test_default_model_boundless_equals_pyvene(tmp_path):
    """Boundless DAS (rank 576: its low-rank form is exact, so full rank) on a server whose slots take it (one slot,
    ``block_output`` only): pyvene's tokens and first-step log-probabilities alone, then beside plain requests."""
    cases = [case for case in DOC["cases"] if case["family"] == BOUNDLESS]
    proc = ServerProcess("--allowed-intervention-dir", str(tmp_path), "--max-rank", "576", "--max-interventions", "1",
                         "--intervention-components", "block_output", "--max-model-len", "256",
                         registry_dir=tmp_path / "registry", log_path=tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=300) as client:
            _register(client, tmp_path, cases)
            _check_alone(client, cases)
        jobs = [(case["steered_ids"][i], _request(case, DOC["pairs"][i])) for case in cases for i in PAIRS]
        jobs += [(plain, _plain(pair)) for pair, plain in zip(DOC["pairs"], DOC["plain"])]
        asyncio.run(_burst(proc.url, jobs))
    finally:
        proc.stop()
