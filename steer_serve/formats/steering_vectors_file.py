"""The steering-vectors library's ``SteeringVector``, saved with ``torch.save``.

The library has no save API; users ``torch.save`` the dataclass (``layer_activations: dict[int,
Tensor]``, ``layer_type``). It is read with ``torch.load(weights_only=True)`` with exactly one class
allow-listed, a stand-in that only collects the pickled fields (never ``weights_only=False``).
``apply`` adds ``multiplier · activation`` to the output of the matched module of each layer at every
position (``min_token_index`` 0); the multiplier is the request's scale.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..interventions.base import Intervention
from .control_vectors import per_layer_intervention
from .errors import InterventionFormatError
from .sources import MAX_WEIGHTS_BYTES, check_file_size

CLASS_PATH = "steering_vectors.steering_vector.SteeringVector"

#: steering-vectors' ``layer_type`` -> the component its hook edits (the output of that module of
#: each decoder layer; a layer norm's output is the input of the block after it).
LAYER_TYPES = {"decoder_block": "block_output", "self_attn": "attention_output", "mlp": "mlp_output",
               "input_layernorm": "attention_input", "post_attention_layernorm": "mlp_input"}


class SavedSteeringVector:
    """Stand-in the unpickler builds for the library's dataclass: it only keeps the fields."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("SteeringVector state is not a dict")
        self.fields = dict(state)


def load_torch_file(path: Path):
    """``torch.load(weights_only=True)``, with the SteeringVector stand-in allow-listed."""
    check_file_size(path, MAX_WEIGHTS_BYTES)
    try:
        with torch.serialization.safe_globals([(SavedSteeringVector, CLASS_PATH)]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
        raise InterventionFormatError(f"refusing to unpickle {path.name}: it holds Python objects other than "
                                      f"tensors, plain containers and a SteeringVector ({reason})",
                                      param="source", code="unsafe_pickle") from exc
    except Exception as exc:  # the unpickler fails in many ways on malformed files (struct.error, ...)
        raise InterventionFormatError(f"cannot read {path.name} as a torch checkpoint "
                                      f"({exc.__class__.__name__}: {str(exc)[:200]})", param="source",
                                      code="invalid_checkpoint") from exc


def read_steering_vector(path: str | Path, *, operator: str | None = None, loaded=None) -> Intervention:
    """An intervention adding each layer's activation to the output of its ``layer_type`` module."""
    path = Path(path)
    obj = load_torch_file(path) if loaded is None else loaded
    if not isinstance(obj, SavedSteeringVector):
        raise InterventionFormatError(f"{path.name} is not a saved steering-vectors SteeringVector",
                                      param="source", code="unknown_format")
    fields = obj.fields
    layer_type = fields.get("layer_type", "decoder_block")
    if layer_type not in LAYER_TYPES:
        raise InterventionFormatError(f"{path.name}: unknown layer_type {layer_type!r}; expected one of "
                                      f"{', '.join(LAYER_TYPES)}", param="source", code="invalid_intervention")
    activations = fields.get("layer_activations")
    if not isinstance(activations, dict):
        raise InterventionFormatError(f"{path.name}: layer_activations must be a dict of layer -> tensor",
                                      param="source", code="invalid_intervention")
    vectors = {layer: (t.reshape(-1) if isinstance(t, torch.Tensor) else t) for layer, t in activations.items()}
    return per_layer_intervention(vectors, source_format="steering_vectors", operator=operator,
                                  file_name=path.name, component=LAYER_TYPES[layer_type])
