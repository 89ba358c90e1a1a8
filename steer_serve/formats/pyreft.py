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
"""
from __future__ import annotations

import os

from ..interventions.base import Intervention
from .pyvene import read_intervention_dir

DEFAULT_POSITIONS = "l1"


def read_pyreft_dir(path: str | os.PathLike, *, positions: str | None = None, act_fn: str | None = None,
                    hidden_size: int | None = None, head: int | None = None,
                    num_heads: int | None = None) -> Intervention:
    """Read a pyreft save directory (``config.json`` + ``intkey_*.bin``) into an :class:`Intervention`."""
    return read_intervention_dir(path, source_format="pyreft", positions=positions or DEFAULT_POSITIONS,
                                 act_fn=act_fn, hidden_size=hidden_size, head=head, num_heads=num_heads)
