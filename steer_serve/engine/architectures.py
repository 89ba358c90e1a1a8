"""One small table per architecture: where each pyvene component lives in vLLM's model.

Like pyvene's ``type_to_module_mapping`` and PEFT's target-module maps, a table names, for each
component, a module path inside one decoder layer and whether the component is that module's
output or its (first positional) input. ``""`` is the decoder layer itself. ``fused_residual``
says how the layer hands on its residual stream: Llama-style vLLM layers return ``(hidden,
residual)`` and the next layer adds them (fused add + RMSNorm); GPT-2-style layers return the
sum. A new architecture is one entry in :data:`ARCHITECTURES`, naming the stock vLLM class.

Meaning of each component, as pyvene gives it for these families: ``block_output`` the
layer's output (the residual stream after the layer); ``attention_output`` the attention
module's output (before any post-attention norm, Gemma-2/3); ``attention_value_output`` the
input of the attention output projection (``o_proj`` / ``c_proj``); ``mlp_output`` the MLP's
output (Mixtral: the sparse-MoE block). Qwen3, Gemma-3 and Phi-3 are not in pyvene 0.1.8; their
sites follow the same module names by analogy.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureTable:
    """Where the components of one architecture are, inside vLLM's stock model class."""

    vllm_class: str                          # "module:Class" of the stock vLLM model
    layers: str                              # path of the decoder-layer list in the model
    attention: str                           # path of the attention module inside a layer
    sites: dict[str, tuple[str, str]]        # component -> (module path in a layer, "output" | "input")
    fused_residual: bool = True


def _llama_style(vllm_class: str, mlp: str = "mlp") -> ArchitectureTable:
    return ArchitectureTable(vllm_class, layers="model.layers", attention="self_attn", sites={
        "block_output": ("", "output"),
        "attention_output": ("self_attn", "output"),
        "attention_value_output": ("self_attn.o_proj", "input"),
        "mlp_output": (mlp, "output"),
    })


_MODELS = "vllm.model_executor.models"

ARCHITECTURES: dict[str, ArchitectureTable] = {
    "LlamaForCausalLM": _llama_style(f"{_MODELS}.llama:LlamaForCausalLM"),
    "MistralForCausalLM": _llama_style(f"{_MODELS}.mistral:MistralForCausalLM"),
    "Qwen2ForCausalLM": _llama_style(f"{_MODELS}.qwen2:Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": _llama_style(f"{_MODELS}.qwen3:Qwen3ForCausalLM"),
    "Phi3ForCausalLM": _llama_style(f"{_MODELS}.phi3:Phi3ForCausalLM"),
    "GemmaForCausalLM": _llama_style(f"{_MODELS}.gemma:GemmaForCausalLM"),
    "Gemma2ForCausalLM": _llama_style(f"{_MODELS}.gemma2:Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": _llama_style(f"{_MODELS}.gemma3:Gemma3ForCausalLM"),
    "MixtralForCausalLM": _llama_style(f"{_MODELS}.mixtral:MixtralForCausalLM", mlp="block_sparse_moe"),
    "GPT2LMHeadModel": ArchitectureTable(
        f"{_MODELS}.gpt2:GPT2LMHeadModel", layers="transformer.h", attention="attn", fused_residual=False,
        sites={"block_output": ("", "output"), "attention_output": ("attn", "output"),
               "attention_value_output": ("attn.c_proj", "input"), "mlp_output": ("mlp", "output")}),
}

STEER_PREFIX = "Steer"


def steer_class_name(architecture: str) -> str:
    """The name our steerable version of ``architecture`` is registered under in vLLM."""
    return f"{STEER_PREFIX}{architecture}"


def steerable_architecture(architectures: list[str]) -> str | None:
    """The first of a config's ``architectures`` that has a table, or None."""
    return next((a for a in architectures if a in ARCHITECTURES), None)
