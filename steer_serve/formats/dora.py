"""PEFT LoRA with ``use_dora`` (DoRA): the LoRA, then a constant per-output-channel scale of the module output.

peft's ``DoraLinearLayer`` (``peft/tuners/lora/dora.py``) computes ``y = g ⊙ (W + s·BA)x + b`` with
``g = m / ‖W + s·BA‖`` (the row norms of the merged weight, detached: constant at inference), where
``m`` is the saved ``lora_magnitude_vector`` and ``s`` the LoRA scaling. So DoRA is served as the plain
LoRA ``(A, s·B)`` in vLLM's LoRA slots plus an ``elementwise_scale`` edit ``g`` at the adapted module's
output, which the intervention slots apply after the LoRA (site hooks sit on vLLM's LoRA layers):
``q_proj`` / ``k_proj`` / ``v_proj`` → ``query_output`` / ``key_output`` / ``value_output``, ``o_proj`` →
``attention_output``, ``down_proj`` → ``mlp_output``, ``up_proj`` → ``mlp_activation`` (elementwise, so
scaling ``act(gate)`` scales the product). ``gate_proj`` (the activation follows it) and modules with a
bias (``g`` would scale it too) are refused.
"""
from __future__ import annotations

import math
import re

import torch

from ..interventions.base import Edit, Intervention, Placement
from .errors import InterventionFormatError

_KEY = re.compile(r"^base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\.(?P<site>[a-z_]+\.[a-z_]+))\."
                  r"(?P<name>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(\.weight)?)$")
_SITES = {"self_attn.q_proj": "query_output", "self_attn.k_proj": "key_output", "self_attn.v_proj": "value_output",
          "self_attn.o_proj": "attention_output", "mlp.down_proj": "mlp_output", "mlp.up_proj": "mlp_activation"}

LoraPairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _fail(message: str, param: str) -> None:
    raise InterventionFormatError(f"DoRA adapter: {message}", param=param, code="invalid_peft_dora")


def _scaling(config: dict) -> float:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        _fail(f"r must be a positive integer and lora_alpha a number, got {rank!r} and {alpha!r}", "r")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def dora_to_lora(config: dict, weights: dict[str, torch.Tensor],
                 base: dict[str, torch.Tensor]) -> tuple[LoraPairs, dict[tuple[int, str], torch.Tensor]]:
    """``({module: (A, s·B)}, {(layer, component): g})`` of a DoRA adapter over ``base``'s weights."""
    for option in ("rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out"):
        if config.get(option):
            _fail(f"{option} is not supported", option)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    sites: dict[str, tuple[int, str]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None:
            _fail(f"unexpected weight {key!r}", key)
        if match["site"] not in _SITES:
            _fail(f"{match['site']}'s output has no served site (the gate's activation follows it); served: "
                  f"{', '.join(_SITES)}", key)
        name = match["name"].removesuffix(".weight")
        modules.setdefault(match["module"], {})[name] = tensor.double()
        sites[match["module"]] = (int(match["layer"]), _SITES[match["site"]])
    scaling = _scaling(config)
    pairs, scales = {}, {}
    for module, p in sorted(modules.items()):
        if set(p) != {"lora_A", "lora_B", "lora_magnitude_vector"}:
            _fail(f"{module} holds {sorted(p)}, expected lora_A, lora_B and lora_magnitude_vector", module)
        if f"{module}.bias" in base:
            _fail(f"{module} has a bias, which DoRA leaves unscaled and an output scale would not", module)
        weight = base.get(f"{module}.weight")
        a, b, magnitude = p["lora_A"], p["lora_B"] * scaling, p["lora_magnitude_vector"].flatten()
        if weight is None or weight.shape != (b.shape[0], a.shape[1]) or magnitude.shape != (b.shape[0],):
            _fail(f"{module}: A {list(a.shape)}, B {list(b.shape)} and magnitude {list(magnitude.shape)} do not fit "
                  f"the base weight {None if weight is None else list(weight.shape)}", module)
        norm = torch.linalg.norm(weight.double() + b @ a, dim=1)
        pairs[module] = (a, b)
        scales[sites[module]] = (magnitude / norm).float()
    if not pairs:
        _fail("no LoRA weights", "adapter_model")
    return pairs, scales


def output_scales_intervention(scales: dict[tuple[int, str], torch.Tensor], hidden_size: int) -> Intervention:
    """The output scales as ``elementwise_scale`` edits at every position."""
    edits = [Edit("elementwise_scale", Placement(layer, component), {"scaling": g},
                  width=len(g) if len(g) != hidden_size else None) for (layer, component), g in sorted(scales.items())]
    return Intervention(edits, hidden_size=hidden_size, positions="all", source_format="peft_dora")
