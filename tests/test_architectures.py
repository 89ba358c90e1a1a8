"""Steering on each architecture with a table, through the server (issues 14 and 21).

Each architecture is a tiny random-weight model built from a config (``fixtures/tiny_models.py``).
References: Hugging Face transformers with the same edit hooked on the module pyvene names for the
component (greedy by full forwards), and save dirs written by the real pyreft / pyvene with their
own greedy tokens (``fixtures/data_families``). One server per architecture, stopped after its tests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import shutil
from dataclasses import replace

import httpx
import pytest
import torch

from fixtures.tiny_models import CONFIGS, HIDDEN, LAYERS, PROMPTS, build_tiny_model
from live_server import FIXTURES, ServerProcess
from steer_serve.engine.architectures import ARCHITECTURES, component_geometry
from steer_serve.interventions import reference_apply
from steer_serve.interventions.base import Edit, Intervention, Placement
from steering_helpers import complete, hook_hf_module, random_loreft, register, tokens

NEW_TOKENS = 8
FAMILIES = FIXTURES.parent / "data_families"
FAMILY_DOC = json.loads((FAMILIES / "cases.json").read_text())
PROMPT = PROMPTS[0]

#: served in `make test`, one per table shape (Llama-style, GPT-2's fused c_attn, GPT-NeoX's parallel residual on
#: vLLM's Transformers backend), checked against pyvene's own save dirs too; the others of tiny_models.CONFIGS
#: run with STEER_TEST_ALL_ARCHITECTURES=1 (README: long forms)
CI_ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"]
ALL_ARCHITECTURES = os.environ.get("STEER_TEST_ALL_ARCHITECTURES") == "1"
ARCHITECTURE_PARAMS = list(CONFIGS) if ALL_ARCHITECTURES else CI_ARCHITECTURES
#: what the CI architectures check against transformers hooks (pyvene's save dirs cover the rest)
CI_COMPONENTS = ("block_output", "attention_value_output", "mlp_output")


def hf_sites(architecture: str, config) -> dict[str, tuple[str, str, tuple[int, int] | None]]:
    """component -> (transformers module, ``"input"`` | ``"output"``, columns of a fused QKV output):
    where pyvene hooks each component in the Hugging Face model (its per-architecture tables), by the
    same analogy for the architectures pyvene 0.1.8 does not map."""
    widths, _ = component_geometry(config.to_dict())
    q, k = widths["query_output"], widths["key_output"]
    fused = {"query_output": (0, q), "key_output": (q, q + k), "value_output": (q + k, q + 2 * k)}
    if architecture == "GPT2LMHeadModel":
        layer, attn, o_proj, mlp, act, qkv = "transformer.h.{}", "attn", "attn.c_proj", "mlp", "mlp.act", "attn.c_attn"
    elif architecture == "GPTNeoXForCausalLM":
        layer, attn, o_proj, mlp, act, qkv = "gpt_neox.layers.{}", "attention", "attention.dense", "mlp", "mlp.act", None
    else:
        layer, attn, o_proj, mlp, act = "model.layers.{}", "self_attn", "self_attn.o_proj", "mlp", "mlp.act_fn"
        qkv = "self_attn.qkv_proj" if architecture == "Phi3ForCausalLM" else None
        act = "mlp.activation_fn" if architecture == "Phi3ForCausalLM" else act
    sites = {"block_input": (layer, "input", None), "block_output": (layer, "output", None),
             "attention_input": (f"{layer}.{attn}", "input", None), "attention_output": (f"{layer}.{attn}", "output", None),
             "attention_value_output": (f"{layer}.{o_proj}", "input", None),
             "mlp_input": (f"{layer}.{mlp}", "input", None), "mlp_output": (f"{layer}.{mlp}", "output", None),
             "mlp_activation": (f"{layer}.{act}", "output", None)}
    for component, columns in fused.items():
        name = component.split("_")[0][0]
        sites[component] = (f"{layer}.{qkv}", "output", columns) if qkv else \
            (f"{layer}.{attn}.{name}_proj", "output", None)
    return {c: site for c, site in sites.items() if c in ARCHITECTURES[architecture].sites}


def hf_greedy(model_dir, site: tuple[str, str, tuple[int, int] | None] | None = None, layer: int = 0,
              edit_fn=None) -> list[int]:
    """Greedy new tokens from transformers (full forward per token), with ``edit_fn`` hooked at ``site``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if site:
        path, where, columns = site
        hook_hf_module(model.get_submodule(path.format(layer)), where, edit_fn, columns)
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module", params=ARCHITECTURE_PARAMS)
def arch_server(request, tmp_path_factory, intervention_dir):
    from steer_serve.model import prepare_default_model

    architecture = request.param
    root = tmp_path_factory.mktemp(architecture)
    build_tiny_model(architecture, root / "model", prepare_default_model())
    proc = ServerProcess("--model", str(root / "model"), "--allowed-intervention-dir", str(intervention_dir),
                         "--allowed-intervention-dir", str(FAMILIES), "--max-interventions", "32", "--max-rank", "128",
                         "--max-model-len", "512", registry_dir=root / "registry",
                         log_path=root / "server.log").start()
    yield architecture, root / "model", proc
    proc.stop()


def test_components_match_transformers_hooks(arch_server, intervention_dir):
    """A steering vector at each component equals transformers with it hooked where pyvene hooks it."""
    from transformers import AutoConfig

    architecture, model_dir, proc = arch_server
    sites = hf_sites(architecture, AutoConfig.from_pretrained(model_dir))
    if not ALL_ARCHITECTURES:  # in `make test` pyvene's save dirs cover the other components
        sites = {c: sites[c] for c in CI_COMPONENTS}
    widths, _ = component_geometry(AutoConfig.from_pretrained(model_dir).to_dict())
    plain = hf_greedy(model_dir)
    with httpx.Client(base_url=proc.url, timeout=300) as client:
        assert tokens(complete(client, PROMPT, NEW_TOKENS, ignore_eos=True)) == plain
        for seed, (component, site) in enumerate(sites.items()):
            layer, width = seed % LAYERS, widths[component]
            vector = torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 4.0
            edit = Edit("steering_vector", Placement(layer, component), {"vector": vector},
                        width=None if width == HIDDEN else width)
            iv = Intervention([edit], HIDDEN)
            name = f"{architecture}-{component}"
            register(client, intervention_dir, name, iv)
            expected = hf_greedy(model_dir, site, layer,
                                 lambda h: reference_apply(iv, h.reshape(-1, width)).reshape(h.shape))
            assert expected != plain, f"{component}: the edit does not change transformers' tokens"
            steered = tokens(complete(client, PROMPT, NEW_TOKENS, intervention=name, ignore_eos=True))
            assert steered == expected, component


def _library_cases(architecture: str) -> list[dict]:
    return [c for c in FAMILY_DOC["cases"] if c["architecture"] == architecture]


def _library_request(case: dict, prompt: list[int]) -> dict:
    return {"prompt": prompt, "max_tokens": FAMILY_DOC["new_tokens"], "temperature": 0, "return_token_ids": True,
            "ignore_eos": True, "interventions": [{"id": case["name"], "positions": case["positions"]}]}


def test_library_save_dirs_equal_the_library(arch_server):
    """Save dirs written by pyreft 0.1.0 / pyvene 0.1.8 (``fixtures/data_families``) register as saved and
    give the library's greedy tokens: on the tiny Llama every pyreft and pyvene family, on every
    architecture each component pyvene maps; solo, then all of them in one concurrent burst."""
    architecture, _, proc = arch_server
    cases = _library_cases(architecture)
    if not cases:
        pytest.skip(f"pyvene 0.1.8 maps no {architecture}: checked against transformers hooks only")
    with httpx.Client(base_url=proc.url, timeout=300) as client:
        for prompt, plain in zip(FAMILY_DOC["prompts"], FAMILY_DOC["plain"][architecture]):
            assert tokens(complete(client, prompt, FAMILY_DOC["new_tokens"], ignore_eos=True)) == plain
        for case in cases:
            response = client.post("/v1/interventions", json={"id": case["name"], "source": str(FAMILIES / case["name"]),
                                                              **case["registration"]})
            assert response.status_code in (201, 409), response.text
            for prompt, expected in zip(FAMILY_DOC["prompts"], case["steered_ids"]):
                response = client.post("/v1/completions", json=_library_request(case, prompt))
                assert response.status_code == 200, response.text
                assert tokens(response.json()) == expected, (case["name"], prompt)

    async def burst():
        async with httpx.AsyncClient(base_url=proc.url, timeout=600) as client:
            jobs = [(case, i, client.post("/v1/completions", json=_library_request(case, prompt)))
                    for case in cases for i, prompt in enumerate(FAMILY_DOC["prompts"])]
            replies = await asyncio.gather(*(job for *_, job in jobs))
            return [(case, i, reply) for (case, i, _), reply in zip(jobs, replies)]

    for case, i, reply in asyncio.run(burst()):
        assert reply.status_code == 200, reply.text
        assert tokens(reply.json()) == case["steered_ids"][i], (case["name"], i, "in the burst")


def test_unsteerable_architecture_is_served_plain_and_refuses_interventions(tmp_path, intervention_dir):
    """An architecture without a table starts, generates, and answers 400 naming itself on registration."""
    import transformers

    from steer_serve.model import prepare_default_model

    config = transformers.OPTConfig(vocab_size=49152, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, ffn_dim=256, max_position_embeddings=512,
                                    word_embed_proj_dim=HIDDEN, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.architectures = ["OPTForCausalLM"]
    model_dir = tmp_path / "opt"
    transformers.OPTForCausalLM(config).save_pretrained(model_dir)
    for path in prepare_default_model().iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, model_dir / path.name)
    proc = ServerProcess("--model", str(model_dir), "--allowed-intervention-dir", str(intervention_dir),
                         "--max-model-len", "512", registry_dir=tmp_path / "registry",
                         log_path=tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=300) as client:
            assert len(tokens(complete(client, PROMPT, 4, ignore_eos=True))) == 4
            vector = torch.ones(HIDDEN)
            iv = Intervention([Edit("steering_vector", Placement(0, "block_output"), {"vector": vector})], HIDDEN)
            from steer_serve.formats.native import save_native

            save_native(iv, intervention_dir / "opt-vector")
            response = client.post("/v1/interventions", json={"id": "opt-vector",
                                                              "source": str(intervention_dir / "opt-vector")})
            assert response.status_code == 400, response.text
            assert "OPTForCausalLM" in response.json()["error"]["message"]
            response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "intervention": "any"})
            assert response.status_code == 400, response.text
            assert "OPTForCausalLM" in response.json()["error"]["message"]
    finally:
        proc.stop()


#: vLLM's parallel engines == transformers (== one engine) here; GPT-2 in the long form
PARALLEL_ARCHITECTURES = ["LlamaForCausalLM", "GPT2LMHeadModel"] if ALL_ARCHITECTURES else ["LlamaForCausalLM"]
PARALLEL = {"tensor-parallel-2": ["--tensor-parallel-size", "2"], "pipeline-parallel-2": ["--pipeline-parallel-size", "2"],
            "data-parallel-2": ["--data-parallel-size", "2"]}
#: sharded sites under TP (each rank holds a column shard: gathered, edited whole, split back) and a replicated
#: one; under PP layer 0 and layer 1 live on different stages
PARALLEL_COMPONENTS = ("attention_value_output", "query_output", "mlp_activation", "block_output")


@pytest.mark.parametrize("parallel", list(PARALLEL))
@pytest.mark.parametrize("architecture", PARALLEL_ARCHITECTURES)
def test_parallel_engines_equal_transformers(architecture, parallel, tmp_path, intervention_dir):
    """At ``--tensor-parallel-size 2`` (two CPU workers, one column shard each),
    ``--pipeline-parallel-size 2`` (one layer per stage) and ``--data-parallel-size 2`` (two engines
    behind vLLM's internal load balancer, each with every slot write) a LoReFT at each site — every
    column of a sharded one, both stages' layers — gives transformers' tokens, as one engine does, also
    for four copies sent at once (which the load balancer spreads over both engines); so does a plain
    request."""
    from transformers import AutoConfig

    from steer_serve.model import prepare_default_model

    build_tiny_model(architecture, tmp_path / "model", prepare_default_model())
    widths, _ = component_geometry(AutoConfig.from_pretrained(tmp_path / "model").to_dict())
    sites = hf_sites(architecture, AutoConfig.from_pretrained(tmp_path / "model"))
    proc = ServerProcess("--model", str(tmp_path / "model"), *PARALLEL[parallel],
                         "--allowed-intervention-dir", str(intervention_dir), "--max-model-len", "512",
                         "--intervention-components", *PARALLEL_COMPONENTS,
                         env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per worker
                         registry_dir=tmp_path / "registry", log_path=tmp_path / "server.log").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=300) as client:
            assert tokens(complete(client, PROMPT, NEW_TOKENS, ignore_eos=True)) == hf_greedy(tmp_path / "model")
            for seed, component in enumerate(PARALLEL_COMPONENTS):
                width, layer = widths[component], seed % LAYERS
                loreft = random_loreft(seed, layer=layer, component=component, width=width, strength=6.0)
                iv = Intervention([replace(e, width=None if width == HIDDEN else width) for e in loreft.edits], HIDDEN)
                name = f"{parallel}-{architecture}-{component}"
                register(client, intervention_dir, name, iv)
                expected = hf_greedy(tmp_path / "model", sites[component], layer,
                                     lambda h: reference_apply(iv, h.reshape(-1, width)).reshape(h.shape))
                with cf.ThreadPoolExecutor(4) as pool:
                    steered = list(pool.map(lambda _: tokens(complete(client, PROMPT, NEW_TOKENS, intervention=name,
                                                                      ignore_eos=True)), range(4)))
                assert steered == [expected] * 4, component
    finally:
        proc.stop()
