"""Which token positions an intervention acts on, in pyreft's grammar and a few more.

``f<n>`` first n prompt tokens, ``l<n>`` last n prompt tokens, ``f<n>+l<n>`` both (a union, as
pyvene gathers and scatters back), ``prompt`` every prompt token, ``generated`` every generated
token, ``all`` every token. Window counts are clamped to half the prompt as pyreft does
(``f3`` on a 4-token prompt edits 2 tokens; ``l1`` on a 1-token prompt edits none). The first four
act during prefill only, like pyreft with
``intervene_on_prompt=True``: generated tokens then see the edited KV cache.

Python-style prompt indices and slices (prefill only, like the windows): ``<i>`` one prompt token
(``-1`` = the last, ``0`` = the first; out of range: none), ``<a>:<b>`` prompt tokens ``a..b-1``
(either bound may be negative, counted from the prompt's end, or left out; clamped like a Python
slice), e.g. ``-8:`` the last 8, ``2:-2``. Generation-step ranges: ``g<a>:<b>`` the generated tokens
``a..b-1`` (0 = the first generated token, the one ``generated`` starts with; ``b`` may be left out:
every later one), e.g. ``g0:16`` the first 16, ``g4:`` from the fifth on; a negative bound counts
from the end of the answer the request allows (its ``max_tokens``), e.g. ``g-8:`` the last 8 of
``max_tokens`` (an answer ending earlier reaches fewer of them, or none).

Token-triggered spans: ``t<id>`` every token after the first occurrence of token id ``<id>`` in the
request (prompt or generated), ``t<id>:<n>`` the ``n`` tokens after it; none while it has not
appeared. The trigger's position is found by the engine from the request's own tokens
(``trigger_at`` of :func:`position_spans`), so it is the same however the request is chunked,
cached or recomputed. They act on interventions only (a capture or an interchange needs positions
known from the prompt alone).

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
_INDEX = re.compile(r"^-?\d{1,9}$")
_SLICE = re.compile(r"^(?P<a>-?\d{1,9})?:(?P<b>-?\d{1,9})?$")
_STEPS = re.compile(r"^g(?P<a>-?\d{1,9}):(?P<b>-?\d{1,9})?$")
_TRIGGER = re.compile(r"^t(?P<a>\d{1,9})(?::(?P<b>\d{1,9}))?$")

#: Kind codes of the vectorised form; ``NO_POSITIONS`` marks a padded column (no token).
KIND_CODES = {"window": 0, "prompt": 1, "generated": 2, "all": 3, "slice": 4, "steps": 5, "trigger": 6}
NO_POSITIONS = -1
_END = np.iinfo(np.int64).max
#: ``Positions.first``/``last`` of a slice or steps kind when that bound is left out.
OPEN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Positions:
    """``kind`` with its counts: a window's first/last n; a slice's or steps' start/stop (``OPEN``: none);
    a trigger's token id and span length (``OPEN``: to the end)."""

    kind: str  # "window" | "prompt" | "generated" | "all" | "slice" | "steps" | "trigger"
    first: int = 0
    last: int = 0
    text: str = ""

    @property
    def static(self) -> bool:
        """Whether the positions follow from the prompt's length alone (not a trigger, not the answer's end)."""
        return self.kind != "trigger" and not self.needs_max_tokens

    @property
    def needs_max_tokens(self) -> bool:
        """Whether a bound counts from the end of the answer (``g-8:``): the request's ``max_tokens``."""
        return self.kind == "steps" and (self.first < 0 or OPEN != self.last < 0)

    def mask(self, positions: np.ndarray, num_prompt_tokens: int) -> np.ndarray:
        """Boolean mask over absolute token ``positions`` of one request (static kinds only)."""
        if not self.static:
            raise ValueError(f"positions {self.text!r} depend on the request's tokens, not only on its prompt length")
        if self.kind in ("slice", "steps"):
            lo, hi = _span(self.code, self.first, self.last, num_prompt_tokens)
            return (positions >= lo) & (positions < hi)
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
        if self.kind in ("slice", "steps", "trigger"):
            return self.text
        if self.kind != "window":
            return self.kind
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)


def _bound(value, default, prompt):
    """A Python slice bound over a prompt of ``prompt`` tokens: negative from the end, clamped to [0, prompt]."""
    given = np.where(value == OPEN, 0, value)
    return np.where(value == OPEN, default, np.where(given < 0, np.maximum(given + prompt, 0),
                                                     np.minimum(given, prompt)))


def _step(value, max_new):
    """A generation-step bound: negative ones count back from ``max_new`` (the answer's allowed length)."""
    return np.where(value < 0, np.maximum(max_new + value, 0), value)


def _span(kind, first, last, prompt, max_new=0):
    """``(lo, hi)`` of the slice and steps kinds (arrays broadcast)."""
    kind, first, last = np.asarray(kind), np.asarray(first, dtype=np.int64), np.asarray(last, dtype=np.int64)
    prompt, max_new = np.asarray(prompt, dtype=np.int64), np.asarray(max_new, dtype=np.int64)
    steps = kind == KIND_CODES["steps"]
    lo = np.where(steps, prompt + _step(first, max_new), _bound(first, 0, prompt))
    hi = np.where(steps, np.where(last == OPEN, _END, prompt + _step(np.where(last == OPEN, 0, last), max_new)),
                  _bound(last, prompt, prompt))
    return lo, np.maximum(hi, lo)


def position_spans(kind: np.ndarray, first: np.ndarray, last: np.ndarray, num_prompt_tokens: np.ndarray | int,
                   trigger_at: np.ndarray | None = None, max_new: np.ndarray | int = 0) -> np.ndarray:
    """``[..., 4]`` int64 ``(lo1, hi1, lo2, hi2)``, ``lo1 <= hi1 <= lo2 <= hi2``, such that
    :meth:`Positions.mask` of each element is ``[lo1, hi1) ∪ [lo2, hi2)``. ``kind`` (codes of
    :data:`KIND_CODES`, or ``NO_POSITIONS``), ``first`` and ``last`` share one shape, which
    ``num_prompt_tokens`` broadcasts against. Windows are clamped as in :meth:`Positions.window`.
    ``trigger_at`` (same shape; -1: not seen yet) is where each trigger kind's token first appeared;
    ``max_new`` (broadcast like the prompt) the answer's allowed length, for negative step bounds."""
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
    ranged = (kind == KIND_CODES["slice"]) | (kind == KIND_CODES["steps"])
    if ranged.any():
        lo, hi = _span(kind, np.asarray(first), np.asarray(last), prompt, max_new)
        for i, value in enumerate((lo, hi, hi, hi)):
            spans[..., i] = np.where(ranged, value, spans[..., i])
    triggered = kind == KIND_CODES["trigger"]
    if triggered.any():
        at = np.full(kind.shape, -1, dtype=np.int64) if trigger_at is None else np.asarray(trigger_at)
        lo = np.where(at >= 0, at + 1, _END)
        hi = np.where((np.asarray(last) == OPEN) | (at < 0), _END, lo + np.asarray(last))
        for i, value in enumerate((lo, hi, hi, hi)):
            spans[..., i] = np.where(triggered, value, spans[..., i])
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
    if _INDEX.match(text):
        i = int(text)
        return Positions("slice", i, OPEN if i == -1 else i + 1, text)
    if m := _TRIGGER.match(text):
        return Positions("trigger", int(m.group("a")), OPEN if m.group("b") is None else int(m.group("b")), text)
    if m := _SLICE.match(text) or _STEPS.match(text):
        bounds = [OPEN if m.group(g) is None else int(m.group(g)) for g in ("a", "b")]
        steps = text.startswith("g")
        if steps and bounds[1] != OPEN and (bounds[0] < 0) == (bounds[1] < 0) and bounds[1] <= bounds[0]:
            raise ValueError(f"invalid positions {spec!r}: generation steps g<a>:<b> need b > a")
        return Positions("steps" if steps else "slice", *bounds, text)
    m = _WINDOW.match(text)
    if text and m and (m.group("f") or m.group("l")) and not text.startswith("+"):
        first, last = int(m.group("f") or 0), int(m.group("l") or 0)
        if first > 0 or last > 0:
            if "+" in text and not (m.group("f") and m.group("l")):
                raise ValueError(f"invalid positions {spec!r}")
            return Positions("window", first, last)
    raise ValueError(f"invalid positions {spec!r}: expected f<n>, l<n>, f<n>+l<n>, prompt, generated, all, a prompt "
                     "index <i> (-1 = last), a prompt slice <a>:<b>, generation steps g<a>:<b> (negative: from the end of "
                     "max_tokens), or a token trigger t<id> / "
                     "t<id>:<n>")
