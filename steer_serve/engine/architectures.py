"""One small table per architecture: where each pyvene component lives in vLLM's model.

Like pyvene's ``type_to_module_mapping`` and PEFT's target-module maps, a table names, for each
component, a :class:`Site`: a module path inside one decoder layer (``""`` is the layer itself)
and the hook point there:

* ``output`` / ``input``: the module's output, or its hidden-states input (the first
  floating-point positional argument, or the ``hidden_states`` keyword);
* ``q`` / ``k`` / ``v``: that slice of a fused QKV projection's output (vLLM fuses
  ``q_proj``/``k_proj``/``v_proj`` into ``qkv_proj``; GPT-2's ``c_attn`` is fused already);
* ``gated``: a gated activation (vLLM's ``SiluAndMul`` / ``GeluAndMul``, whose input is
  ``[gate, up]``): the edit acts on ``act(gate)`` before the product with ``up``, which is what
  Hugging Face's ``mlp.act_fn`` outputs.

``fused_residual`` says how the layer carries its residual stream: Llama-style vLLM layers take
and return ``(hidden, residual)`` and the next layer adds them (fused add + RMSNorm); GPT-2-style
layers return the sum. A new architecture is one entry in :data:`ARCHITECTURES`, naming the stock
vLLM class.

Meaning of each component, as pyvene gives it: ``block_input`` / ``block_output`` the residual
stream into / out of the layer; ``attention_input`` the attention module's input (after the
input norm); ``attention_output`` its output (before any post-attention norm, Gemma-2/3);
``attention_value_output`` the input of the output projection (``o_proj`` / ``c_proj``);
``query_output`` / ``key_output`` / ``value_output`` the projections' outputs (before RoPE and,
Qwen3/Gemma-3, before the q/k norms); ``mlp_input`` / ``mlp_output`` the MLP's input and output
(Mixtral/Qwen-MoE: the sparse-MoE block); ``mlp_activation`` the MLP's inner activation
(``act(gate)`` of a gated MLP, GPT-2's ``act``; absent on MoE blocks). Qwen3, Gemma-3, Phi-3 are
not in pyvene 0.1.8; their sites follow the same module names by analogy (Phi-3's fused
``qkv_proj`` / ``gate_up_proj`` are sliced as pyvene slices GPT-2's ``c_attn``).
"""
from __future__ import annotations

from dataclasses import dataclass

from steer_serve.interventions.base import RESIDUAL_COMPONENTS


@dataclass(frozen=True)
class Site:
    """Where one component is inside a decoder layer: a module path and its hook point."""

    module: str
    hook: str = "output"        # "output" | "input" | "q" | "k" | "v" | "gated"


@dataclass(frozen=True)
class ArchitectureTable:
    """Where the components of one architecture are, inside vLLM's stock model class."""

    vllm_class: str                          # "module:Class" of the stock vLLM model
    layers: str                              # path of the decoder-layer list in the model
    sites: dict[str, Site]                   # component -> site in a layer
    fused_residual: bool = True


def _llama_style(vllm_class: str, mlp: str = "mlp", moe: bool = False, fused_residual: bool = True) -> ArchitectureTable:
    sites = {
        "block_input": Site("", "input"), "block_output": Site(""),
        "attention_input": Site("self_attn", "input"), "attention_output": Site("self_attn"),
        "attention_value_output": Site("self_attn.o_proj", "input"),
        "query_output": Site("self_attn.qkv_proj", "q"), "key_output": Site("self_attn.qkv_proj", "k"),
        "value_output": Site("self_attn.qkv_proj", "v"),
        "mlp_input": Site(mlp, "input"), "mlp_output": Site(mlp),
    }
    if not moe:
        sites["mlp_activation"] = Site(f"{mlp}.act_fn", "gated")
    return ArchitectureTable(vllm_class, layers="model.layers", sites=sites, fused_residual=fused_residual)


_MODELS = "vllm.model_executor.models"
_TRANSFORMERS = f"{_MODELS}.transformers:TransformersForCausalLM"



ARCHITECTURES: dict[str, ArchitectureTable] = {
    "LlamaForCausalLM": _llama_style(f"{_MODELS}.llama:LlamaForCausalLM"),
    "MistralForCausalLM": _llama_style(f"{_MODELS}.mistral:MistralForCausalLM"),
    "Qwen2ForCausalLM": _llama_style(f"{_MODELS}.qwen2:Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": _llama_style(f"{_MODELS}.qwen3:Qwen3ForCausalLM"),
    "Phi3ForCausalLM": _llama_style(f"{_MODELS}.phi3:Phi3ForCausalLM"),
    "GemmaForCausalLM": _llama_style(f"{_MODELS}.gemma:GemmaForCausalLM"),
    "Gemma2ForCausalLM": _llama_style(f"{_MODELS}.gemma2:Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": _llama_style(f"{_MODELS}.gemma3:Gemma3ForCausalLM"),
    "MixtralForCausalLM": _llama_style(f"{_MODELS}.mixtral:MixtralForCausalLM", mlp="block_sparse_moe", moe=True),
    "Qwen2MoeForCausalLM": _llama_style(f"{_MODELS}.qwen2_moe:Qwen2MoeForCausalLM", moe=True),
    # vLLM 0.32 serves these through its Transformers backend: Hugging Face's own modules, with q/k/v
    # fused into ``qkv_proj`` and a GLU into ``gate_up_proj`` + an ``...AndMul`` activation, at
    # ``model.layers``; each layer returns the plain sum (no fused residual)
    "OlmoForCausalLM": _llama_style(_TRANSFORMERS, fused_residual=False),
    "Olmo2ForCausalLM": _llama_style(_TRANSFORMERS, fused_residual=False),
    # pyvene's GPT-NeoX table has no q/k/v components (its fused projection is laid out per head)
    "GPTNeoXForCausalLM": ArchitectureTable(
        _TRANSFORMERS, layers="model.layers", fused_residual=False, sites={
            "block_input": Site("", "input"), "block_output": Site(""),
            "attention_input": Site("attention", "input"), "attention_output": Site("attention"),
            "attention_value_output": Site("attention.dense", "input"),
            "mlp_input": Site("mlp", "input"), "mlp_activation": Site("mlp.act"), "mlp_output": Site("mlp"),
        }),
    "GPT2LMHeadModel": ArchitectureTable(
        f"{_MODELS}.gpt2:GPT2LMHeadModel", layers="transformer.h", fused_residual=False, sites={
            "block_input": Site("", "input"), "block_output": Site(""),
            "attention_input": Site("attn", "input"), "attention_output": Site("attn"),
            "attention_value_output": Site("attn.c_proj", "input"),
            "query_output": Site("attn.c_attn", "q"), "key_output": Site("attn.c_attn", "k"),
            "value_output": Site("attn.c_attn", "v"),
            "mlp_input": Site("mlp", "input"), "mlp_activation": Site("mlp.act"), "mlp_output": Site("mlp"),
        }),
}

STEER_PREFIX = "Steer"


def steer_class_name(architecture: str) -> str:
    """The name our steerable version of ``architecture`` is registered under in vLLM."""
    return f"{STEER_PREFIX}{architecture}"


def steerable_architecture(architectures: list[str]) -> str | None:
    """The first of a config's ``architectures`` that has a table, or None."""
    return next((a for a in architectures if a in ARCHITECTURES), None)


def _first(config: dict, *names, default=None):
    return next((config[n] for n in names if config.get(n) is not None), default)


def component_geometry(config: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(width, heads) of every component, from a Hugging Face ``config.json`` (the whole model, not a
    tensor-parallel shard): residual components are ``hidden_size`` wide; queries and the value
    output ``heads * head_dim``; keys and values ``kv_heads * head_dim``; the MLP activation
    ``intermediate_size`` (GPT-2: ``n_inner`` or ``4 * n_embd``)."""
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    hidden = int(_first(config, "hidden_size", "n_embd", "d_model"))
    widths = {c: hidden for c in RESIDUAL_COMPONENTS}
    if _first(config, "num_attention_heads", "n_head") is None:  # a config naming only the residual width
        return widths, {}
    heads = int(_first(config, "num_attention_heads", "n_head"))
    kv_heads = int(_first(config, "num_key_value_heads", default=heads))
    head_dim = int(_first(config, "head_dim", default=hidden // heads))
    inner = int(_first(config, "intermediate_size", "n_inner", default=4 * hidden))
    widths.update(attention_value_output=heads * head_dim, query_output=heads * head_dim,
                  key_output=kv_heads * head_dim, value_output=kv_heads * head_dim, mlp_activation=inner)
    head_counts = {"attention_value_output": heads, "query_output": heads, "key_output": kv_heads,
                   "value_output": kv_heads}
    return widths, head_counts
