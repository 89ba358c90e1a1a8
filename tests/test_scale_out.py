"""Replicas sharing one intervention store (``--shared-registry``): concurrent writers lose nothing,
every replica follows the others' changes, an id registered elsewhere is resolved on first use, and
requests in flight keep what they started with."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from live_server import REPO, ServerProcess
from steering_helpers import random_loreft
from steer_serve.registry import RegistryError

_WRITER = textwrap.dedent("""
    import asyncio, pathlib, sys
    sys.path.insert(0, {tests!r})
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry
    from steering_helpers import random_loreft

    async def main(directory, name, count, store_url):
        registry = InterventionRegistry(FakeEngine(), persist_dir=pathlib.Path(directory), shared=True,
                                        store_url=store_url or None)
        await registry.restore()
        for k in range(count):
            await registry.register(f"{{name}}-{{k}}", random_loreft(k, layer=k % 30), source="x", format="native")
            if k % 4 == 3:
                await registry.unregister(f"{{name}}-{{k - 1}}")

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
""")


@pytest.fixture(params=["directory", "redis"])
def store(request, tmp_path):
    """Where the replicas of a test share their registry: a directory (``--shared-registry``) or a real
    Redis server (``--registry-store``). Returns ``local(name)``: the keyword arguments of one replica's
    ``InterventionRegistry`` (with Redis each replica has its own local weights cache)."""
    if request.param == "directory":
        return lambda name: {"persist_dir": tmp_path / "store", "shared": True}
    url = request.getfixturevalue("redis_url")
    return lambda name: {"persist_dir": tmp_path / "cache" / name, "shared": True, "store_url": url}


def test_two_processes_registering_at_once_lose_nothing(tmp_path, store):
    """Two writer processes register (and delete) 40 ids each on one shared store at the same time:
    the store ends with exactly every id either kept, and their weights, nothing else."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(REPO / "tests")))
    writers = [subprocess.Popen([sys.executable, str(script), str(store(name)["persist_dir"]), name, "40",
                                 store(name).get("store_url", "")], cwd=REPO)
               for name in ("a", "b")]
    assert [w.wait(300) for w in writers] == [0, 0]
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry

    registry = InterventionRegistry(FakeEngine(), **store("reader"))
    restored = set(asyncio.run(registry.restore()))
    expected = {f"{name}-{k}" for name in "ab" for k in range(40) if k % 4 != 2}
    assert restored == expected
    assert stored_weights(registry) == {e.content_hash for e in registry.entries.values()}


def stored_weights(registry) -> set[str]:
    """The content hashes whose weights the registry's store holds."""
    from steer_serve.registry.redis_store import RedisStore

    if isinstance(registry.store, RedisStore):
        return {key.decode().rsplit(":", 1)[1] for key in registry.store.client.scan_iter(match="steer-serve:files:*")}
    return {path.name for path in registry.store.weights_dir.iterdir()}


async def test_replicas_follow_each_other_and_in_flight_requests_keep_their_entry(store):
    from fake_engine import FakeEngine
    from steer_serve.registry import InterventionRegistry

    a = InterventionRegistry(FakeEngine(), **store("a"))
    b = InterventionRegistry(FakeEngine(), **store("b"))
    await a.restore()
    await b.restore()
    await a.register("x", random_loreft(960), source="x", format="native")
    lease = await b.acquire([("x", None, None)])           # b resolves x from the store on first use
    assert lease.steering.slots
    assert lease.entries[0].content_hash == a.entries["x"].content_hash   # the same weights, whatever the store
    unsynced = InterventionRegistry(FakeEngine(), **store("c"))
    with pytest.raises(RegistryError) as exists:
        await unsynced.register("x", random_loreft(961), source="x", format="native")
    assert exists.value.code == "conflict"                   # the id exists in the shared store
    await a.register("x", random_loreft(962), source="x", format="native", replace=True)
    old = lease.entries[0]
    await b.sync()
    assert b.entries["x"] is not old and old.refcount == 1    # the new weights for new requests ...
    assert old.loaded                                         # ... and the in-flight request keeps its slot
    await b.release(lease)
    await asyncio.sleep(0.05)
    assert not old.loaded                                     # retired once unused
    await b.unregister("x")
    await a.sync()
    assert "x" not in a.entries and not a.store.records() and not stored_weights(a)


def _tiny_loreft_dir(directory, seed: int, hidden: int):
    from steer_serve.formats.native import save_native
    from steer_serve.interventions.base import Edit, Intervention, Placement

    gen = torch.Generator().manual_seed(seed)
    rotate, _ = torch.linalg.qr(torch.randn(hidden, 4, generator=gen))
    params = {"rotate_layer": rotate.contiguous(), "weight": torch.randn(4, hidden, generator=gen) * 0.5,
              "bias": torch.randn(4, generator=gen) * 4}
    save_native(Intervention([Edit("loreft", Placement(1, "block_output"), params)], hidden, positions="all"), directory)
    return directory


def _requests_by_intervention(client: httpx.Client) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r'^steer_requests_total\{intervention="([^"]+)"\} (\S+)$',
                                                   client.get("/metrics").text, re.M)}


def test_two_replicas_on_one_networked_store_behind_a_real_router(tmp_path, redis_url):
    """Two tiny-model servers on one Redis store (``--registry-store``; each with its own local
    --registry-dir, as on two machines) behind vLLM's own router (vllm-router, consistent hashing on
    ``X-Session-ID`` = the intervention id): registrations through either replica are served through
    the router; each intervention's traffic lands on one replica (affinity); every routed answer
    equals the solo answer of both replicas; a delete through one replica is a 404 on the other
    within the poll interval. The catalogue (12) is six times the fleet's slots (2 × 2)."""
    from fixtures.tiny_models import HIDDEN, build_tiny_model
    from live_server import free_port
    from steer_serve.model import prepare_default_model

    build_tiny_model("LlamaForCausalLM", tmp_path / "model", prepare_default_model())
    names = [f"fleet-{i}" for i in range(12)]     # a catalogue six times the fleet's 2 × 2 slots
    sources = {name: _tiny_loreft_dir(tmp_path / "ivs" / name, 970 + i, HIDDEN) for i, name in enumerate(names)}
    common = ("--model", str(tmp_path / "model"), "--max-model-len", "256", "--registry-store", redis_url,
              "--max-interventions", "2", "--registry-poll-interval", "0.5",
              "--allowed-intervention-dir", str(tmp_path / "ivs"))
    servers = [ServerProcess(*common, registry_dir=tmp_path / f"local{i}", log_path=tmp_path / f"s{i}.log")
               for i in range(2)]
    router_port = free_port()
    router = None
    try:
        for server in servers:
            server.start()
        replicas = [httpx.Client(base_url=s.url, timeout=120) for s in servers]
        for i, name in enumerate(names):           # registered through either replica
            registered = replicas[i % 2].post("/v1/interventions", json={"id": name, "source": str(sources[name])})
            assert registered.status_code == 201, registered.text
        router = subprocess.Popen([str(Path(sys.executable).parent / "vllm-router"), "--host", "127.0.0.1", "--port",
                                   str(router_port), "--worker-urls", *[s.url for s in servers], "--policy",
                                   "consistent_hash", "--log-level", "warning"],
                                  stdout=open(tmp_path / "router.log", "wb"), stderr=subprocess.STDOUT)
        routed = httpx.Client(base_url=f"http://127.0.0.1:{router_port}", timeout=120)
        deadline = time.monotonic() + 60
        while True:
            try:
                if routed.get("/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and router.poll() is None, (tmp_path / "router.log").read_text()
            time.sleep(0.5)
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0}
        traffic = [name for name in names for _ in range(2)] + [None] * 4

        def send(name):
            headers = {"X-Session-ID": name or "plain"}
            response = routed.post("/v1/completions", json={**body, "intervention": name}, headers=headers)
            assert response.status_code == 200, response.text
            return name, response.json()["choices"][0]["text"]

        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, traffic))
        counts = [_requests_by_intervention(c) for c in replicas]
        for name in names:                          # affinity: one replica served all of one intervention
            assert sorted(c.get(name, 0) for c in counts) == [0, 2], (name, counts)
        for name, text in answers:                  # solo answers, on both replicas
            solo = {c.post("/v1/completions", json={**body, "intervention": name}).json()["choices"][0]["text"]
                    for c in replicas}
            assert solo == {text}, (name, solo, text)
        assert len({text for _, text in answers}) > len(names) // 2     # the interventions really steer
        assert set(names) <= {m["id"] for m in routed.get("/v1/models").json()["data"]}
        assert replicas[1].delete(f"/v1/interventions/{names[0]}").status_code == 200
        deadline = time.monotonic() + 10
        while replicas[0].get(f"/v1/interventions/{names[0]}").status_code != 404:
            assert time.monotonic() < deadline, "the delete did not reach the other replica"
            time.sleep(0.2)
    finally:
        if router is not None:
            router.kill()
            router.wait(30)
        for server in servers:
            server.stop()


async def test_routers_see_interventions_in_vllms_lora_metric():
    """``vllm:lora_requests_info`` (what LoRA-affinity routers read) lists an intervention in use as a
    running adapter, and once only (vLLM's own series of that name is replaced, not duplicated)."""
    from fake_engine import FakeEngine, fake_app

    app, state = fake_app(FakeEngine(step_seconds=0.05))
    await state.registry.register("routed", random_loreft(975), source="x", format="native")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        slow = asyncio.create_task(client.post("/v1/completions", json={"prompt": [5], "max_tokens": 60,
                                                                         "intervention": "routed"}))
        while state.limiter.in_flight < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        text = (await client.get("/metrics")).text
        series = re.findall(r'^vllm:lora_requests_info\{([^}]*)\} (\S+)$', text, re.M)
        assert len(series) == 1 and text.count("# TYPE vllm:lora_requests_info ") == 1, text
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series[0][0]))
        assert labels == {"max_lora": "2", "waiting_lora_adapters": "", "running_lora_adapters": "routed"}
        assert (await slow).status_code == 200
        labels = dict(re.findall(r'(\w+)="([^"]*)"', re.search(r'^vllm:lora_requests_info\{([^}]*)\}',
                                                                (await client.get("/metrics")).text, re.M)[1]))
        assert labels["running_lora_adapters"] == ""


def test_a_shared_directory_and_a_server_that_wants_it_alone_exclude_each_other(tmp_path):
    """A server without --shared-registry is refused on a directory replicas share, and the reverse."""
    from steer_serve.registry import claim_registry_dir

    replica = claim_registry_dir(tmp_path / "shared", shared=True)
    with pytest.raises(SystemExit, match="in use by another steer-serve process"):
        claim_registry_dir(tmp_path / "shared")
    replica.close()
    owner = claim_registry_dir(tmp_path / "owned")
    with pytest.raises(SystemExit, match="start every replica with --shared-registry"):
        claim_registry_dir(tmp_path / "owned", shared=True)
    owner.close()


def test_an_unreachable_networked_store_fails_at_start_up(tmp_path):
    from live_server import free_port
    from steer_serve.registry import open_store

    with pytest.raises(SystemExit, match="cannot reach the store"):
        open_store(tmp_path, url=f"redis://127.0.0.1:{free_port()}/0").check()
    with pytest.raises(ValueError, match="expected redis://"):
        open_store(tmp_path, url="http://example/0")


def test_more_than_one_api_server_is_refused_with_the_reason():
    """vLLM's ``--api-server-count`` > 1 would split the slot assignment: refused at start-up, naming the flag."""
    from steer_serve.api.vllm_frontend import frontend_args

    assert frontend_args("m", "m", ["--api-server-count", "1"]).api_server_count == 1
    with pytest.raises(ValueError, match=r"--api-server-count 2: .*one API process per engine"):
        frontend_args("m", "m", ["--api-server-count", "2"])


def _histogram(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of a Prometheus histogram in ``text``."""
    values = dict(re.findall(rf"^{name}_(count|sum) (\S+)$", text, re.M))
    return float(values.get("count", 0)), float(values.get("sum", 0))


async def test_a_catalogue_far_larger_than_the_slots_pages_under_zipf_traffic(small_server, intervention_dir):
    """1,000 registered steering vectors, 2 slots, Zipf(1.1) traffic over them (48 requests, 16 at a
    time): every answer equals its solo answer (the same request alone on the idle server); the slot
    hit rate and the load latency are read from the metrics and printed."""
    from steering_helpers import random_vector, register

    catalogue = 1000
    with httpx.Client(base_url=small_server.url, timeout=600) as client:
        for k in range(catalogue):
            register(client, intervention_dir, f"zipf-{k}", random_vector(5000 + k, layer=k % 30,
                                                                           component="block_output"))
        rng = torch.Generator().manual_seed(7)
        weights = torch.tensor([1 / (k + 1) ** 1.1 for k in range(catalogue)])
        drawn = [int(k) for k in torch.multinomial(weights, 48, replacement=True, generator=rng)]
        prompt = [504, 3575, 282, 4649, 314]

        def body(k):
            return {"prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True,
                    "ignore_eos": True, "intervention": f"zipf-{k}"}

        solo = {k: client.post("/v1/completions", json=body(k)).json()["choices"][0]["token_ids"] for k in set(drawn)}
        assert len(set(map(tuple, solo.values()))) > 1          # the vectors really steer differently
        before = _histogram(client.get("/metrics").text, "steer_slot_load_seconds")
    in_flight = asyncio.Semaphore(16)       # the server's --max-num-seqs: more would be a 429 (admission)

    async def send(k):
        async with in_flight:
            return await aclient.post("/v1/completions", json=body(k))

    async with httpx.AsyncClient(base_url=small_server.url, timeout=600) as aclient:
        replies = await asyncio.gather(*(send(k) for k in drawn))
        metrics = (await aclient.get("/metrics")).text
    for k, reply in zip(drawn, replies):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["token_ids"] == solo[k], k
    loads, seconds = (a - b for a, b in zip(_histogram(metrics, "steer_slot_load_seconds"), before))
    print(f"\nZipf paging: {catalogue} registered, 2 slots, {len(drawn)} requests over {len(set(drawn))} ids: "
          f"slot hit rate {1 - loads / len(drawn):.2f}, {loads:.0f} loads, mean load {1000 * seconds / max(loads, 1):.1f} ms")
    assert 0 < loads <= len(drawn)


async def test_prompt_entries_are_stored_and_followed_like_adapters(store):
    """A prompt-space adapter (virtual tokens, an owned directory) registered by one replica is resolved by
    another from the store, with the same tokens, and its directory goes when the id does."""
    from fake_engine import FakeEngine
    from steer_serve.formats.peft_prompt import load_prompt_adapter
    from steer_serve.registry import InterventionRegistry

    a = InterventionRegistry(FakeEngine(), **store("a"))
    b = InterventionRegistry(FakeEngine(), **store("b"))
    await a.restore()
    await b.restore()
    source = Path(__file__).parent / "fixtures" / "data_peft" / "prompt_tuning"
    prompt = load_prompt_adapter(source, a.adapters_dir, hidden_size=576)
    await a.register_prompt("pt", prompt, source=str(source))
    lease = await b.acquire([("pt", None, None)])
    assert lease.prompt is not None and not lease.steering.slots
    assert torch.equal(lease.prompt.virtual_tokens, prompt.virtual_tokens)
    assert lease.prompt.source_format == "peft_prompt_tuning"
    await b.release(lease)
    await a.unregister("pt")
    await b.sync()
    assert "pt" not in b.entries and not a.store.records()
    assert not (stored_weights(a) if hasattr(a.store, "client") else (a.store.adapters_dir / prompt.content_hash).exists())
