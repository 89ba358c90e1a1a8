"""Core data model shared by every intervention family.

An :class:`Intervention` is what a user registers under an id: a list of :class:`Edit` s
(one family applied at one :class:`Placement`), plus the positions it acts on and a default scale.

Every family has two faces:

* ``apply(h, params, config)`` — the torch reference forward over ``[tokens, hidden]``, written
  literally as pyreft/pyvene compute it. It is the oracle in tests.
* ``to_lowrank(params, config)`` — the same edit in the one *generic low-rank form* that the
  batched kernels and the engine execute::

      delta(h) = (act(h Wᵀ + b) − h P) Uᵀ + v − h ⊙ z
      h'       = h + coef · delta(h)            (coef = scale, or 0 where the position is masked)

  W: r×d, b: r, P: d×r, U: d×r, v: d, z: d (any of them may be None = zero).

  With ``renorm`` the edited row is then rescaled to the norm of the row it edited:
  ``h' ← h' · ‖h‖ / ‖h'‖`` (norm-preserving steering; rows whose ``h'`` is zero stay as they are).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

#: Where an edit acts, in pyvene's vocabulary (see ``steer_serve.engine.architectures`` for each
#: one's meaning). Per-head variants are written ``head_<component>`` with ``Placement.head``.
COMPONENTS = ("block_input", "block_output", "attention_input", "attention_output", "attention_value_output",
              "query_output", "key_output", "value_output", "mlp_input", "mlp_activation", "mlp_output")

#: Components on the residual stream's width (``hidden_size`` columns).
RESIDUAL_COMPONENTS = ("block_input", "block_output", "attention_input", "attention_output", "mlp_input",
                       "mlp_output")

#: Components that have ``head_<component>`` variants (pyvene's per-head sites).
HEAD_COMPONENTS = ("attention_value_output", "query_output", "key_output", "value_output")

#: Activation names accepted by ``LowRankEdit.act`` (pyreft takes transformers' ACT2FN names).
ACTIVATIONS = ("linear", "relu", "gelu", "tanh", "sigmoid", "silu")


@dataclass(frozen=True)
class Placement:
    """Where one edit acts: a decoder layer and a component of it (optionally one head)."""

    layer: int
    component: str = "block_output"
    head: int | None = None

    def __post_init__(self):
        base = self.component.removeprefix("head_")
        if base not in COMPONENTS or (base != self.component and base not in HEAD_COMPONENTS):
            raise ValueError(f"unknown component {self.component!r}; expected one of {', '.join(COMPONENTS)} "
                             f"(or head_<component> of {', '.join(HEAD_COMPONENTS)} with a head index)")
        if self.component.startswith("head_") != (self.head is not None):
            raise ValueError(f"component {self.component!r}: a head index is required exactly for head_* components")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")

    @property
    def base_component(self) -> str:
        return self.component.removeprefix("head_")


@dataclass
class Edit:
    """One family applied at one placement, with its tensors and hyper-parameters.

    ``window`` (``"first"`` / ``"last"``) restricts the edit to that half of an ``f<n>+l<n>``
    positions window, as pyreft's ``share_weights=False`` layout places its two interventions
    per layer; None acts on all of the intervention's positions. ``width`` is the number of
    columns of the component it acts on when that is not the intervention's ``hidden_size``
    (keys/values under grouped-query attention, the MLP activation).
    """

    family: str
    placement: Placement
    params: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)
    window: str | None = None
    width: int | None = None


@dataclass
class Intervention:
    """A registered intervention: its edits, default positions/scale and base-model facts."""

    edits: list[Edit]
    hidden_size: int
    positions: str = "all"
    scale: float = 1.0
    base_model: str | None = None
    dtype: str = "float32"
    source_format: str = "native"

    def edit_width(self, edit: Edit) -> int:
        """Columns of the component ``edit`` acts on."""
        return edit.width or self.hidden_size

    def num_parameters(self) -> int:
        return sum(t.numel() for e in self.edits for t in e.params.values())


@dataclass
class LowRankEdit:
    """An edit in the generic low-rank form (see module docstring). Tensors are float32."""

    W: torch.Tensor | None = None
    b: torch.Tensor | None = None
    P: torch.Tensor | None = None
    U: torch.Tensor | None = None
    v: torch.Tensor | None = None
    z: torch.Tensor | None = None
    act: str = "linear"
    renorm: bool = False

    @property
    def width(self) -> int | None:
        """Columns of the component the edit acts on (None when it holds no tensor)."""
        for t, dim in ((self.W, 1), (self.P, 0), (self.U, 0), (self.v, 0), (self.z, 0)):
            if t is not None:
                return t.shape[dim]
        return None

    @property
    def rank(self) -> int:
        for t, dim in ((self.W, 0), (self.b, 0), (self.P, 1), (self.U, 1)):
            if t is not None:
                return t.shape[dim]
        return 0

    def replace(self, **kw) -> "LowRankEdit":
        return dataclasses.replace(self, **kw)
