"""Control vectors served per request equal their library's own application on the default model.

Reference: repeng 0.4.0's ``ControlModel.set_control(vector, coeff)``, steering-vectors 0.12.2's
``SteeringVector.apply(model, multiplier=…, operator=…)`` and a CAA forward hook, greedy in float32,
recorded by ``tests/fixtures/make_control_vector_fixtures.py``. The coefficient / multiplier is the
request's scale.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import shutil

import httpx
import pytest

from live_server import REPO
from steering_helpers import complete, tokens

DATA = REPO / "tests" / "fixtures" / "data_control_vectors"
DOC = json.loads((DATA / "cases.json").read_text())
CASES = {c["name"]: c for c in DOC["cases"]}


@pytest.fixture(scope="module")
def cv_client(server, intervention_dir):
    with httpx.Client(base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=16)) as c:
        for case in DOC["cases"]:
            target = intervention_dir / "control_vectors" / case["file"]
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(DATA / case["file"], target)
            body = {"id": f"cv-{case['name']}", "source": str(target), "replace": True}
            if case["operator"] != "addition":
                body["operator"] = case["operator"]
            response = c.post("/v1/interventions", json=body)
            assert response.status_code == 201, response.text
        yield c


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_the_library(cv_client, name):
    case = CASES[name]
    steering = [{"id": f"cv-{name}", "scale": case["scale"]}]
    with cf.ThreadPoolExecutor(len(DOC["prompts"])) as pool:
        got = list(pool.map(lambda p: tokens(complete(cv_client, p["prompt_ids"], DOC["new_tokens"],
                                                      interventions=steering)), DOC["prompts"]))
    assert got == case["steered_ids"], name
    assert all(g != p["unsteered_ids"] for g, p in zip(got, DOC["prompts"])), name


def test_mixed_burst_equals_each_alone(cv_client):
    """Every file and a plain request in one concurrent burst: each gets its library's tokens."""
    prompt = DOC["prompts"][0]
    mixes = [{}] + [{"interventions": [{"id": f"cv-{n}", "scale": c["scale"]}]} for n, c in CASES.items()]
    with cf.ThreadPoolExecutor(len(mixes)) as pool:
        got = list(pool.map(lambda m: tokens(complete(cv_client, prompt["prompt_ids"], DOC["new_tokens"], **m)),
                            mixes))
    assert got[0] == prompt["unsteered_ids"]
    for (name, case), steered in zip(CASES.items(), got[1:]):
        assert steered == case["steered_ids"][0], name


def test_unknown_operator_is_a_400_and_nothing_registered(cv_client, intervention_dir):
    response = cv_client.post("/v1/interventions", json={
        "id": "cv-bad-op", "source": str(intervention_dir / "control_vectors" / "steering_vector.pt"),
        "operator": "multiply"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_operator" and "'multiply'" in error["message"] and error["param"] == "operator"
    assert cv_client.get("/v1/interventions/cv-bad-op").status_code == 404


ITI = REPO / "tests" / "fixtures" / "data_iti"
ITI_DOC = json.loads((ITI / "cases.json").read_text())


def test_pyvene_iti_object_equals_pyvene_generate(cv_client, intervention_dir):
    """An Inference-Time-Intervention object as the pyvene docs load one (per-head ``AdditionIntervention``
    shifts at ``model.layers[i].self_attn.o_proj.input`` of five layers, saved by pyvene 0.1.8) registers as
    saved and, on generated positions (pyvene's ``generate`` default ``intervene_on_prompt=False``), gives
    pyvene's own greedy tokens, alone and in one burst beside plain requests."""
    target = shutil.copytree(ITI / "iti", intervention_dir / "iti", dirs_exist_ok=True)
    response = cv_client.post("/v1/interventions", json={"id": "iti", "source": str(target), "positions": "generated",
                                                          "replace": True})
    assert response.status_code == 201, response.text
    sites = {(e["placement"]["layer"], e["placement"]["component"]) for e in response.json()["edits"]}
    assert sites == {(int(layer), "attention_value_output") for layer in ITI_DOC["heads"]}, sites
    cases = ITI_DOC["cases"]
    jobs = [(c, True) for c in cases] + [(c, False) for c in cases]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: tokens(complete(cv_client, job[0]["prompt_ids"], ITI_DOC["max_new_tokens"],
                                                        **({"intervention": "iti"} if job[1] else {}))), jobs))
    for (case, steered), answer in zip(jobs, got):
        want = case["iti_ids"] if steered else case["unsteered_ids"]
        assert answer == want, (case["text"], steered)
    assert all(c["iti_ids"] != c["unsteered_ids"] for c in cases)
