"""Synthetic requests: token-id prompts of a length distribution and a mix of interventions."""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

#: Token ids drawn for synthetic prompts: ordinary vocabulary, clear of special and byte tokens.
TOKEN_RANGE = (1000, 30000)


@dataclass(frozen=True)
class LengthDist:
    """``N`` (fixed), ``uniform:A:B`` (inclusive) or ``normal:MEAN:STD`` (rounded, at least 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        """Parse the command-line form; ValueError on anything else."""
        kind, *nums = str(text).split(":")
        if not nums:
            return cls("fixed", _positive(int(kind)))
        if kind not in ("uniform", "normal") or len(nums) != 2:
            raise ValueError(f"length distribution {text!r}: use N, uniform:A:B or normal:MEAN:STD")
        a, b = float(nums[0]), float(nums[1])
        if kind == "uniform" and not 1 <= a <= b:
            raise ValueError(f"uniform:{a}:{b} needs 1 <= A <= B")
        if kind == "normal" and (a < 1 or b < 0):
            raise ValueError(f"normal:{a}:{b} needs MEAN >= 1 and STD >= 0")
        return cls(kind, a, b)

    def sample(self, rng: random.Random) -> int:
        """One length (>= 1)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    return n


@dataclass
class RequestSpec:
    """One request of the workload."""

    index: int
    prompt: list[int]
    max_tokens: int
    intervention: str | None


def mix_weights(k: int, mix: str, zipf_s: float) -> list[float]:
    """Probabilities of the K interventions: ``uniform`` or ``zipf`` (rank r gets r^-s)."""
    if mix == "uniform":
        raw = [1.0] * k
    elif mix == "zipf":
        raw = [(r + 1) ** -zipf_s for r in range(k)]
    else:
        raise ValueError(f"mix {mix!r}: use uniform or zipf")
    total = sum(raw)
    return [w / total for w in raw]


def workload(interventions: list[str], prompt_len: LengthDist, output_len: LengthDist, *, mix: str = "uniform",
             zipf_s: float = 1.1, none_fraction: float = 0.0, seed: int = 0) -> Iterator[RequestSpec]:
    """An endless, seeded stream of requests; a ``none_fraction`` share names no intervention."""
    if not 0 <= none_fraction <= 1:
        raise ValueError("none_fraction must be within [0, 1]")
    rng = random.Random(seed)
    weights = mix_weights(len(interventions), mix, zipf_s) if interventions else []
    index = 0
    while True:
        steered = interventions and rng.random() >= none_fraction
        name = rng.choices(interventions, weights)[0] if steered else None
        prompt = [rng.randrange(*TOKEN_RANGE) for _ in range(prompt_len.sample(rng))]
        yield RequestSpec(index, prompt, output_len.sample(rng), name)
        index += 1
