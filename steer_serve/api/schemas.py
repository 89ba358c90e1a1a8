"""Request bodies: the intervention fields of the OpenAI routes, and the intervention routes (pydantic)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from steer_serve.interventions.positions import parse_positions


def _check_positions(value: str | None) -> str | None:
    if value is not None:
        parse_positions(value)
    return value


class InterventionRef(BaseModel):
    """One intervention a request applies, with optional per-request scale and positions."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "honest", "scale": 0.8}]})
    id: str = Field(min_length=1, max_length=128, description="a registered intervention id")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                description="multiplies the edit: h + scale·(f(h) − h); default: its registered scale")
    positions: str | None = Field(default=None, max_length=32, description=(
        "f<n>, l<n>, f<n>+l<n>, prompt, generated, all, <i> (prompt index, -1 = last), <a>:<b> (prompt slice), "
        "g<a>:<b> (generated steps)"))

    _positions = field_validator("positions")(_check_positions)


class SteeringFields(BaseModel):
    """steer-serve's extension fields (send them with the OpenAI SDK through ``extra_body``)."""

    intervention: str | None = Field(default=None, max_length=128, description="id of one registered intervention")
    interventions: list[InterventionRef] | None = Field(default=None, max_length=16,
                                                         description="several interventions, applied in order")
    intervention_scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                             description="override the scale of every named intervention")
    intervention_positions: str | None = Field(default=None, max_length=32,
                                               description="override positions for every named intervention")

    _positions = field_validator("intervention_positions")(_check_positions)


class InterventionCreate(BaseModel):
    """Register an intervention from a local path (inside an allowed dir) or a hub id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "my-loreft", "source": "loreft-l15", "format": "auto", "positions": "l1", "scale": 1.0}]})
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                    description="the name requests use (`intervention`, or `model`)")
    source: str = Field(min_length=1, max_length=1024, description="directory/file in an allowed dir, or a hub id")
    format: Literal["auto", "native", "pyreft", "pyvene", "gguf", "steering_vectors", "caa"] = Field(
        default="auto", description="source format")
    positions: str | None = Field(default=None, max_length=32, description="default positions: f<n>, l<n>, "
                                                                           "f<n>+l<n>, prompt, generated, all")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False, description="default scale")
    act_fn: str | None = Field(default=None, max_length=32, description="pyreft act_fn (not saved by pyreft)")
    operator: str | None = Field(default=None, max_length=32, description="control-vector files: addition "
                                 "(default), ablation or ablation_then_addition (steering-vectors' operators)")
    replace: bool = Field(default=False, description="swap out an existing id (409 without it)")
    task_id: int | None = Field(default=None, ge=0, description="the task of a PEFT multitask prompt tuning "
                                                                  "adapter (peft's task_ids); only for those")

    _positions = field_validator("positions")(_check_positions)


class InterventionPatch(BaseModel):
    """New defaults for an intervention; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"scale": 0.5, "positions": "l2"}]})
    positions: str | None = Field(default=None, max_length=32, description="f<n>, l<n>, f<n>+l<n>, prompt, "
                                                                           "generated, all")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False, description="new default scale")

    _positions = field_validator("positions")(_check_positions)
