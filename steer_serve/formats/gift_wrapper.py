"""GIFT checkpoints as GIFT's own code saves them, converted exactly into LoRA pairs.

``GIFTWrapperForCausalLM.save(dir)`` (github.com/savadikarc/gift, ``gift/gift/modeling_gift.py``)
writes ``dir/config/config.json`` (a ``GIFTConfig``, ``model_type`` ``"gift"``) beside its
``configuration_gift.py``, and ``dir/checkpoint.pth``: the wrapper's state dict without the
backbone, i.e. ``in_projections.<key>.weight`` (r×in) [``.bias`` (r)], ``out_projections.<key>.weight``
(in×r) [``.bias`` (in)] and the hypernet's own parameters under ``hypernets.<key>.``; ``<key>`` is a
target module name, or ``shared_projection`` with ``share_projections``.

For each targeted linear layer with frozen weight ``W`` (out×in) GIFT adds ``x·ΔWᵀ`` with
``ΔW = out_proj(block(in_proj(W)))``, computed in the config's ``dtype`` and cast back. With
``G = block(W Pᵀ + b_P)`` (out×r) and ``out_proj = (Q, b_Q)`` that is ``ΔW = G Qᵀ + 1 b_Qᵀ``: the
LoRA pair ``B = G``, ``A = Qᵀ``, one more rank (``B``'s column of ones, ``A``'s row ``b_Q``) with an
output bias. Only the ``simple_block`` hypernet (an elementwise activation; what GIFT's language
scripts use) is converted; other blocks are refused by name.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import InterventionFormatError
from .sources import read_json, safe_torch_load

CONFIG_DIR, CHECKPOINT = "config", "checkpoint.pth"
SHARED = "shared_projection"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: GIFT's ``ACTIVATION_LAYERS`` (gift/gift/hypernet/layers.py); any other name is ``nn.Identity`` there.
#: ``softmax`` is ``nn.Softmax()`` without ``dim`` on GIFT's 1×out×r tensor: torch's legacy rule picks
#: dim 0, so it yields ones.
_ACTIVATIONS = {
    "sigmoid": torch.sigmoid, "standard_sigmoid": torch.sigmoid, "gelu": F.gelu,
    "hsigmoid": lambda h: F.relu6(h + 3.0) / 6.0, "softmax": lambda h: F.softmax(h, dim=0),
}
_SIMPLE_BLOCK_KEYS = {"block_type", "act_layer", "num_blocks", "drop_path"}
_KEY = re.compile(r"^(?P<part>in_projections|out_projections|hypernets)\.(?P<key>[^.]+)\.(?P<rest>.+)$")


@dataclass
class Projections:
    """One target key's (or the shared) in/out projections: ``nn.Linear`` weights and optional biases."""

    in_weight: torch.Tensor
    out_weight: torch.Tensor
    in_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None


@dataclass
class GiftWrapperCheckpoint:
    """What ``GIFTWrapperForCausalLM.save`` wrote, checked."""

    rank: int
    dtype: torch.dtype | None
    act_layer: str
    num_blocks: int
    target_modules: list[str]
    share_projections: bool
    projections: dict[str, Projections]
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def is_target(self, module: str, target_key: str) -> bool:
        """GIFT's ``check_target_module_exists`` for a module path and one target key."""
        if not module.endswith("." + target_key.replace(":", ".")):
            return False
        indexes = self.layers_to_transform
        if indexes is None or (isinstance(indexes, list) and not indexes):
            return True
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*\.[^.]*\.(\d+)\.", module)
        else:
            match = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf".*\.{pattern}\.(\d+)\.", module)
                if match is not None:
                    break
        if match is None:
            return False
        layer = int(match.group(1))
        return layer == indexes if isinstance(indexes, int) else layer in indexes


def _fail(message: str, param: str = "config.json"):
    raise InterventionFormatError(f"GIFT checkpoint: {message}", param=param)


def gift_root(path: str | os.PathLike) -> Path | None:
    """The save directory when ``path`` is one written by GIFT's ``save`` (or its ``config/``)."""
    path = Path(path)
    for root in (path, path.parent):
        config = root / CONFIG_DIR / "config.json"
        if config.is_file() and (root / CHECKPOINT).is_file() and (root == path or path.name == CONFIG_DIR):
            cfg = read_json(config)
            if isinstance(cfg, dict) and cfg.get("model_type") == "gift":
                return root
    return None


def _read_config(root: Path) -> dict:
    cfg = read_json(root / CONFIG_DIR / "config.json")
    rank = cfg.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        _fail(f"rank must be a positive integer, got {rank!r}", "rank")
    if cfg.get("dtype") is not None and cfg["dtype"] not in _DTYPES:
        _fail(f"dtype {cfg['dtype']!r} is not supported (one of {', '.join(_DTYPES)}, or null)", "dtype")
    block = cfg.get("gift_parameters")
    if not isinstance(block, dict) or block.get("block_type") != "simple_block":
        kind = block.get("block_type") if isinstance(block, dict) else block
        _fail(f"gift_parameters block_type {kind!r} is not supported: only 'simple_block' (an elementwise "
              "activation) is converted into LoRA pairs", "gift_parameters")
    extra = sorted(set(block) - _SIMPLE_BLOCK_KEYS)
    if extra:
        _fail(f"gift_parameters {extra} are not simple_block parameters", "gift_parameters")
    if not isinstance(block.get("num_blocks", 1), int) or block.get("num_blocks", 1) < 1:
        _fail(f"gift_parameters num_blocks must be a positive integer, got {block.get('num_blocks')!r}",
              "gift_parameters")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t and "." not in t
                                                               for t in targets):
        _fail(f"target_modules must be a non-empty list of module names without '.' (GIFT iterates it and keys "
              f"its projections by each name; ':' separates parts), got {targets!r}", "target_modules")
    if cfg.get("enable_gift"):
        _fail("enable_gift (GIFT's merged-module path for fused projections) is not supported", "enable_gift")
    for flag in ("in_projection_bias", "out_projection_bias", "share_projections"):
        if not isinstance(cfg.get(flag, False), bool):
            _fail(f"{flag} must be true or false, got {cfg[flag]!r}", flag)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)
                                   or isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        _fail(f"layers_to_transform must be an integer or a list of integers, got {layers!r}", "layers_to_transform")
    return cfg


def _tensor(state: dict, key: str, shape: tuple) -> torch.Tensor:
    tensor = state.get(key)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        _fail(f"{CHECKPOINT} has no floating-point tensor {key!r}", key)
    if shape and tuple(tensor.shape) != shape:
        _fail(f"{key} has shape {tuple(tensor.shape)}, expected {shape}", key)
    if not bool(torch.isfinite(tensor).all()):
        _fail(f"{key} holds NaN/Inf values", key)
    return tensor


def read_gift_wrapper(path: str | os.PathLike) -> GiftWrapperCheckpoint:
    """Read a directory written by ``GIFTWrapperForCausalLM.save`` (layout in the module docstring)."""
    root = gift_root(path)
    if root is None:
        _fail(f"{Path(path).name} has no {CONFIG_DIR}/config.json (model_type 'gift') beside {CHECKPOINT}", "source")
    cfg = _read_config(root)
    state = safe_torch_load(root / CHECKPOINT)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        _fail(f"{CHECKPOINT} does not hold a state dict", CHECKPOINT)
    rank, share = cfg["rank"], bool(cfg.get("share_projections", False))
    keys = [SHARED] if share else list(cfg["target_modules"])
    for name in state:
        m = _KEY.match(name)
        if m is None or m.group("key") not in keys or m.group("part") == "hypernets" \
                or m.group("rest") not in ("weight", "bias"):
            _fail(f"unexpected tensor {name!r} (simple_block GIFT holds in_/out_projections.{{{', '.join(keys)}}}"
                  ".weight/.bias only)", name)
    projections = {}
    for key in keys:
        in_weight = _tensor(state, f"in_projections.{key}.weight", ())
        if in_weight.dim() != 2 or in_weight.shape[0] != rank:
            _fail(f"in_projections.{key}.weight has shape {tuple(in_weight.shape)}, expected ({rank}, in)", key)
        dim = in_weight.shape[1]
        proj = Projections(in_weight, _tensor(state, f"out_projections.{key}.weight", (dim, rank)))
        for side, size in (("in", rank), ("out", dim)):
            name = f"{side}_projections.{key}.bias"
            if cfg.get(f"{side}_projection_bias", False):
                setattr(proj, f"{side}_bias", _tensor(state, name, (size,)))
            elif name in state:
                _fail(f"{name} is present but {side}_projection_bias is false", name)
        projections[key] = proj
    block = cfg["gift_parameters"]
    return GiftWrapperCheckpoint(
        rank=rank, dtype=_DTYPES.get(cfg.get("dtype")), act_layer=str(block.get("act_layer", "identity")),
        num_blocks=int(block.get("num_blocks", 1)), target_modules=list(cfg["target_modules"]),
        share_projections=share, projections=projections, layers_to_transform=cfg.get("layers_to_transform"),
        layers_pattern=cfg.get("layers_pattern"))


def _pair(ckpt: GiftWrapperCheckpoint, proj: Projections, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B A = out_proj(block(in_proj(W)))``, the block run in GIFT's dtype."""
    dtype = ckpt.dtype or weight.dtype
    cast = (lambda t: None if t is None else t.to(dtype))
    h = F.linear(weight.to(dtype), cast(proj.in_weight), cast(proj.in_bias)).unsqueeze(0)
    act = _ACTIVATIONS.get(ckpt.act_layer, lambda t: t)
    for _ in range(ckpt.num_blocks):
        h = act(h)
    a, b = cast(proj.out_weight).T.float(), h[0].float()
    if proj.out_bias is not None:
        a = torch.cat([a, cast(proj.out_bias).float()[None]])
        b = torch.cat([b, torch.ones(b.shape[0], 1)], dim=1)
    return a.contiguous(), b.contiguous()


def gift_wrapper_to_lora(ckpt: GiftWrapperCheckpoint, base_state_dict: dict[str, torch.Tensor]
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA pairs ``{module path: (A, B)}`` (``ΔW = B @ A``, float32) for every module GIFT edits."""
    pairs = {}
    for key in ckpt.target_modules:
        proj = ckpt.projections[SHARED if ckpt.share_projections else key]
        found = 0
        for name, weight in base_state_dict.items():
            module = name.removesuffix(".weight")
            if not name.endswith(".weight") or not ckpt.is_target(module, key):
                continue
            if weight.dim() != 2 or weight.shape[1] != proj.in_weight.shape[1]:
                _fail(f"{module}: base weight {tuple(weight.shape)} does not fit the projection's input size "
                      f"{proj.in_weight.shape[1]}; is this the right base model?", module)
            pairs[module] = _pair(ckpt, proj, weight)
            found += 1
        if not found:
            _fail(f"target module {key!r} matches no linear layer of the base model", "target_modules")
    return pairs
