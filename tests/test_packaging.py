"""Packaging: the kernels/ folder must not shadow Hugging Face's ``kernels`` (docs/architecture.md)."""
from __future__ import annotations

import subprocess
import sys

from live_server import FIXTURES, REPO


def test_kernels_folder_is_installed_as_steer_serve_kernels_only(tmp_path):
    script = f"""
import importlib.util, torch
import steer_serve.kernels as k
assert k.__file__.endswith("kernels/__init__.py"), k.__file__
assert importlib.util.find_spec("kernels") is None, "a top-level 'kernels' module is importable"
from transformers.utils import is_kernels_available
assert not is_kernels_available()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(FIXTURES / "tiny_llama")!r})
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
assert out.shape == (1, 7)
print("ok")
"""
    # run from an unrelated directory so the repo root (which holds kernels/) is not on sys.path
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_cli_help_documents_serve_flags():
    run = subprocess.run([sys.executable, "-m", "steer_serve.cli", "serve", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0
    for flag in ("--model", "--host", "--port", "--dtype", "--max-model-len", "--max-interventions",
                 "--allowed-intervention-dir", "--api-key", "--admin-api-key"):
        assert flag in run.stdout
