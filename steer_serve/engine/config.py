"""Engine-level intervention settings, carried to the worker inside the HF config overrides."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from steer_serve.interventions.base import COMPONENTS

_CONFIG_KEY = "steer_serve"


@dataclass(frozen=True)
class SteerConfig:
    """Sizes of the static device tables: fixed at start-up so their addresses never change."""

    num_slots: int = 16            # usable slots; slot 0 (= no edit) is extra
    max_rank: int = 8
    max_columns: int = 4           # interventions one request may combine
    components: tuple[str, ...] = COMPONENTS
    always_active: bool = False    # apply every hooked site every step (needed under CUDA graphs)

    def to_override(self) -> dict:
        data = asdict(self)
        data["components"] = list(self.components)
        return {_CONFIG_KEY: data}

    @classmethod
    def from_hf_config(cls, hf_config) -> "SteerConfig":
        data = dict(getattr(hf_config, _CONFIG_KEY, None) or {})
        if "components" in data:
            data["components"] = tuple(data["components"])
        return cls(**data)


@dataclass
class RequestSteering:
    """What one request asks for: slot ids, scales and positions, one entry per column; for an
    engine request whose prompt extends the user's (vLLM's beam-search steps), the user's prompt
    length that positions are counted from; and the answer's allowed length (``max_tokens``) where a
    position counts back from it (``g-8:``)."""

    slots: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)
    prompt_len: int | None = None
    max_new_tokens: int | None = None

    EXTRA_ARGS_KEY = "steer"

    def to_extra_args(self) -> dict:
        data = {"slots": self.slots, "scales": self.scales, "positions": self.positions}
        if self.prompt_len is not None:
            data["prompt_len"] = self.prompt_len
        if self.max_new_tokens is not None:
            data["max_new_tokens"] = self.max_new_tokens
        return {self.EXTRA_ARGS_KEY: data}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "RequestSteering | None":
        data = (extra_args or {}).get(cls.EXTRA_ARGS_KEY)
        if not data:
            return None
        return cls(list(data["slots"]), [float(s) for s in data["scales"]], list(data["positions"]),
                   data.get("prompt_len"), data.get("max_new_tokens"))
