"""PEFT methods whose weight delta is exactly a LoRA product ``ΔW = B @ A``, and those we refuse.

Each converter reads a saved adapter (its ``adapter_config.json`` and flat state dict, keys
``base_model.model.<module>.<parameter>``) and returns ``{module: (A, B)}`` whose product equals
what that method's ``get_delta_weight`` computes in the installed peft (``peft/tuners/<method>/layer.py``):

* AdaLoRA: ``ΔW = B (A ⊙ E) · s / (ranknum + 1e-5)``, ``s = lora_alpha`` (or the rank when
  ``lora_alpha ≤ 0``), ``ranknum = init_r`` — peft keeps ``init_r`` even after its rank pattern
  trimmed the saved triplets.
* LoHa: ``ΔW = s (W1a W1b) ⊙ (W2a W2b)``, ``s = alpha / r``: the Hadamard product of two rank-r
  products is the rank-r² product of the row-wise Khatri–Rao products (``B[o] = W1a[o] ⊗ W2a[o]``,
  ``A[:, i] = W1b[:, i] ⊗ W2b[:, i]``).
* LoKr: ``ΔW = s · W1 ⊗ W2``, ``s = alpha / r``, each factor either full or a low-rank product:
  ``(U1 V1) ⊗ (U2 V2) = (U1 ⊗ U2)(V1 ⊗ V2)``; a full factor is ``I · W`` or ``W · I``, whichever is narrower.
* VeRA: ``ΔW = diag(λ_b) B[:out] diag(λ_d) A[:, :in]`` with the shared projections ``A``, ``B`` the
  adapter saved (``save_projection``).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .errors import InterventionFormatError

LoraPairs = dict[str, tuple[torch.Tensor, torch.Tensor]]
_PREFIX = "base_model.model."

#: PEFT methods that are not a weight delta of one linear layer, or not a low-rank one, and why.
REFUSED = {
    "PREFIX_TUNING": "it prepends trained key/value states to every layer's attention cache, which vLLM's "
                     "paged KV cache cannot take per request",
    "ADAPTION_PROMPT": "it adds gated attention over trained prompt states inside every adapted layer, "
                       "which vLLM's attention kernels cannot take per request",
    "OFT": "its delta W·(R − I) is a full-rank orthogonal rotation of the weight, not a low-rank product the "
           "LoRA slots can serve",
    "BOFT": "its delta W·(R − I) is a full-rank butterfly rotation of the weight, not a low-rank product the "
            "LoRA slots can serve",
    "POLY": "it mixes LoRA skills with a per-task router that needs a task id per request, which the API "
            "does not carry",
}


def _modules(weights: dict[str, torch.Tensor], method: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``base_model.model.<module>.<parameter>`` keys by module."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in weights.items():
        if not key.startswith(_PREFIX) or "." not in key[len(_PREFIX):]:
            raise InterventionFormatError(f"{method} adapter: unexpected weight {key!r}", param=key)
        module, name = key[len(_PREFIX):].rsplit(".", 1)
        grouped[module][name] = tensor.double()
    return grouped


def _expect(params: dict[str, torch.Tensor], module: str, method: str, names: set[str]) -> None:
    if set(params) != names:
        raise InterventionFormatError(f"{method} adapter: {module} holds {sorted(params)}, expected "
                                      f"{sorted(names)} (convolution variants are not supported)", param=module)


def _refuse_options(config: dict, method: str, options: tuple[str, ...]) -> None:
    for option in options:
        value = config.get(option)
        if value and value != "none":
            raise InterventionFormatError(f"{method} adapter_config.json: {option}={value!r} is not supported",
                                          param=option)


def _number(config: dict, key: str, method: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (key in ("r", "init_r") and value <= 0):
        raise InterventionFormatError(f"{method} adapter_config.json: {key} must be a number, got {value!r}",
                                      param=key)
    return float(value)


def adalora_pairs(config: dict, weights: dict[str, torch.Tensor]) -> LoraPairs:
    _refuse_options(config, "AdaLoRA", ("bias", "fan_in_fan_out", "modules_to_save", "use_dora", "lora_bias"))
    init_r, alpha = _number(config, "init_r", "AdaLoRA"), _number(config, "lora_alpha", "AdaLoRA")
    pairs = {}
    for module, p in _modules(weights, "AdaLoRA").items():
        _expect(p, module, "AdaLoRA", {"lora_A", "lora_B", "lora_E"})
        rank = p["lora_A"].shape[0]
        if rank == 0:  # the rank pattern dropped every triplet
            continue
        module_rank = rank if config.get("rank_pattern") else init_r
        scaling = alpha if alpha > 0 else float(module_rank)
        pairs[module] = (p["lora_A"] * p["lora_E"], p["lora_B"] * (scaling / (init_r + 1e-5)))
    return pairs


def loha_pairs(config: dict, weights: dict[str, torch.Tensor]) -> LoraPairs:
    _refuse_options(config, "LoHa", ("rank_pattern", "alpha_pattern", "modules_to_save"))
    scaling = _number(config, "alpha", "LoHa") / _number(config, "r", "LoHa")
    pairs = {}
    for module, p in _modules(weights, "LoHa").items():
        _expect(p, module, "LoHa", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
        w1a, w1b, w2a, w2b = p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
        pairs[module] = (a, b * scaling)
    return pairs


def _kron_factor(params: dict[str, torch.Tensor], module: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V`` the LoKr factor ``name`` (``lokr_w1`` / ``lokr_w2``), narrowest first."""
    if name in params:
        full = params[name]
        rows, cols = full.shape
        eye = torch.eye(min(rows, cols), dtype=full.dtype)
        return (eye, full) if rows <= cols else (full, eye)
    if f"{name}_a" in params and f"{name}_b" in params:
        return params[f"{name}_a"], params[f"{name}_b"]
    raise InterventionFormatError(f"LoKr adapter: {module} has neither {name} nor {name}_a/{name}_b", param=module)


def lokr_pairs(config: dict, weights: dict[str, torch.Tensor]) -> LoraPairs:
    _refuse_options(config, "LoKr", ("rank_pattern", "alpha_pattern", "modules_to_save"))
    scaling = _number(config, "alpha", "LoKr") / _number(config, "r", "LoKr")
    allowed = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    pairs = {}
    for module, p in _modules(weights, "LoKr").items():
        if not set(p) <= allowed:
            raise InterventionFormatError(f"LoKr adapter: {module} holds {sorted(set(p) - allowed)} (convolution "
                                          "variants are not supported)", param=module)
        u1, v1 = _kron_factor(p, module, "lokr_w1")
        u2, v2 = _kron_factor(p, module, "lokr_w2")
        pairs[module] = (torch.kron(v1, v2), torch.kron(u1, u2) * scaling)
    return pairs


def vera_pairs(config: dict, weights: dict[str, torch.Tensor], base_shapes: dict[str, tuple[int, int]]) -> LoraPairs:
    _refuse_options(config, "VeRA", ("bias", "fan_in_fan_out", "modules_to_save"))
    shared = {k: weights.pop(k) for k in ("base_model.vera_A", "base_model.vera_B") if k in weights}
    if len(shared) != 2:
        raise InterventionFormatError("VeRA adapter without its shared projections (saved with "
                                      "save_projection=False): peft regenerates them from a PRNG key, which "
                                      "this server does not", param="save_projection")
    vera_a, vera_b = shared["base_model.vera_A"].double(), shared["base_model.vera_B"].double()
    pairs = {}
    for module, p in _modules(weights, "VeRA").items():
        _expect(p, module, "VeRA", {"vera_lambda_b", "vera_lambda_d"})
        out_features, in_features = _base_shape(base_shapes, module, "VeRA")
        a = p["vera_lambda_d"][:, None] * vera_a[:, :in_features]
        b = p["vera_lambda_b"][:, None] * vera_b[:out_features]
        pairs[module] = (a, b)
    return pairs


#: the methods converted here (VeRA's converter also needs the base model's shapes).
CONVERTERS = {"ADALORA": adalora_pairs, "LOHA": loha_pairs, "LOKR": lokr_pairs, "VERA": vera_pairs}


def _base_shape(base_shapes: dict[str, tuple[int, int]], module: str, method: str) -> tuple[int, int]:
    if module not in base_shapes:
        raise InterventionFormatError(f"{method} adapter targets {module}, which is not a linear layer of this "
                                      "server's base model", param=module)
    return base_shapes[module]


def refuse_unservable(peft_type: str) -> None:
    """A 400 naming ``peft_type`` and why it cannot be served per request."""
    reason = REFUSED.get(peft_type, "this server serves PEFT LoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3, prompt tuning, "
                                    "P-tuning and multitask prompt tuning adapters only")
    raise InterventionFormatError(f"PEFT {peft_type} adapters cannot be served per request: {reason}",
                                  param="peft_type", code="unsupported_peft_type")


def convert_to_lora(peft_type: str, config: dict, weights: dict[str, torch.Tensor], *,
                    base_shapes: dict[str, tuple[int, int]], max_rank: int) -> LoraPairs:
    """LoRA pairs of one shared rank (smaller ones zero-padded), in float32; refuses ranks above ``max_rank``.

    ``base_shapes`` maps the base model's linear modules to their weight's ``(out, in)``.
    """
    try:
        if peft_type == "VERA":
            pairs = vera_pairs(config, dict(weights), base_shapes)
        else:
            pairs = CONVERTERS[peft_type](config, dict(weights))
    except (RuntimeError, IndexError, ValueError) as exc:  # tensors whose shapes do not fit together
        raise InterventionFormatError(f"the {peft_type} adapter's tensors have inconsistent shapes: "
                                      f"{str(exc)[:200]}", param="adapter_model") from None
    if not pairs:
        raise InterventionFormatError(f"the {peft_type} adapter has no weights", param="adapter_model")
    rank = max(a.shape[0] for a, _ in pairs.values())
    if rank > max_rank:
        raise InterventionFormatError(f"the {peft_type} adapter is a LoRA of rank {rank} once converted, above "
                                      f"this server's --max-lora-rank {max_rank}", param="r", code="rank_too_large")
    padded = {}
    for module, (a, b) in pairs.items():
        if (b.shape[0], a.shape[1]) != _base_shape(base_shapes, module, peft_type):
            raise InterventionFormatError(f"{module}: the {peft_type} delta is {b.shape[0]}×{a.shape[1]}, the base "
                                          f"weight {base_shapes[module][0]}×{base_shapes[module][1]}", param=module)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InterventionFormatError(f"{module} holds NaN or Inf", param=module, code="non_finite")
        missing = rank - a.shape[0]
        padded[module] = (torch.cat([a, a.new_zeros(missing, a.shape[1])]).float(),
                          torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1).float())
    return padded
