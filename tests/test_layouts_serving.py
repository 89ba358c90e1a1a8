"""pyreft's ``share_weights=False`` save dir and pyvene string-addressed components, served.

Greedy tokens through the live server equal the libraries' own (``fixtures/data_layouts``:
pyreft's ``ReftModel.generate`` at its ``get_intervention_locations``; pyvene's forward), solo
and in one concurrent burst; the registry gives the two halves of a split dir a slot each.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import shutil

import httpx
import pytest

from live_server import FIXTURES
from steer_serve.formats.pyreft import read_pyreft_dir
from steer_serve.registry import RegistryError
from steering_helpers import complete, tokens

LAYOUTS = FIXTURES.parent / "data_layouts"


def _doc(name: str) -> dict:
    return json.loads((LAYOUTS / "generation" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def layout_ids(server, intervention_dir):
    """The split pyreft dir (registered with its default positions) and the string-addressed pyvene dir."""
    ids = {}
    with httpx.Client(base_url=server.url, timeout=300) as client:
        for name, directory in (("layout-split", "pyreft_split"), ("layout-string", "pyvene_string_smollm")):
            target = intervention_dir / directory
            if not target.exists():
                shutil.copytree(LAYOUTS / directory / "save", target)
            response = client.post("/v1/interventions", json={"id": name, "source": str(target)})
            assert response.status_code in (201, 409), response.text
            ids[directory] = name
    return ids


def _cases(layout_ids):
    """(prompt ids, max_tokens, request fields, expected tokens) for every recorded generation."""
    out = []
    for positions in ("f1+l1", "f2+l2"):
        doc = _doc(f"pyreft_split_{positions}")
        fields = {"interventions": [{"id": layout_ids["pyreft_split"], "positions": positions}]}
        out += [(p["prompt_ids"], doc["max_new_tokens"], fields, p["steered_ids"]) for p in doc["prompts"]]
    doc = _doc("pyvene_string_smollm")
    out += [(p["prompt_ids"], doc["max_new_tokens"], {"intervention": layout_ids["pyvene_string_smollm"]},
             p["steered_ids"]) for p in doc["prompts"]]
    return out


def test_split_layout_registers_with_its_halves(client, layout_ids):
    body = client.get(f"/v1/interventions/{layout_ids['pyreft_split']}").json()
    assert body["positions"] == "f1+l1"
    assert [(e["placement"]["layer"], e["window"]) for e in body["edits"]] == [(15, "first"), (15, "last")]


@pytest.mark.parametrize("positions", ["f1+l1", "f2+l2"])
def test_split_layout_equals_pyreft_generate(client, layout_ids, positions):
    doc = _doc(f"pyreft_split_{positions}")
    for prompt in doc["prompts"]:
        fields = {"interventions": [{"id": layout_ids["pyreft_split"], "positions": positions}]}
        got = tokens(complete(client, prompt["prompt_ids"], doc["max_new_tokens"], **fields))
        assert got == prompt["steered_ids"], prompt["text"]


def test_string_components_equal_pyvene(client, layout_ids):
    doc = _doc("pyvene_string_smollm")
    for prompt in doc["prompts"]:
        got = tokens(complete(client, prompt["prompt_ids"], doc["max_new_tokens"],
                              intervention=layout_ids["pyvene_string_smollm"]))
        assert got == prompt["steered_ids"], prompt["text"]


def test_layouts_in_one_burst(server, layout_ids):
    """Every recorded generation at once, mixed with plain requests in one continuous batch."""
    cases = _cases(layout_ids)
    cases += [(ids, n, {}, None) for ids, n, _, _ in cases[:4]]
    with cf.ThreadPoolExecutor(len(cases)) as pool, httpx.Client(base_url=server.url, timeout=300,
                                                                 limits=httpx.Limits(max_connections=32)) as c:
        got = list(pool.map(lambda case: tokens(complete(c, case[0], case[1], **case[2])), cases))
    for (_, _, _, want), tokens_ in zip(cases, got):
        if want is not None:
            assert tokens_ == want


def test_registry_gives_each_half_a_slot_and_evicts_them_together():
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry
    from steering_helpers import random_loreft

    async def scenario():
        registry = InterventionRegistry(FakeEngine())  # 2 slots
        split = await registry.register("split", read_pyreft_dir(LAYOUTS / "pyreft_split" / "save"),
                                        source="split", format="pyreft")
        lease = await registry.acquire([("split", None, None), ("split", 0.5, "f3+l2")])
        assert sorted(lease.steering.slots) == [1, 1, 2, 2]
        assert lease.steering.positions == ["f1", "l1", "f3", "l2"]
        assert lease.steering.scales == [1.0, 1.0, 0.5, 0.5]
        await registry.release(lease)
        with pytest.raises(RegistryError, match="at most 4"):
            await registry.acquire([("split", None, None)] * 3)
        await registry.register("one", random_loreft(1), source="one", format="native")
        lease = await registry.acquire([("one", None, None)])
        assert split.slot is None and not registry.slots.owner.keys() - {lease.steering.slots[0]}
        await registry.release(lease)
        lease = await registry.acquire([("split", None, "l1")])
        assert lease.steering.positions == ["l1", "l1"] and registry.occupancy()["loaded"] == 2
        await registry.release(lease)

    asyncio.run(scenario())


def test_module_path_naming_no_site_is_a_400(client, intervention_dir):
    target = intervention_dir / "string-bad-path"
    if not target.exists():
        shutil.copytree(LAYOUTS / "pyvene_string_smollm" / "save", target)
        cfg = json.loads((target / "config.json").read_text())
        cfg["representations"][0][1] = "model.layers[15].mlp.down_proj.output"
        (target / "config.json").write_text(json.dumps(cfg))
    response = client.post("/v1/interventions", json={"id": "string-bad-path", "source": str(target)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_component" and "down_proj" in error["message"]
