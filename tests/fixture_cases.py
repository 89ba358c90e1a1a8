"""Access to the recorded pyreft/pyvene fixtures in ``tests/fixtures/data`` (see its README)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parent / "fixtures" / "data"


@dataclass(frozen=True)
class Case:
    """One recorded intervention: its metadata, resolved params, and library I/O."""

    dir: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.dir / "case.json").read_text())

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def config(self) -> dict:
        return dict(self.meta["config"])

    @property
    def save_dir(self) -> Path | None:
        return self.dir / self.meta["save_dir"] if self.meta["save_dir"] else None

    @property
    def per_head(self) -> bool:
        return self.meta["component"].startswith("head_")

    def params(self) -> dict[str, torch.Tensor]:
        return load_file(self.dir / "params.safetensors")

    def io(self) -> dict[str, torch.Tensor]:
        return load_file(self.dir / "io.safetensors")

    def __str__(self) -> str:
        return self.name


def cases(**where) -> list[Case]:
    """Every recorded case whose metadata matches ``where`` (e.g. ``library="pyreft"``)."""
    found = [Case(p.parent) for p in sorted((DATA / "cases").glob("*/case.json"))]
    return [c for c in found if all(c.meta.get(k) == v for k, v in where.items())]


def manifest() -> dict:
    return json.loads((DATA / "manifest.json").read_text())


def assert_param_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Stored parameters bit for bit; ``rotate_layer`` is recomputed by torch's orthogonal
    parametrization, whose matmul rounding depends on the CPU's kernels: equal to float32 ulps."""
    if name == "rotate_layer":
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    else:
        assert torch.equal(got, want), (name, (got.float() - want.float()).abs().max())
