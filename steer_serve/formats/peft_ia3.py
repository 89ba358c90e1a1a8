"""PEFT IA3 save directories (``adapter_config.json`` + ``adapter_model.safetensors``) as interventions.

IA3 learns one vector ``ia3_l`` per adapted linear layer (``peft/tuners/ia3/layer.py``): a layer in
``feedforward_modules`` multiplies its *input* by it (saved ``1×in``), any other layer its *output*
(saved ``out×1``). Each is an elementwise scaling at one site of the decoder layer, served by the ReFT
slots as the ``elementwise_scale`` family at every position (IA3 scales every token of every forward):

* outputs: ``q_proj`` / ``k_proj`` / ``v_proj`` → ``query_output`` / ``key_output`` / ``value_output``,
  ``o_proj`` → ``attention_output``, ``down_proj`` → ``mlp_output``, ``up_proj`` → ``mlp_activation``
  (``act(g) ⊙ (u ⊙ s) = (act(g) ⊙ s) ⊙ u``);
* inputs: ``o_proj`` → ``attention_value_output``, ``down_proj`` → ``mlp_activation``
  (down_proj's input is ``act(g) ⊙ u``, and scaling ``act(g)`` scales the product).

Vectors meeting at one site multiply. Anything else (``gate_proj``'s output, which the activation
follows; the input of one of q/k/v/gate/up alone) has no served site and is a 400 naming it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..interventions.base import RESIDUAL_COMPONENTS, Edit, Intervention, Placement
from .adapters import CONFIG_FILE, read_adapter_weights
from .errors import InterventionFormatError
from .sources import read_json

SOURCE_FORMAT = "peft_ia3"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<module>.+)\.ia3_l$")
_OUTPUT_SITES = {"self_attn.q_proj": "query_output", "self_attn.k_proj": "key_output",
                 "self_attn.v_proj": "value_output", "self_attn.o_proj": "attention_output",
                 "mlp.up_proj": "mlp_activation", "mlp.down_proj": "mlp_output"}
_INPUT_SITES = {"self_attn.o_proj": "attention_value_output", "mlp.down_proj": "mlp_activation"}


def _fail(message: str, param: str) -> None:
    raise InterventionFormatError(f"IA3 adapter: {message}", param=param, code="invalid_peft_ia3")


def _site(key: str, tensor: torch.Tensor) -> tuple[int, str, torch.Tensor]:
    """(layer, component, scaling vector) of one saved ``ia3_l``."""
    match = _KEY.match(key)
    if match is None:
        _fail(f"unexpected weight {key!r} (expected base_model.model.model.layers.<i>.<module>.ia3_l)", key)
    module = match["module"]
    if tensor.dim() != 2 or 1 not in tensor.shape or not tensor.is_floating_point():
        _fail(f"{key} has shape {list(tensor.shape)}, expected a float 1×in (feedforward) or out×1 vector", key)
    scales_input = tensor.shape[0] == 1 and tensor.shape[1] != 1
    sites = _INPUT_SITES if scales_input else _OUTPUT_SITES
    if module not in sites:
        what = "input" if scales_input else "output"
        _fail(f"{module} scales its {what}, which no served site carries (served: outputs of "
              f"{', '.join(_OUTPUT_SITES)}; inputs of {', '.join(_INPUT_SITES)})", key)
    return int(match["layer"]), sites[module], tensor.flatten()


def read_peft_ia3_dir(path: str | os.PathLike, *, hidden_size: int | None = None) -> Intervention:
    """An :class:`Intervention` of ``elementwise_scale`` edits, one per (layer, site), positions ``all``;
    ``hidden_size`` (the model's) defaults to a residual-width edit's, else the first edit's width."""
    directory = Path(path)
    config = read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "IA3":
        _fail(f"{CONFIG_FILE} does not say peft_type IA3", "peft_type")
    if config.get("modules_to_save"):
        _fail(f"modules_to_save={config['modules_to_save']!r} (fully trained modules) is not supported",
              "modules_to_save")
    scalings: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in sorted(read_adapter_weights(directory).items()):
        layer, component, vector = _site(key, tensor)
        previous = scalings.get((layer, component))
        scalings[(layer, component)] = vector if previous is None else previous * vector
    if not scalings:
        _fail("no ia3_l weights", "adapter_model")
    residual = [len(v) for (_, c), v in scalings.items() if c in RESIDUAL_COMPONENTS]
    hidden = hidden_size or (residual or [len(v) for v in scalings.values()])[0]
    edits = [Edit("elementwise_scale", Placement(layer, component), {"scaling": vector},
                  width=len(vector) if len(vector) != hidden else None)
             for (layer, component), vector in sorted(scalings.items())]
    return Intervention(edits, hidden_size=hidden, positions="all", base_model=config.get("base_model_name_or_path"),
                        source_format=SOURCE_FORMAT)
