"""Weight-space adapters (PEFT LoRA and the PEFT methods that are exactly a LoRA, GIFT checkpoints),
prepared for vLLM's LoRA path.

All end up as a PEFT LoRA directory the server owns (copied, re-saved as safetensors, checked):
vLLM's multi-LoRA support serves it per request. GIFT (``W' = W + s·W φᵀ ψ``) becomes the LoRA pair
``A = ψ``, ``B_l = s·W_l φᵀ`` (see :mod:`.gift`), which needs the base model's weights; AdaLoRA, LoHa,
LoKr and VeRA become the LoRA of the same ΔW (see :mod:`.peft_to_lora`); DoRA a LoRA plus per-output-channel
scales the intervention slots apply (see :mod:`.dora`). IA3 is an intervention, not an
adapter (see :mod:`.peft_ia3`). Other PEFT methods are refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import write_directory
from .dora import dora_to_lora
from .errors import InterventionFormatError
from .gift import PEFT_TYPES as GIFT_TYPES
from .gift import convert_gift_dir, write_peft_lora_dir
from .gift_wrapper import gift_root, gift_wrapper_to_lora, read_gift_wrapper
from .peft_prompt import PEFT_TYPES as PROMPT_TYPES
from .peft_to_lora import CONVERTERS, convert_to_lora, refuse_unservable
from .sources import load_safetensors, read_json, safe_torch_load

CONFIG_FILE = "adapter_config.json"
#: in an owned copy of a DoRA: its output scales, ``<layer>.<component>`` → g
SCALES_FILE = "output_scales.safetensors"
_UNSUPPORTED_OPTIONS = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern")


@dataclass
class WeightAdapter:
    """A servable weight-space adapter: an owned PEFT LoRA directory plus what describes it."""

    path: Path
    rank: int
    target_modules: list[str]
    source_format: str          # "peft_lora" | "peft_dora" | "gift" | "peft_adalora" | "peft_loha" | "peft_lokr" | …
    content_hash: str
    num_parameters: int
    #: DoRA's per-output-channel scales, ``{(layer, component): g}``, applied by the intervention slots
    output_scales: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def describe(self) -> dict:
        out = {"families": [self.source_format], "rank": self.rank, "target_modules": self.target_modules,
               "num_parameters": self.num_parameters, "source_format": self.source_format}
        if self.output_scales:
            out["output_scales"] = [{"layer": layer, "component": component}
                                    for layer, component in sorted(self.output_scales)]
        return out


def adapter_format(directory: Path) -> str | None:
    """``"peft_lora"``, ``"gift"`` or ``"peft_<method>"`` (a method converted to a LoRA) when ``directory``
    holds such an adapter, else None (also for IA3, an intervention, and the prompt-space methods). Any other
    PEFT method is a 400 naming it and why."""
    if gift_root(directory) is not None:
        return "gift"
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "")).upper() if isinstance(config, dict) else ""
    if peft_type == "LORA":
        return "peft_dora" if config.get("use_dora") else "peft_lora"
    if peft_type in GIFT_TYPES:
        return "gift"
    if peft_type in CONVERTERS:
        return f"peft_{peft_type.lower()}"
    if peft_type == "IA3" or peft_type in PROMPT_TYPES:  # an intervention; virtual tokens (see .peft_prompt)
        return None
    refuse_unservable(peft_type or "(no peft_type)")


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "adapter_model.safetensors").is_file():
        return load_safetensors(directory / "adapter_model.safetensors")
    if (directory / "adapter_model.bin").is_file():
        state = safe_torch_load(directory / "adapter_model.bin")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InterventionFormatError("adapter_model.bin must hold a flat dict of tensors",
                                          param="adapter_model.bin")
        return state
    raise InterventionFormatError(f"{directory.name} has {CONFIG_FILE} but no adapter_model.safetensors/.bin",
                                  param="source", code="missing_file")


def _linear_shapes(base_model_dir: str) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of the base model's 2-D weights, read from the safetensors header only."""
    with safe_open(str(Path(base_model_dir) / "model.safetensors"), framework="pt") as f:
        return {key[: -len(".weight")]: tuple(f.get_slice(key).get_shape())
                for key in f.keys() if key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2}


def _check_lora(config: dict, weights: dict[str, torch.Tensor], max_rank: int) -> int:
    """Validate a PEFT LoRA config + weights; returns the rank. vLLM checks module shapes on load."""
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InterventionFormatError(f"adapter_config.json: r must be a positive integer, got {rank!r}", param="r")
    if rank > max_rank:
        raise InterventionFormatError(f"LoRA rank {rank} exceeds this server's --max-lora-rank {max_rank}",
                                      param="r", code="rank_too_large")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise InterventionFormatError(f"adapter_config.json: {option} is not supported", param=option)
    if not any("lora_A" in k for k in weights) or not any("lora_B" in k for k in weights):
        raise InterventionFormatError("the adapter has no lora_A/lora_B weights", param="adapter_model")
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            raise InterventionFormatError(f"{key} is not a float tensor", param=key)
        if not torch.isfinite(tensor).all():
            raise InterventionFormatError(f"{key} holds NaN or Inf", param=key, code="non_finite")
        if "lora_A" in key and tensor.shape[0] != rank or "lora_B" in key and tensor.shape[-1] != rank:
            raise InterventionFormatError(f"{key} has shape {tuple(tensor.shape)}, inconsistent with r={rank}",
                                          param=key)
    return rank


def _hash_dir(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, "adapter_model.safetensors", SCALES_FILE):
        if (directory / name).is_file():
            digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:32]


def load_weight_adapter(directory: str | os.PathLike, dest_root: str | os.PathLike, *, base_model_dir: str,
                        max_rank: int, prompt_embeds: bool = False) -> WeightAdapter:
    """Check a PEFT LoRA / DoRA / AdaLoRA / LoHa / LoKr / VeRA or GIFT directory and write the servable LoRA
    copy under ``dest_root`` (``prompt_embeds``: the server takes prompt embeddings, so no embedding LoRA)."""
    directory = Path(directory)
    fmt = adapter_format(directory)
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = dest_root / f".incoming-{os.getpid()}-{id(directory)}"
    if fmt == "gift" and gift_root(directory) is not None:
        base = load_file(str(Path(base_model_dir) / "model.safetensors"))
        write_peft_lora_dir(gift_wrapper_to_lora(read_gift_wrapper(directory), base), staging, overwrite=True)
    elif fmt == "gift":
        base = load_file(str(Path(base_model_dir) / "model.safetensors"))
        convert_gift_dir(directory, staging, base, overwrite=True)
    elif fmt == "peft_dora":
        config = read_json(directory / CONFIG_FILE)
        pairs, scales = dora_to_lora(config, read_adapter_weights(directory),
                                     load_file(str(Path(base_model_dir) / "model.safetensors")))
        write_peft_lora_dir(pairs, staging, base_model=config.get("base_model_name_or_path"), overwrite=True)
        save_file({f"{layer}.{component}": g for (layer, component), g in scales.items()},
                  str(staging / SCALES_FILE), metadata={"format": "pt"})
    elif fmt is not None and fmt.startswith("peft_") and fmt != "peft_lora":
        config = read_json(directory / CONFIG_FILE)
        pairs = convert_to_lora(str(config["peft_type"]).upper(), config, read_adapter_weights(directory),
                                base_shapes=_linear_shapes(base_model_dir), max_rank=max_rank)
        write_peft_lora_dir(pairs, staging, base_model=config.get("base_model_name_or_path"), overwrite=True)
    elif fmt == "peft_lora":
        config = read_json(directory / CONFIG_FILE)
        weights = read_adapter_weights(directory)
        _check_lora(config, weights, max_rank)
        clean = {k: v.contiguous() for k, v in weights.items()}

        def fill(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            save_file(clean, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if (directory / SCALES_FILE).is_file():  # a DoRA's owned copy, read back
                shutil.copyfile(directory / SCALES_FILE, tmp / SCALES_FILE)

        write_directory(staging, fill, overwrite=True)
    else:
        raise InterventionFormatError(f"{directory.name} is not a PEFT LoRA or GIFT adapter directory",
                                      param="source", code="unknown_format")
    config = read_json(staging / CONFIG_FILE)
    weights = load_file(str(staging / "adapter_model.safetensors"))
    rank = _check_lora(config, weights, max_rank)
    if prompt_embeds and any("lora_embedding" in key for key in weights):
        shutil.rmtree(staging, ignore_errors=True)
        raise InterventionFormatError("LoRA on the input embedding is not served with --enable-prompt-embeds (vLLM "
                                      "embeds a step's token positions apart from its prompt embeddings, without "
                                      "the adapters' embedding rows)", param="target_modules")
    content_hash = _hash_dir(staging)
    target = dest_root / content_hash
    if target.exists():  # the same adapter is already stored
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(target)
    targets = config.get("target_modules") or []
    scales = {}
    if (target / SCALES_FILE).is_file():
        for key, g in load_file(str(target / SCALES_FILE)).items():
            layer, component = key.split(".", 1)
            scales[(int(layer), component)] = g
    return WeightAdapter(target, rank, sorted(targets) if isinstance(targets, list) else [str(targets)], fmt,
                         content_hash, sum(t.numel() for t in weights.values()) + sum(g.numel() for g in scales.values()),
                         scales)
