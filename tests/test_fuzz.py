"""Fuzzing (issue 9, item 4): schemathesis over the live server's OpenAPI schema, hypothesis over the
positions grammar and the format readers. No 5xx, no crash other than ``InterventionFormatError``.

``STEER_FUZZ_EXAMPLES`` sets the examples per API operation (default 12) and, times
8, per hypothesis test.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from conftest import ADMIN_KEY
from live_server import FIXTURES
from steer_serve.formats import InterventionFormatError, load_intervention
from steer_serve.formats.native import read_native, save_native
from steer_serve.formats.sources import load_safetensors
from steer_serve.formats.validation import validate_intervention
from steer_serve.interventions.positions import Positions, parse_positions
from steering_helpers import random_loreft

EXAMPLES = int(os.environ.get("STEER_FUZZ_EXAMPLES", "12"))
QUICK = settings(max_examples=8 * EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


# ----- the API ----------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(guarded_server):
    """Positive and negative examples for every operation, sent with the admin key."""
    schema = schemathesis.openapi.from_url(f"{guarded_server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 20
    seen: dict[str, set[int]] = {}
    took: dict[str, float] = {}
    for operation in operations:
        started = time.monotonic()
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case):
            response = case.call_and_validate(base_url=guarded_server.url, headers=headers, timeout=120,
                                              checks=[not_a_server_error])
            seen.setdefault(operation.label, set()).add(response.status_code)

        exercise()
        took[operation.label] = round(time.monotonic() - started, 1)
    print("schemathesis seconds per operation:", took, "statuses:", {k: sorted(v) for k, v in seen.items()})
    assert set(seen) == {op.label for op in operations}
    assert any(200 in codes for codes in seen.values()) and any(400 in codes for codes in seen.values())
    with httpx.Client(base_url=guarded_server.url, headers=headers, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json()["in_flight"] == 0


# ----- positions grammar ------------------------------------------------------------------------
def _reference_mask(spec: Positions, total: int, prompt_len: int) -> list[bool]:
    out = []
    for i in range(total):
        is_prompt = i < prompt_len
        if spec.kind == "all":
            out.append(True)
        elif spec.kind == "prompt":
            out.append(is_prompt)
        elif spec.kind == "generated":
            out.append(not is_prompt)
        else:
            first, last = min(spec.first, prompt_len // 2), min(spec.last, prompt_len // 2)  # pyreft's clamp
            out.append(is_prompt and (i < first or i >= prompt_len - last))
    return out


window = st.one_of(
    st.integers(1, 10**6).map(lambda n: f"f{n}"), st.integers(1, 10**6).map(lambda n: f"l{n}"),
    st.tuples(st.integers(1, 999), st.integers(1, 999)).map(lambda t: f"f{t[0]}+l{t[1]}"))
valid_specs = st.one_of(window, st.sampled_from(["all", "prompt", "generated", " ALL ", "Prompt", "generated\n"]))


@QUICK
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_value_error(text):
    try:
        parsed = parse_positions(text)
    except ValueError as exc:
        assert "positions" in str(exc)
        return
    assert parse_positions(str(parsed)) == parsed


@QUICK
@given(valid_specs)
def test_valid_specs_round_trip(spec):
    parsed = parse_positions(spec)
    assert parse_positions(str(parsed)) == parsed
    assert parsed.kind == "window" or str(parsed) == spec.strip().lower()


@QUICK
@given(valid_specs, st.integers(1, 64), st.integers(0, 64), st.randoms(use_true_random=False))
def test_mask_matches_the_rules_in_any_chunking(spec, prompt_len, generated, rng):
    parsed = parse_positions(spec)
    total = prompt_len + generated
    expected = _reference_mask(parsed, total, prompt_len)
    positions = np.arange(total)
    assert parsed.mask(positions, prompt_len).tolist() == expected
    order = list(range(total))
    rng.shuffle(order)
    cut = rng.randint(0, total)
    for chunk in (order[:cut], order[cut:]):     # chunked prefill / preemption see arbitrary subsets
        chunk = np.array(chunk, dtype=np.int64)
        assert parsed.mask(chunk, prompt_len).tolist() == [expected[i] for i in chunk]


@QUICK
@given(st.from_regex(r"\A[fl+0-9a-z ]{0,12}\Z"))
def test_near_miss_specs(text):
    try:
        parsed = parse_positions(text)
    except ValueError:
        return
    assert parsed.kind in ("all", "prompt", "generated") or parsed.first > 0 or parsed.last > 0


# ----- format readers ---------------------------------------------------------------------------
def _only_format_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except InterventionFormatError as exc:
        assert str(exc)
        return None


@pytest.fixture(scope="module")
def good_native(tmp_path_factory) -> Path:
    return save_native(random_loreft(77), tmp_path_factory.mktemp("fuzz") / "good")


@QUICK
@given(meta=st.binary(max_size=2048), weights=st.binary(max_size=2048))
def test_native_reader_on_random_bytes(meta, weights):
    with tempfile.TemporaryDirectory() as d:
        Path(d, "intervention.json").write_bytes(meta)
        Path(d, "weights.safetensors").write_bytes(weights)
        _only_format_errors(read_native, d)


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           _containers, max_leaves=12)
_META_KEYS = ["format", "format_version", "hidden_size", "scale", "positions", "dtype", "edits"]
_EDIT_KEYS = ["family", "placement", "config", "params"]


@QUICK
@given(data=st.data())
def test_native_reader_on_mutated_metadata(good_native, data):
    """A valid file with one field (top level, edit, or placement) replaced by any JSON value."""
    meta = json.loads((good_native / "intervention.json").read_text())
    where = data.draw(st.sampled_from(["top", "edit", "placement", "param"]))
    value = data.draw(json_values)
    if where == "top":
        meta[data.draw(st.sampled_from(_META_KEYS))] = value
    elif where == "edit":
        meta["edits"][0][data.draw(st.sampled_from(_EDIT_KEYS))] = value
    elif where == "placement":
        meta["edits"][0]["placement"][data.draw(st.sampled_from(["layer", "component", "head"]))] = value
    else:
        meta["edits"][0]["params"]["weight"] = value
    with tempfile.TemporaryDirectory() as d:
        Path(d, "intervention.json").write_text(json.dumps(meta))
        Path(d, "weights.safetensors").write_bytes((good_native / "weights.safetensors").read_bytes())
        iv = _only_format_errors(read_native, d)
        if iv is not None:
            _only_format_errors(validate_intervention, iv, hidden_size=576, num_layers=30, max_rank=8)


@QUICK
@given(header=json_values, data=st.binary(max_size=256), declared=st.integers(0, 2**64 - 1) | st.none())
def test_safetensors_reader_on_hostile_headers(header, data, declared):
    raw = json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "weights.safetensors")
        path.write_bytes(struct.pack("<Q", length) + raw + data)
        _only_format_errors(load_safetensors, path)


def _library_dir(case: str) -> Path:
    return FIXTURES / "cases" / case / "save"


@QUICK
@given(case=st.sampled_from(["pyreft_loreft_smollm", "pyreft_direft_smollm", "pyvene_addition_smollm",
                             "pyvene_subtraction_smollm"]),
       mode=st.sampled_from(["config-bytes", "config-json", "bin-bytes", "bin-state"]), data=st.data())
def test_pyreft_and_pyvene_readers_on_random_input(case, mode, data):
    source = _library_dir(case)
    with tempfile.TemporaryDirectory() as d:
        target = Path(d, "save")
        target.mkdir()
        config = json.loads((source / "config.json").read_text())
        bins = sorted(source.glob("intkey_*.bin"))
        for b in bins:
            (target / b.name).write_bytes(b.read_bytes())
        if mode == "config-bytes":
            (target / "config.json").write_bytes(data.draw(st.binary(max_size=1024)))
        else:
            if mode == "config-json":
                key = data.draw(st.sampled_from(sorted(config)))
                config[key] = data.draw(json_values)
            (target / "config.json").write_text(json.dumps(config))
        if mode == "bin-bytes":
            (target / bins[0].name).write_bytes(data.draw(st.binary(max_size=1024)))
        elif mode == "bin-state":
            state = torch.load(bins[0], weights_only=True)
            key = data.draw(st.sampled_from(sorted(state)))
            shape = data.draw(st.lists(st.integers(0, 700), min_size=0, max_size=3))
            assume(int(np.prod(shape)) < 500_000)
            state[key] = data.draw(st.sampled_from([torch.zeros(shape), torch.full(shape, float("nan")),
                                                    torch.zeros(shape, dtype=torch.int64), 3, "text", None]))
            torch.save(state, target / bins[0].name)
        _only_format_errors(load_intervention, target, allowed_dirs=[d], hidden_size=576, num_layers=30,
                            num_heads=9, max_rank=8)
