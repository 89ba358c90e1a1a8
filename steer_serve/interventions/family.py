"""The base class every intervention family derives from, and the helpers families share.

A family sees its tensors ``params`` (a dict of named tensors) and ``config`` (a dict of plain
hyper-parameters). Two config keys are understood by every family:

* ``head`` / ``head_dim`` / ``num_heads`` — set for per-head placements (``head_*``
  components). The family's tensors then have width ``head_dim`` and act on columns
  ``[head*head_dim, (head+1)*head_dim)`` of a component ``num_heads*head_dim`` wide;
  steer-serve assumes ``head_dim = hidden_size // num_attention_heads`` (the Llama layout, also
  pyvene's fallback), and the reader that builds the edit writes these keys.
  :meth:`Family.apply` slices that head out of a full-width ``h`` and :meth:`Family.to_lowrank`
  returns full-width tensors with zeros outside the head's columns.

Everything else (``act_fn``, ``interchange_dim``, ``scale``, ...) is family specific.

A family also declares how the library that trains it saves it (``library_classes``, ``saved``,
``saved_unused``, ``saved_config``), so the pyvene/pyreft reader is generic and a new family is one
module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ACTIVATIONS, LowRankEdit

_ACT = {
    "linear": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
}
assert set(_ACT) == set(ACTIVATIONS)


def act_name(config: dict) -> str:
    """The activation named by ``config["act_fn"]`` (pyreft's ``None`` means linear)."""
    name = config.get("act_fn") or "linear"
    if name == "swish":
        name = "silu"
    if name not in _ACT:
        raise ValueError(f"unknown act_fn {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def activation(name: str):
    """The torch function of an activation name (same functions as transformers' ACT2FN)."""
    return _ACT[act_name({"act_fn": name})]


@dataclass(frozen=True)
class Saved:
    """Where one parameter lives in the library's saved state dict (``intkey_*.bin``): the first of
    ``keys`` present. ``kind`` ``rotation``: an orthogonally parametrized ``rotate_layer`` (the reader
    resolves the parametrization); ``source``: pyvene's stored source representation, one vector (or
    the reader's ``source=`` when none is stored)."""

    keys: tuple[str, ...]
    optional: bool = False
    kind: str = "tensor"     # "tensor" | "rotation" | "source"


#: The two entries shared by many families.
ROTATION = Saved(("rotate_layer",), kind="rotation")
SOURCE = Saved(("source_representation",), kind="source")


class Family:
    """One intervention family. Subclasses set ``name`` (and ``required``/``optional`` parameter
    names) and implement :meth:`check`, :meth:`forward` and :meth:`lowrank` on the edit's own width.
    """

    name: str = ""
    #: Parameter names the family requires and those it also accepts.
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    #: The pyvene/pyreft class names saved as this family.
    library_classes: tuple[str, ...] = ()
    #: Parameter name -> where the library's saved state dict holds it.
    saved: dict[str, Saved] = {}
    #: Saved entries the family does not use (given to :meth:`check_saved`, then dropped).
    saved_unused: tuple[str, ...] = ()
    #: Config the reader fills from the save: ``act_fn`` (pyreft does not store it: the caller says
    #: it), ``interchange_dim`` (pyvene's ``intervention_dimensions``), ``width`` (no tensor tells it).
    saved_config: tuple[str, ...] = ()
    #: Whether pyvene's ``subspaces`` choose the coordinates this interchange family replaces by the
    #: source's (served for the families tested against pyvene: vanilla and the rotated spaces).
    takes_subspaces: bool = False

    def check(self, params: dict[str, torch.Tensor], config: dict, width: int) -> None:
        """Validate shapes/hyper-parameters for an edit of ``width`` columns (ValueError if wrong)."""
        raise NotImplementedError

    def check_saved(self, unused: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        """Validate the saved entries listed in ``saved_unused`` (ValueError if they change the math)."""

    def forward(self, h: torch.Tensor, params: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
        """The library's forward over ``[tokens, width]``."""
        raise NotImplementedError

    def lowrank(self, params: dict[str, torch.Tensor], config: dict) -> LowRankEdit:
        """The generic low-rank form over the edit's own width (float32 tensors)."""
        raise NotImplementedError

    def subspace_axes(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[width, m]`` float32: column j is the coordinate pyvene's ``subspaces`` index j selects (the
        identity for the original basis, the rotation for a rotated space). Only when ``takes_subspaces``."""
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------

    def validate(self, params: dict[str, torch.Tensor], config: dict, hidden_size: int) -> None:
        """Check ``params``/``config`` for a component of ``hidden_size`` columns.

        Raises ValueError naming the family and the offending parameter.
        """
        missing = [k for k in self.required if k not in params]
        unknown = [k for k in params if k not in self.required and k not in self.optional]
        if missing or unknown:
            raise ValueError(f"{self.name}: missing parameters {missing} / unknown parameters {unknown}; "
                             f"expected {list(self.required)}" + (f" (optional {list(self.optional)})" if self.optional else ""))
        for k, t in params.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{self.name}: parameter {k!r} must be a floating-point tensor")
        width = hidden_size
        head = config.get("head")
        if head is not None:
            head_dim, num_heads = config.get("head_dim"), config.get("num_heads")
            if not all(isinstance(x, int) for x in (head, head_dim, num_heads)) or not 0 <= head < num_heads:
                raise ValueError(f"{self.name}: a per-head edit needs integer config 'head' in [0, num_heads), "
                                 f"'head_dim' and 'num_heads'; got head={head!r} head_dim={head_dim!r} "
                                 f"num_heads={num_heads!r}")
            if head_dim * num_heads != hidden_size:
                raise ValueError(f"{self.name}: head_dim {head_dim} x num_heads {num_heads} != component width "
                                 f"{hidden_size}")
            width = head_dim
        self.check(params, config, width)

    def apply(self, h: torch.Tensor, params: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
        """Reference forward over ``[tokens, hidden]`` (per-head edits act on their head's columns)."""
        head = config.get("head")
        if head is None:
            return self.forward(h, params, config)
        cols = slice(head * config["head_dim"], (head + 1) * config["head_dim"])
        out = h.clone()
        out[..., cols] = self.forward(h[..., cols], params, config).to(h.dtype)
        return out

    def to_lowrank(self, params: dict[str, torch.Tensor], config: dict) -> LowRankEdit:
        """The edit in the generic low-rank form, float32; per-head edits are expanded to the
        component's full width (``head_dim * num_heads``) with zeros outside the head."""
        edit = self.lowrank(params, config)
        head = config.get("head")
        if head is None:
            return edit
        head_dim = config["head_dim"]
        return expand_head(edit, head * head_dim, head_dim * config["num_heads"])


def expand_head(edit: LowRankEdit, start: int, hidden: int) -> LowRankEdit:
    """Place an edit over columns ``[start, start+width)`` of a ``hidden``-wide component."""

    def pad(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if t is None:
            return None
        shape = list(t.shape)
        shape[dim] = hidden
        full = t.new_zeros(shape)
        full.narrow(dim, start, t.shape[dim]).copy_(t)
        return full

    return edit.replace(W=pad(edit.W, 1), P=pad(edit.P, 0), U=pad(edit.U, 0), v=pad(edit.v, 0), z=pad(edit.z, 0))


def expect_shape(family: str, params: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``params[name]`` has exactly ``shape``."""
    got = tuple(params[name].shape)
    if got != tuple(shape):
        raise ValueError(f"{family}: parameter {name!r} has shape {list(got)}, expected {list(shape)}")


def f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """Detached float32 copy-or-view (None stays None)."""
    return None if t is None else t.detach().to(torch.float32)


def renormalise(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` rescaled row by row to the norm of ``old`` (rows of ``new`` that are zero unchanged)."""
    new_norm = new.norm(dim=-1, keepdim=True)
    scale = torch.where(new_norm > 0, old.norm(dim=-1, keepdim=True) / new_norm, torch.ones_like(new_norm))
    return new * scale


def unit(family: str, direction: torch.Tensor) -> torch.Tensor:
    """``direction / ‖direction‖`` in float32 (computed in float64); ValueError if it is zero."""
    norm = direction.double().norm()
    if norm == 0:
        raise ValueError(f"{family}: parameter 'direction' is zero")
    return (direction.double() / norm).to(torch.float32)


def interchange_dim(family: str, config: dict, width: int) -> int:
    """pyvene's ``interchange_dim``: how many leading (rotated) dimensions are swapped/added."""
    k = config.get("interchange_dim")
    if k is None:
        return width
    if not isinstance(k, int) or not 0 <= k <= width:
        raise ValueError(f"{family}: interchange_dim must be an integer in [0, {width}], got {k!r}")
    return k
