"""PEFT's prompt-space methods, served as virtual-token embeddings prepended to a request's prompt.

Prompt tuning, P-tuning and multitask prompt tuning prepend ``num_virtual_tokens`` trained embeddings
to the embedded prompt (``PeftModelForCausalLM``, ``get_prompt``); what ``save_pretrained`` writes
(``peft/utils/save_and_load.py``, ``tuners_utils``) is what a reloaded model prepends:

* prompt tuning: ``prompt_embeddings`` (n×d), as is;
* P-tuning: ``prompt_embeddings`` is already the prompt encoder's output — peft runs the encoder when it
  saves (``get_prompt_embedding_to_save``), and a reloaded model (inference mode) prepends the saved
  tensor without an encoder;
* multitask prompt tuning: ``prompt_embeddings ⊙ (prefix_task_cols[t] @ prefix_task_rows[t])`` for the
  task ``t`` a request would pass as ``task_ids``: the task is chosen at registration (``task_id``).

Each is converted once into its n×d virtual tokens and kept as a prompt-tuning directory the server
owns (``adapter_config.json`` + ``adapter_model.safetensors``), so a restart reads it back as saved.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import write_directory
from .errors import InterventionFormatError
from .sources import load_safetensors, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: peft_type → the source format steer-serve names it by.
PEFT_TYPES = {"PROMPT_TUNING": "peft_prompt_tuning", "P_TUNING": "peft_p_tuning",
              "MULTITASK_PROMPT_TUNING": "peft_multitask_prompt_tuning"}


@dataclass
class PromptAdapter:
    """Virtual tokens to prepend (n×d, float32) and the owned directory that holds them."""

    path: Path
    virtual_tokens: torch.Tensor
    source_format: str
    content_hash: str
    task_id: int | None = None

    def describe(self) -> dict:
        n, d = self.virtual_tokens.shape
        return {"families": [self.source_format], "num_virtual_tokens": n, "hidden_size": d,
                "num_parameters": n * d, "source_format": self.source_format, "task_id": self.task_id}


def prompt_format(directory: str | os.PathLike) -> str | None:
    """``peft_prompt_tuning`` / ``peft_p_tuning`` / ``peft_multitask_prompt_tuning`` for such a PEFT
    directory, else None."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        return None
    config = read_json(config_path)
    return PEFT_TYPES.get(str(config.get("peft_type", "")).upper()) if isinstance(config, dict) else None


def _fail(message: str, param: str) -> None:
    raise InterventionFormatError(message, param=param, code="invalid_peft_prompt")


def _tensor(weights: dict[str, torch.Tensor], key: str, dims: int) -> torch.Tensor:
    tensor = weights.get(key)
    if tensor is None or tensor.dim() != dims or not tensor.is_floating_point():
        _fail(f"the adapter needs a floating-point {dims}-D {key!r}; it holds {sorted(weights)}", key)
    return tensor.float()


def virtual_tokens(config: dict, weights: dict[str, torch.Tensor], task_id: int | None) -> torch.Tensor:
    """The n×d embeddings peft prepends, from a saved config and state dict."""
    peft_type = str(config.get("peft_type", "")).upper()
    if config.get("num_transformer_submodules", 1) != 1:
        _fail("num_transformer_submodules ≠ 1 (an encoder-decoder model's prompt) is not supported",
              "num_transformer_submodules")
    prompt = _tensor(weights, "prompt_embeddings", 2)
    if peft_type != "MULTITASK_PROMPT_TUNING":
        if task_id is not None:
            _fail(f"task_id is only for multitask prompt tuning, not {peft_type}", "task_id")
        return prompt
    cols, rows = _tensor(weights, "prefix_task_cols", 3), _tensor(weights, "prefix_task_rows", 3)
    if task_id is None or not 0 <= task_id < cols.shape[0]:
        _fail(f"multitask prompt tuning needs task_id in [0, {cols.shape[0]}) at registration (the task a "
              f"request would pass as peft's task_ids); got {task_id!r}", "task_id")
    if cols.shape[1:2] != prompt.shape[:1] or rows.shape[2:] != prompt.shape[1:] or cols.shape[2] != rows.shape[1]:
        _fail(f"prefix_task_cols {list(cols.shape)} and prefix_task_rows {list(rows.shape)} do not fit "
              f"prompt_embeddings {list(prompt.shape)}", "prefix_task_cols")
    return prompt * (cols[task_id] @ rows[task_id])


def load_prompt_adapter(directory: str | os.PathLike, dest_root: str | os.PathLike, *, hidden_size: int,
                        task_id: int | None = None, max_virtual_tokens: int = 512) -> PromptAdapter:
    """Read a prompt-space PEFT directory and write the owned prompt-tuning copy under ``dest_root``."""
    directory = Path(directory)
    fmt = prompt_format(directory)
    if fmt is None:
        _fail(f"{directory.name} is not a PEFT prompt tuning / P-tuning / multitask prompt tuning directory",
              "source")
    config = read_json(directory / CONFIG_FILE)
    if not (directory / WEIGHTS_FILE).is_file():
        raise InterventionFormatError(f"{directory.name} has {CONFIG_FILE} but no {WEIGHTS_FILE}", param="source",
                                      code="missing_file")
    tokens = virtual_tokens(config, load_safetensors(directory / WEIGHTS_FILE), task_id).contiguous()
    n, d = tokens.shape
    if d != hidden_size:
        _fail(f"the virtual tokens are {d} wide, this server's model embeds tokens in {hidden_size}", "token_dim")
    if not 0 < n <= max_virtual_tokens:
        _fail(f"{n} virtual tokens; between 1 and {max_virtual_tokens} are served", "num_virtual_tokens")
    if not torch.isfinite(tokens).all():
        raise InterventionFormatError("the virtual tokens hold NaN or Inf", param="prompt_embeddings",
                                      code="non_finite")
    digest = hashlib.sha256(tokens.numpy().tobytes() + f"{n}x{d}".encode()).hexdigest()[:32]
    target = Path(dest_root) / digest
    if not target.exists():
        owned = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n, "token_dim": d,
                 "num_transformer_submodules": 1, "base_model_name_or_path": config.get("base_model_name_or_path")}

        def fill(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(json.dumps(owned, indent=2))
            save_file({"prompt_embeddings": tokens}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

        write_directory(target, fill, overwrite=True)
    return PromptAdapter(target, tokens, fmt, digest, task_id)
