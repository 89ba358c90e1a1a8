"""``SteerLlamaForCausalLM``: vLLM's own Llama, built with intervention-aware decoder layers.

Nothing of vLLM is copied: the stock ``LlamaForCausalLM`` accepts a ``layer_type`` and the stock
``LlamaDecoderLayer`` an ``attn_layer_type``; we pass subclasses that own, per hooked component,
fixed-size slot tables (``register_buffer``, so they exist before any graph is captured) and call
one batched kernel per intervention column on the tokens of the step.

Components, as pyvene names them for Llama:
``attention_value_output`` input of ``o_proj``; ``attention_output`` output of ``self_attn``;
``mlp_output`` output of ``mlp``; ``block_output`` the residual stream after the layer. vLLM keeps
the residual separate (fused add + RMSNorm in the next layer), so a block-output edit is computed
on ``hidden + residual`` and returned as the new hidden state with a zero residual — the next
layer's fused add (and the final norm's) then sees exactly that sum, bit for bit as Hugging Face's
layer output.
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from steer_serve.engine.config import SteerConfig
from steer_serve.engine.step_state import StepState
from steer_serve.kernels import SlotTables, apply_interventions, register_slot_tables


class SteerLlamaAttention(LlamaAttention):
    """Llama attention that lets its layer edit the input of ``o_proj`` (attention_value_output)."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        attn_output = self.steer_layer.steer("attention_value_output", attn_output)
        output, _ = self.o_proj(attn_output)
        return output


class SteerLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer with slot tables for each hooked component."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=SteerLlamaAttention)
        self.layer_idx = extract_layer_index(prefix)
        self.steer_config = SteerConfig.from_hf_config(vllm_config.model_config.hf_config)
        self.self_attn.__dict__["steer_layer"] = self  # plain reference, not a submodule
        self.step_state: StepState | None = None  # set by the model after construction
        value_width = self.self_attn.num_heads * self.self_attn.head_dim
        self._tables: dict[str, SlotTables] = {}
        for component in self.steer_config.components:
            width = value_width if component == "attention_value_output" else self.hidden_size
            self._tables[component] = register_slot_tables(
                self, f"steer_{component}", self.steer_config.num_slots + 1, self.steer_config.max_rank, width,
                device=torch.get_default_device())

    def slot_tables(self, component: str) -> SlotTables:
        """The tables of one component (re-viewed if the module's buffers were moved)."""
        tables = self._tables[component]
        if tables.wp is not getattr(self, f"steer_{component}_wp"):
            tables = self._tables[component] = SlotTables.from_buffers(self, f"steer_{component}")
        return tables

    def _hooked(self, component: str) -> bool:
        """Whether ``component`` has tables here and an intervention of this step touches it."""
        return component in self.steer_config.components and self.step_state.is_active(self.layer_idx, component)

    def steer(self, component: str, x: torch.Tensor) -> torch.Tensor:
        """Apply this step's interventions at ``component`` to ``x`` (one kernel call per column)."""
        if not self._hooked(component):
            return x
        state = self.step_state
        tables = self.slot_tables(component)
        num_tokens = x.shape[0]
        for column in range(state.columns()):
            x = apply_interventions(x, state.slots[column, :num_tokens], state.coef[column, :num_tokens], tables)
        return x

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states = self.steer("attention_output", hidden_states)

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.steer("mlp_output", hidden_states)
        if self._hooked("block_output"):
            # the edited sum becomes the hidden state; a zero residual keeps the next fused add exact
            return self.steer("block_output", hidden_states + residual), torch.zeros_like(residual)
        return hidden_states, residual


class SteerLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose layers are :class:`SteerLlamaDecoderLayer`; owns the shared per-step buffers."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=SteerLlamaDecoderLayer)
        config = SteerConfig.from_hf_config(vllm_config.model_config.hf_config)
        sched = vllm_config.scheduler_config
        max_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)
        self.register_buffer("steer_slots", torch.zeros(config.max_columns, max_tokens, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("steer_coef", torch.zeros(config.max_columns, max_tokens, dtype=torch.float32),
                             persistent=False)
        self.step_state = StepState(config, self.steer_slots, self.steer_coef)
        for layer in self.steer_layers():
            layer.step_state = self.step_state

    def steer_layers(self) -> list[SteerLlamaDecoderLayer]:
        return [m for m in self.model.layers if isinstance(m, SteerLlamaDecoderLayer)]


def steerable_model(model: nn.Module) -> SteerLlamaForCausalLM | None:
    """The steerable model inside whatever wrapper the runner holds, or None."""
    for module in (model, getattr(model, "model", None), getattr(model, "module", None)):
        if isinstance(module, SteerLlamaForCausalLM):
            return module
    return None
