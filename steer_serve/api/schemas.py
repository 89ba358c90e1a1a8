"""Request bodies: the intervention fields of the OpenAI routes, and the intervention routes (pydantic)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from steer_serve.interventions.positions import parse_positions


def _check_positions(value: str | None) -> str | None:
    if value is not None:
        parse_positions(value)
    return value


def _check_static_positions(value: str | None) -> str | None:
    """Positions known from the prompt's length alone (a capture reads rows it must know in advance)."""
    if value is not None and not parse_positions(value).static:
        raise ValueError(f"positions {value!r}: a token trigger applies to interventions only")
    return value


class InterchangeSource(BaseModel):
    """The source run of an interchange intervention: its prompt and the positions whose representation is taken."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "Paris is in", "positions": "l1"}]})
    prompt: str | list[int] | None = Field(default=None, description="the source prompt: text or token ids")
    messages: list[dict] | None = Field(default=None, min_length=1, description=(
        "instead of `prompt`: a chat-form source, rendered by the model's chat template with the generation "
        "prompt, as a chat request's messages are"))
    positions: str = Field(max_length=32, description="f<n>, l<n> or f<n>+l<n>: paired in order with the base positions")

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self

    _positions = field_validator("positions")(_check_positions)


class InterventionRef(BaseModel):
    """One intervention a request applies, with optional per-request scale and positions."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"id": "honest", "scale": 0.8}]})
    id: str = Field(min_length=1, max_length=128, description="a registered intervention id")
    scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                description="multiplies the edit: h + scale·(f(h) − h); default: its registered scale")
    positions: str | None = Field(default=None, max_length=32, description=(
        "f<n>, l<n>, f<n>+l<n>, prompt, generated, all, <i> (prompt index, -1 = last), <a>:<b> (prompt slice), "
        "g<a>:<b> (generated steps)"))
    source: InterchangeSource | None = Field(default=None, description="an interchange intervention's source run")
    subspaces: list[StrictInt] | None = Field(default=None, max_length=65536, description=(
        "with `source`: pyvene's `subspaces` for the unit, the dimensions of the intervention's space (rotated for "
        "rotated spaces) taken from the source instead of the first interchange_dim"))

    _positions = field_validator("positions")(_check_positions)


class CaptureSite(BaseModel):
    """One site whose activations a request returns (pyvene's ``CollectIntervention``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"layer": 15, "component": "block_output", "positions": "l1"}]})
    layer: int = Field(ge=0, description="decoder layer (0-based)")
    component: str = Field(max_length=64, description="a hooked component: block_output, mlp_output, ...")
    positions: str = Field(max_length=32, description="f<n>, l<n>, f<n>+l<n>, prompt, generated, all")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="dtype of the returned data")

    _positions = field_validator("positions")(_check_static_positions)


class ConditionSpec(BaseModel):
    """Conditional steering (CAST): the request's interventions apply to its generated tokens only if
    its prompt meets this condition (``steer_serve/engine/condition.py`` has the math)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"intervention": "harmful-condition", "layer": 6, "threshold": 0.02, "comparator": "larger"}]})
    intervention: str = Field(max_length=128, description="a registered steering vector whose direction at "
                                                          "`layer` is the condition direction (its site is the condition's)")
    layer: int = Field(ge=0, description="decoder layer of the condition (0-based)")
    threshold: float = Field(allow_inf_nan=False, description="compared with the prompt's similarity to the direction")
    comparator: Literal["larger", "smaller"] = Field(
        default="larger", description="IBM activation-steering's condition_comparator_threshold_is: 'larger' holds "
                                      "when the similarity is below the threshold, 'smaller' when above")
    aggregate: Literal["mean", "last"] = Field(
        default="mean", description="the prompt's representation: the mean of its rows, or its last row")


class SteeringFields(BaseModel):
    """steer-serve's extension fields (send them with the OpenAI SDK through ``extra_body``)."""

    intervention: str | None = Field(default=None, max_length=128, description="id of one registered intervention")
    interventions: list[InterventionRef] | None = Field(default=None, max_length=16,
                                                         description="several interventions, applied in order")
    intervention_scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False,
                                             description="override the scale of every named intervention")
    intervention_positions: str | None = Field(default=None, max_length=32,
                                               description="override positions for every named intervention")

    capture: list[CaptureSite] | None = Field(default=None, max_length=64,
                                              description="return the activations at these sites in each choice")
    condition: ConditionSpec | None = Field(default=None, description="apply the interventions to the generated "
                                                                     "tokens only if the prompt meets this condition")

    _positions = field_validator("intervention_positions")(_check_positions)


class DeriveSpec(BaseModel):
    """Steering vectors from contrastive prompts, computed on the served model."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"method": "mean_difference", "positive": ["I love this"], "negative": ["I hate this"], "layers": [10],
         "component": "block_output", "positions": "l1"}]})
    method: Literal["mean_difference", "pca"] = Field(description="CAA's mean difference, or repeng's PCA of pair differences")
    positive: list[str | list[int]] = Field(min_length=1, max_length=256, description="prompts (text or token ids)")
    negative: list[str | list[int]] = Field(min_length=1, max_length=256, description="as many prompts, paired in order")
    layers: list[int] = Field(min_length=1, max_length=64, description="decoder layers to derive a vector at")
    component: str = Field(default="block_output", max_length=64, description="a hooked component")
    positions: str = Field(default="l1", max_length=32, description="positions averaged per prompt")

    _positions = field_validator("positions")(_check_static_positions)


class InterventionCreate(BaseModel):
    """Register an intervention from a local path (inside an allowed dir) or a hub id."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"id": "my-loreft", "source": "loreft-l15", "format": "auto", "positions": "l1", "scale": 1.0}]})
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                    description="the name requests use (`intervention`, or `model`)")
    source: str | None = Field(default=None, min_length=1, max_length=1024,
                               description="directory/file in an allowed dir, or a hub id")
    derive: DeriveSpec | None = Field(default=None, description="instead of a source: derive steering vectors")
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
