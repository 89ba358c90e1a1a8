"""Worker extension (``worker_extension_cls``): runs inside the process that holds the model.

``steer_install`` hooks this worker's model runner (``vllm_internals.install_step_hook``; hooks at linear
layers that LoRA wrapped are moved onto the wrappers), so the
per-step slot buffers are filled once per step from the scheduled batch; warm-up and profiling
runs never call it and see zeroed buffers.
``steer_take_capture`` hands over (and forgets) the activations a finished request captured
(``engine/capture.py``); ``steer_take_condition`` a conditional request's decision (``engine/condition.py``).
``steer_write_slot`` / ``steer_clear_slot`` copy an intervention's tables into a slot in place,
between engine steps (collective RPCs run between steps), without recompiling anything.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load as load_safetensors

from steer_serve.engine.model import steerable_model
from steer_serve.engine.vllm_internals import (allocate_pipeline_buffers, carry_hooks_to_lora_wrappers,
                                               embed_token_subsets_without_lora, install_step_hook)
from steer_serve.interventions.base import LowRankEdit

_LOWRANK_FIELDS = ("W", "b", "P", "U", "v", "z")


def encode_slot_payload(site_edits: dict[tuple[int, str], LowRankEdit]) -> tuple[bytes, str]:
    """Serialise per-site low-rank edits for ``steer_write_slot`` (safetensors bytes + JSON)."""
    from safetensors.torch import save

    tensors, meta = {}, []
    for i, ((layer, component), edit) in enumerate(sorted(site_edits.items())):
        meta.append({"layer": layer, "component": component, "act": edit.act, "renorm": edit.renorm})
        for name in _LOWRANK_FIELDS:
            value = getattr(edit, name)
            if value is not None:
                # P and U may alias, and may be transposed views (NoReFT's P = U = W₂ᵀ): own, contiguous copies
                tensors[f"{i}.{name}"] = value.detach().to(torch.float32).cpu().clone(memory_format=torch.contiguous_format)
    return save(tensors), json.dumps(meta)


def _decode_slot_payload(blob: bytes, meta_json: str) -> dict[tuple[int, str], LowRankEdit]:
    tensors = load_safetensors(blob)
    edits = {}
    for i, site in enumerate(json.loads(meta_json)):
        fields = {name: tensors.get(f"{i}.{name}") for name in _LOWRANK_FIELDS}
        edits[(site["layer"], site["component"])] = LowRankEdit(act=site["act"], renorm=site["renorm"], **fields)
    return edits


class SteerWorkerExtension:
    """Mixed into vLLM's worker class; methods are reachable through ``collective_rpc``."""

    def _steer_model(self):
        model = steerable_model(self.model_runner.get_model())
        if model is None:
            raise RuntimeError("the loaded model is not steerable (no Steer<Arch> class was built)")
        return model

    def steer_install(self) -> dict:
        """Hook the runner's per-step input preparation (and move site hooks onto the LoRA layers that
        wrapped their modules since the model was built; with prompt embeddings, let the LoRA embedding
        take a step's token subset); returns the table geometry."""
        model = self._steer_model()
        carry_hooks_to_lora_wrappers(model)
        if getattr(self.model_runner, "enable_prompt_embeds", False):
            embed_token_subsets_without_lora(model)
        per_request = (model.steer_capture, model.steer_interchange, model.steer_condition)

        def fill(*args, token_ids, **kwargs):
            model.steer_step_state.prepare(*args, token_ids=token_ids, **kwargs)   # t<id> triggers read the tokens
            for state in per_request:
                state.prepare(*args, **kwargs)

        install_step_hook(self.model_runner, fill)
        allocate_pipeline_buffers(self.model_runner)
        return model.steer_geometry

    def steer_take_capture(self, key: str) -> tuple[bytes, str]:
        """The captures of the request whose capture key is ``key`` (safetensors bytes, JSON sites), forgotten here."""
        return self._steer_model().steer_capture.take(key)

    def steer_take_condition(self, key: str) -> dict | None:
        """The decision of the conditional request whose key is ``key`` (None where its site is not on this
        worker), forgotten here."""
        return self._steer_model().steer_condition.take(key)

    def steer_write_slot(self, slot: int, blob: bytes, meta_json: str) -> None:
        """Write one intervention into ``slot`` of every layer (sites it doesn't touch are cleared)."""
        model = self._steer_model()
        edits = _decode_slot_payload(blob, meta_json)
        geometry = model.steer_geometry
        for layer_idx, component in edits:
            if not (0 <= layer_idx < geometry["num_layers"] and component in geometry["components"]):
                raise ValueError(f"site (layer {layer_idx}, {component}) is not hooked in this engine")
        # a pipeline stage holds only its own layers; the other stages write theirs
        hooked = {(layer.layer_idx, component) for layer in model.steer_layers for component in layer.components}
        edits = {site: edit for site, edit in edits.items() if site in hooked}
        for layer in model.steer_layers:
            for component in layer.components:
                edit = edits.get((layer.layer_idx, component))
                tables = layer.slot_tables(component)
                if edit is None:
                    tables.clear(slot)
                else:
                    tables.write(slot, edit)
        model.steer_step_state.set_slot_sites(slot, list(edits))

    def steer_clear_slot(self, slot: int) -> None:
        """Zero ``slot`` everywhere."""
        model = self._steer_model()
        for layer in model.steer_layers:
            for component in layer.components:
                layer.slot_tables(component).clear(slot)
        model.steer_step_state.set_slot_sites(slot, [])
