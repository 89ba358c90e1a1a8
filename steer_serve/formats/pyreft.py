"""pyreft save directories (``ReftModel.save``): pyvene's format with pyreft's interventions.

pyreft saves through pyvene's ``IntervenableModel.save`` (see :mod:`.pyvene` for the layout, both
key schemes and the orthogonal-parametrization handling). What the directory does NOT record,
and so is taken as arguments:

* ``positions`` — the training positions live in the training script. Default ``"l1"``: the last
  prompt token, as pyreft's quick-start and ``make_last_position_supervised_data_module`` train
  and generate; pass ``"f1+l1"`` etc. for interventions trained elsewhere.
* ``act_fn`` — default ``None`` = linear, pyreft's default for LoReFT/NoReFT/DiReFT/NodiReFT.
* dropout — inference only, so always off.
* the compute dtype — tensors keep their saved dtypes; a bf16 ``learned_source`` next to an fp32
  ``rotate_layer`` (pyreft's default when no ``dtype=`` was passed) is kept as is, and the
  families' forwards apply pyreft's casts.

One layout is recognised from the directory: pyreft's ``share_weights=False`` for ``f<n>+l<n>``
positions (the default of its training scripts) doubles the layer list, so the representations
are two equal halves and pyreft's ``get_intervention_locations`` gives the first half the first n
positions and the second half the last n. Those edits get ``window`` ``"first"`` / ``"last"``
and the default positions become ``"f1+l1"`` (pyreft's training default).
"""
from __future__ import annotations

import os

from ..interventions.base import Intervention
from .pyvene import read_intervention_dir

DEFAULT_POSITIONS = "l1"
#: pyreft's training default, which its ``share_weights=False`` layout implies.
SPLIT_DEFAULT_POSITIONS = "f1+l1"


def _is_split_layout(edits: list) -> bool:
    """Two equal halves of placements: pyreft's ``share_weights=False`` layout for ``f<n>+l<n>``."""
    half = len(edits) // 2
    return len(edits) == 2 * half > 0 and [e.placement for e in edits[:half]] == [e.placement for e in edits[half:]]


def read_pyreft_dir(path: str | os.PathLike, *, positions: str | None = None, act_fn: str | None = None,
                    hidden_size: int | None = None, head: int | None = None, num_heads: int | None = None,
                    widths: dict | None = None, heads: dict | None = None) -> Intervention:
    """Read a pyreft save directory (``config.json`` + ``intkey_*.bin``) into an :class:`Intervention`."""
    iv = read_intervention_dir(path, source_format="pyreft", positions=positions or DEFAULT_POSITIONS,
                               act_fn=act_fn, hidden_size=hidden_size, head=head, num_heads=num_heads,
                               widths=widths, heads=heads)
    if _is_split_layout(iv.edits):
        half = len(iv.edits) // 2
        for i, edit in enumerate(iv.edits):
            edit.window = "first" if i < half else "last"
        iv.positions = positions or SPLIT_DEFAULT_POSITIONS
    return iv
