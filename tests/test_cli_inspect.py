"""``steer-serve inspect`` describes every directory that registration accepts."""
from __future__ import annotations

import json

import pytest

from fixture_cases import DATA
from steer_serve.cli import main

ZERO = DATA / "cases" / "pyvene_zero_tiny" / "save"  # ZeroIntervention: config only, no tensor to tell the width


def test_inspect_without_a_width_names_the_flags(capsys):
    with pytest.raises(SystemExit, match="hidden_size"):
        main(["inspect", str(ZERO)])


@pytest.mark.parametrize("flags", [["--hidden-size", "64"], ["--model", str(DATA / "tiny_llama")]])
def test_inspect_takes_the_width_from_a_flag_or_the_model_config(capsys, flags):
    main(["inspect", str(ZERO), "--json", *flags])
    summary = json.loads(capsys.readouterr().out)
    assert summary["hidden_size"] == 64 and summary["families"] == ["zero"]
    assert summary["edits"][0]["config"]["width"] == 64


def test_inspect_checks_the_model_it_is_given(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 1}))
    with pytest.raises(SystemExit, match="layer 1"):
        main(["inspect", str(ZERO), "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="config.json"):
        main(["inspect", str(ZERO), "--model", str(tmp_path / "missing")])
