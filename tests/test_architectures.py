"""Steering on architectures other than Llama, through the server (issue 14).

Each architecture is a tiny random-weight model built here from a config (hidden 128, 4 heads of
32 — vLLM's CPU attention refuses head_dim 16 —, 2 layers, the default model's tokenizer files).
The reference is Hugging Face transformers with the same edit hooked on the module pyvene names
for the component, greedy by full forwards. One server per architecture, stopped after its tests.
"""
from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from live_server import ServerProcess
from steer_serve.interventions import reference_apply
from steer_serve.interventions.base import Edit, Intervention, Placement
from steering_helpers import complete, register, tokens

HIDDEN, LAYERS, NEW_TOKENS = 128, 2, 8
PROMPT = [504, 3575, 282, 4649, 314]

#: config class, its fields, and the HF module of each component tested (layer 1 / layer 0)
MODELS = {
    "MistralForCausalLM": ("MistralConfig", {"num_key_value_heads": 2, "head_dim": 32, "sliding_window": None},
                           "model.layers.{}", "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp"),
    "Qwen2ForCausalLM": ("Qwen2Config", {"num_key_value_heads": 2},
                         "model.layers.{}", "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp"),
    "GPT2LMHeadModel": ("GPT2Config", {},
                        "transformer.h.{}", "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp"),
}
#: component → (index of its module in MODELS' tuple, hooked on the module's input)
COMPONENTS = {"block_output": (2, False), "attention_value_output": (3, True), "mlp_output": (4, False)}


def build_tiny_model(architecture: str, target, tokenizer_dir) -> None:
    """Save a seeded random ``architecture`` model at ``target`` with the default model's tokenizer."""
    import transformers

    config_name, fields, *_ = MODELS[architecture]
    common = {"vocab_size": 49152, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "intermediate_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    if config_name == "GPT2Config":
        common = {"vocab_size": 49152, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 512,
                  "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    config = getattr(transformers, config_name)(**common, **fields)
    config.architectures = [architecture]
    model = getattr(transformers, architecture)(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1 and ("norm" in name or "ln_" in name):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(target)
    for path in tokenizer_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(path, target / path.name)


def hf_greedy(model_dir, edit_at: str | None = None, edit_fn=None, on_input: bool = False) -> list[int]:
    """Greedy new tokens from transformers (full forward per token), with ``edit_fn`` hooked in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if edit_at:
        module = model.get_submodule(edit_at)
        if on_input:
            module.register_forward_pre_hook(lambda m, args: (edit_fn(args[0]), *args[1:]))
        else:
            module.register_forward_hook(lambda m, args, out: (edit_fn(out[0]), *out[1:])
                                         if isinstance(out, tuple) else edit_fn(out))
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


@pytest.fixture(scope="module", params=list(MODELS))
def arch_server(request, tmp_path_factory, intervention_dir):
    from steer_serve.model import prepare_default_model

    architecture = request.param
    root = tmp_path_factory.mktemp(architecture)
    build_tiny_model(architecture, root / "model", prepare_default_model())
    proc = ServerProcess("--model", str(root / "model"), "--allowed-intervention-dir", str(intervention_dir),
                         "--max-model-len", "512", registry_dir=root / "registry",
                         log_path=root / "server.log").start()
    yield architecture, root / "model", proc
    proc.stop()


def test_components_match_transformers_hooks(arch_server, intervention_dir):
    architecture, model_dir, proc = arch_server
    plain = hf_greedy(model_dir)
    with httpx.Client(base_url=proc.url, timeout=300) as client:
        assert tokens(complete(client, PROMPT, NEW_TOKENS, ignore_eos=True)) == plain
        for seed, (component, (index, on_input)) in enumerate(COMPONENTS.items()):
            layer = seed % LAYERS
            vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 2.0
            iv = Intervention([Edit("steering_vector", Placement(layer, component), {"vector": vector})], HIDDEN)
            name = f"{architecture}-{component}"
            register(client, intervention_dir, name, iv)
            expected = hf_greedy(model_dir, MODELS[architecture][index].format(layer),
                                 lambda h: reference_apply(iv, h.reshape(-1, HIDDEN)).reshape(h.shape), on_input)
            assert expected != plain, f"{component}: the edit does not change transformers' tokens"
            steered = tokens(complete(client, PROMPT, NEW_TOKENS, intervention=name, ignore_eos=True))
            assert steered == expected, component


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
