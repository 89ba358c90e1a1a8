"""Which token positions an intervention acts on, in pyreft's grammar and a few more.

``f<n>`` first n prompt tokens, ``l<n>`` last n prompt tokens, ``f<n>+l<n>`` both (a union, as
pyvene gathers and scatters back), ``prompt`` every prompt token, ``generated`` every generated
token, ``all`` every token. Window counts are clamped to half the prompt as pyreft does
(``f3`` on a 4-token prompt edits 2 tokens; ``l1`` on a 1-token prompt edits none). The first four
act during prefill only, like pyreft with
``intervene_on_prompt=True``: generated tokens then see the edited KV cache.

Positions are absolute within the request (prompt token i has position i), so the mask is the
same however the prompt is chunked, cached or recomputed.

:func:`position_spans` is the vectorised form the engine fills its per-step buffers with: every
kind's mask is the union of two ordered half-open spans of positions, computed for whole arrays
of (kind code, first, last, prompt length) at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_WINDOW = re.compile(r"^(?:f(?P<f>\d+))?(?:\+?l(?P<l>\d+))?$")

#: Kind codes of the vectorised form; ``NO_POSITIONS`` marks a padded column (no token).
KIND_CODES = {"window": 0, "prompt": 1, "generated": 2, "all": 3}
NO_POSITIONS = -1
_END = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Positions:
    kind: str  # "window" | "prompt" | "generated" | "all"
    first: int = 0
    last: int = 0

    def mask(self, positions: np.ndarray, num_prompt_tokens: int) -> np.ndarray:
        """Boolean mask over absolute token ``positions`` of one request."""
        is_prompt = positions < num_prompt_tokens
        if self.kind == "all":
            return np.ones_like(is_prompt)
        if self.kind == "prompt":
            return is_prompt
        if self.kind == "generated":
            return ~is_prompt
        first, last = self.window(num_prompt_tokens)
        in_first = positions < first
        in_last = positions >= num_prompt_tokens - last
        return is_prompt & (in_first | in_last)

    def window(self, num_prompt_tokens: int) -> tuple[int, int]:
        """(first, last) counts actually used on a prompt: pyreft's ``get_intervention_locations``
        clamps each to half the prompt (``min(n, len // 2)``), so short prompts get fewer edits."""
        half = num_prompt_tokens // 2
        return min(self.first, half), min(self.last, half)

    @property
    def code(self) -> int:
        return KIND_CODES[self.kind]

    def __str__(self) -> str:
        if self.kind != "window":
            return self.kind
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)


def position_spans(kind: np.ndarray, first: np.ndarray, last: np.ndarray,
                   num_prompt_tokens: np.ndarray | int) -> np.ndarray:
    """``[..., 4]`` int64 ``(lo1, hi1, lo2, hi2)``, ``lo1 <= hi1 <= lo2 <= hi2``, such that
    :meth:`Positions.mask` of each element is ``[lo1, hi1) ∪ [lo2, hi2)``. ``kind`` (codes of
    :data:`KIND_CODES`, or ``NO_POSITIONS``), ``first`` and ``last`` share one shape, which
    ``num_prompt_tokens`` broadcasts against. Windows are clamped as in :meth:`Positions.window`."""
    kind = np.asarray(kind)
    prompt = np.asarray(num_prompt_tokens, dtype=np.int64)
    half = prompt // 2
    window, generated = kind == KIND_CODES["window"], kind == KIND_CODES["generated"]
    to_end = generated | (kind == KIND_CODES["all"])
    spans = np.empty((*kind.shape, 4), dtype=np.int64)
    spans[..., 0] = np.where(generated, prompt, 0)
    spans[..., 1] = np.where(window, np.minimum(first, half),
                             np.where(to_end, _END, np.where(kind == KIND_CODES["prompt"], prompt, 0)))
    spans[..., 2] = np.where(window, prompt - np.minimum(last, half), np.where(to_end, _END, spans[..., 1]))
    spans[..., 3] = np.where(window, prompt, spans[..., 2])
    return spans


#: The halves of an ``f<n>+l<n>`` window an edit may be restricted to (``Edit.window``).
WINDOWS = ("first", "last")


def window_part(spec: str, window: str | None) -> str:
    """The positions an edit restricted to ``window`` acts on under ``spec``.

    pyreft's ``get_intervention_locations(share_weights=False)``: with both counts non-zero the
    first half of the interventions gets the first n positions and the second half the last n;
    otherwise (``l1``, ``all``, ...) every intervention gets the same positions.
    """
    parsed = parse_positions(spec)
    if window is None or parsed.kind != "window" or not (parsed.first and parsed.last):
        return spec
    if window not in WINDOWS:
        raise ValueError(f"invalid window {window!r}: expected one of {WINDOWS} or None")
    return f"f{parsed.first}" if window == "first" else f"l{parsed.last}"


def parse_positions(spec: str) -> Positions:
    """Parse a positions string; raises ValueError with the accepted grammar on failure."""
    text = str(spec).strip().lower()
    if text in ("all", "prompt", "generated"):
        return Positions(text)
    m = _WINDOW.match(text)
    if text and m and (m.group("f") or m.group("l")) and not text.startswith("+"):
        first, last = int(m.group("f") or 0), int(m.group("l") or 0)
        if first > 0 or last > 0:
            if "+" in text and not (m.group("f") and m.group("l")):
                raise ValueError(f"invalid positions {spec!r}")
            return Positions("window", first, last)
    raise ValueError(f"invalid positions {spec!r}: expected f<n>, l<n>, f<n>+l<n>, prompt, generated or all")
