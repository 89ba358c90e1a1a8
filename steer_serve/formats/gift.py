"""GIFT checkpoints, re-expressed as PEFT LoRA adapters for vLLM's LoRA path.

GIFT (Savadikar, Song, Wu: "GIFT: Generative Interpretable Fine-Tuning", arXiv 2312.00700) edits
weights, not hidden states: for a target linear layer with weight ``W_l`` (out×in)::

    W_l' = W_l + s · (W_l φᵀ) ψ          s = alpha / r,  φ, ψ: r×in

with one (φ, ψ) pair shared by every layer's copy of a target module (all ``q_proj``s, ...).
As a LoRA pair (``ΔW = B A``) that is ``A = ψ`` (shared) and ``B_l = s · W_l φᵀ`` (per layer),
which needs the base weights ``W_l``: :func:`gift_to_lora` takes them, and
:func:`write_peft_lora_dir` writes the result as a PEFT LoRA directory vLLM can load.

Assumed on-disk layout (the language-model release at github.com/savadikarc/gift, a PEFT fork
where the method is called WeGeFT), one directory with:

* ``adapter_config.json``: ``peft_type`` ``"WeGeFT"`` (``"GIFT"`` also accepted), ``r``,
  ``wegeft_alpha``, ``target_modules`` (list of name suffixes, or one regex), ``tied_modules``
  (list of groups of regexes matched with ``re.match`` against module paths such as
  ``model.layers.3.self_attn.q_proj``), ``transform_dim`` (only ``"input"`` is supported),
  optional ``layers_to_transform`` and ``base_model_name_or_path``;
* ``adapter_model.safetensors`` (or ``adapter_model.bin``) with
  ``base_model.model.<module path>.wegeft_phi.weight`` and ``...wegeft_psi.weight``, both r×in
  (``nn.Linear(in, r)`` weights). Within a tied group only the first module in model order
  stores them; a module outside every group stores its own pair.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import write_directory
from .errors import InterventionFormatError
from .sources import load_safetensors, read_json, safe_torch_load

CONFIG_FILE = "adapter_config.json"
PEFT_TYPES = ("WEGEFT", "GIFT")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.wegeft_(?P<kind>phi|psi)(?:\.default)?\.weight$")
_LAYER = re.compile(r".*\.[^.]*\.(\d+)\.")


@dataclass
class GiftCheckpoint:
    """A GIFT checkpoint: its shared (φ, ψ) pairs keyed by the module path that stores them."""

    rank: int
    alpha: float
    target_modules: list[str] | str
    phi: dict[str, torch.Tensor]
    psi: dict[str, torch.Tensor]
    tied_modules: list[list[str]] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    base_model: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def is_target(self, module: str) -> bool:
        """Whether GIFT edits the linear layer at ``module`` (PEFT's target-module rule)."""
        if isinstance(self.target_modules, str):
            found = re.fullmatch(self.target_modules, module) is not None
        else:
            found = any(module == t or module.endswith("." + t) for t in self.target_modules)
        if found and self.layers_to_transform is not None:
            m = _LAYER.match(module)
            found = m is not None and int(m.group(1)) in self.layers_to_transform
        return found

    def owner(self, module: str) -> str | None:
        """The module path whose (φ, ψ) ``module`` uses, or None if there is none."""
        if module in self.phi:
            return module
        for group in self.tied_modules:
            if any(re.match(pattern, module) for pattern in group):
                return next((m for m in self.phi if any(re.match(p, m) for p in group)), None)
        return None


def _fail(message: str, param: str = CONFIG_FILE):
    raise InterventionFormatError(f"GIFT checkpoint: {message}", param=param)


def _read_config(directory: Path) -> dict:
    cfg = read_json(directory / CONFIG_FILE)
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "")).upper() not in PEFT_TYPES:
        _fail(f"{CONFIG_FILE} has peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, "
              f"expected one of {', '.join(PEFT_TYPES)}", "peft_type")
    rank = cfg.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        _fail(f"r must be a positive integer, got {rank!r}", "r")
    alpha = cfg.get("wegeft_alpha", cfg.get("alpha", rank))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        _fail(f"wegeft_alpha must be a number, got {alpha!r}", "wegeft_alpha")
    dims = cfg.get("transform_dim") or "input"
    for name, dim in (dims.items() if isinstance(dims, dict) else [("*", dims)]):
        if dim != "input":
            _fail(f"transform_dim {dim!r} for {name} is not supported (only 'input': W' = W + s·W φᵀ ψ)",
                  "transform_dim")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            _fail(f"{key} is not supported (every module must use r and wegeft_alpha)", key)
    if not isinstance(cfg.get("target_modules"), (list, str)) or not cfg.get("target_modules"):
        _fail("target_modules is missing", "target_modules")
    return cfg


def _read_weights(directory: Path) -> dict:
    if (directory / "adapter_model.safetensors").is_file():
        return load_safetensors(directory / "adapter_model.safetensors")
    if (directory / "adapter_model.bin").is_file():
        state = safe_torch_load(directory / "adapter_model.bin")
        if not isinstance(state, dict):
            _fail("adapter_model.bin does not hold a state dict", "adapter_model.bin")
        return state
    _fail("missing adapter_model.safetensors (or adapter_model.bin)", "adapter_model.safetensors")


def read_gift_dir(path: str | os.PathLike) -> GiftCheckpoint:
    """Read a GIFT checkpoint directory (layout in the module docstring)."""
    directory = Path(path)
    cfg = _read_config(directory)
    phi, psi = {}, {}
    for key, tensor in _read_weights(directory).items():
        m = _KEY.match(key)
        if m is None:
            _fail(f"unexpected tensor {key!r} (only wegeft_phi/wegeft_psi weights are supported)", key)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2:
            _fail(f"{key} must be a 2-D floating-point tensor", key)
        if tensor.shape[0] != cfg["r"]:
            _fail(f"{key} has shape {tuple(tensor.shape)}, expected {cfg['r']} rows (r)", key)
        if not bool(torch.isfinite(tensor).all()):
            _fail(f"{key} holds NaN/Inf values", key)
        (phi if m.group("kind") == "phi" else psi)[m.group("module")] = tensor
    if not phi or phi.keys() != psi.keys():
        _fail(f"every module needs both wegeft_phi and wegeft_psi (phi: {sorted(phi)}, psi: {sorted(psi)})",
              "adapter_model")
    for module in phi:
        if phi[module].shape != psi[module].shape:
            _fail(f"{module}: wegeft_phi {tuple(phi[module].shape)} and wegeft_psi {tuple(psi[module].shape)} differ",
                  module)
    layers = cfg.get("layers_to_transform")
    return GiftCheckpoint(rank=cfg["r"], alpha=float(cfg.get("wegeft_alpha", cfg.get("alpha", cfg["r"]))),
                          target_modules=cfg["target_modules"], phi=phi, psi=psi,
                          tied_modules=[[g] if isinstance(g, str) else list(g) for g in cfg.get("tied_modules") or []],
                          layers_to_transform=[layers] if isinstance(layers, int) else layers,
                          base_model=cfg.get("base_model_name_or_path"))


def gift_to_lora(gift_ckpt: GiftCheckpoint, base_state_dict: dict[str, torch.Tensor]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Express ``gift_ckpt`` as float32 LoRA pairs ``{module path: (A, B)}`` with ``ΔW = B @ A``.

    ``base_state_dict`` is the base model's state dict (``model.layers.0.self_attn.q_proj.weight``
    ...); every targeted linear layer in it gets ``A = ψ`` and ``B = s · W φᵀ``.
    """
    pairs = {}
    for key, weight in base_state_dict.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or not gift_ckpt.is_target(module):
            continue
        owner = gift_ckpt.owner(module)
        if owner is None:
            _fail(f"target module {module} has no wegeft_phi/psi of its own and no tied group supplies one", module)
        phi, psi = gift_ckpt.phi[owner].float(), gift_ckpt.psi[owner].float()
        if weight.dim() != 2 or weight.shape[1] != phi.shape[1]:
            _fail(f"{module}: base weight {tuple(weight.shape)} does not fit wegeft_phi {tuple(phi.shape)} "
                  f"(from {owner}); is this the right base model?", module)
        pairs[module] = (psi.clone(), (weight.float() @ phi.T) * gift_ckpt.scaling)
    if not pairs:
        _fail(f"no module of the base model matches target_modules {gift_ckpt.target_modules!r}", "target_modules")
    return pairs


def write_peft_lora_dir(lora: dict[str, tuple[torch.Tensor, torch.Tensor]], directory: str | os.PathLike, *,
                        base_model: str | None = None, dtype: torch.dtype = torch.float32,
                        overwrite: bool = False) -> Path:
    """Write LoRA pairs ``{module path: (A, B)}`` (``ΔW = B @ A``) as a PEFT LoRA directory.

    The scale is folded into ``B``, so the config says ``lora_alpha == r``. Written atomically.
    """
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) != 1:
        raise InterventionFormatError(f"all LoRA pairs must share one rank, got ranks {sorted(ranks)}", param="r")
    rank = ranks.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in lora}), "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    tensors = {}
    for module, (a, b) in lora.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()

    def fill(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return write_directory(directory, fill, overwrite=overwrite)


def convert_gift_dir(src: str | os.PathLike, dst: str | os.PathLike, base_state_dict: dict[str, torch.Tensor], *,
                     base_model: str | None = None, dtype: torch.dtype = torch.float32,
                     overwrite: bool = False) -> Path:
    """Read the GIFT directory ``src`` and write it as a PEFT LoRA directory ``dst``."""
    ckpt = read_gift_dir(src)
    return write_peft_lora_dir(gift_to_lora(ckpt, base_state_dict), dst, base_model=base_model or ckpt.base_model,
                               dtype=dtype, overwrite=overwrite)
