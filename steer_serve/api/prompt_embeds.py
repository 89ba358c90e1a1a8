"""Prompt-space adapters on a completion: the virtual tokens, then the prompt's own token embeddings,
handed to vLLM as ``prompt_embeds`` (``--enable-prompt-embeds``).

PEFT's ``PeftModelForCausalLM`` embeds the prompt with the model's input embedding and prepends the
virtual tokens; vLLM runs the model from those embeddings, so positions count from the first virtual
token (an intervention's ``f<n>`` starts there, as PEFT's hooks would see it) and a prompt-embeds
request shares prefix-cache blocks only with requests whose embeddings match (vLLM hashes them).
The input embedding is read once from the model directory; text prompts are tokenized as vLLM's
completions do (``add_special_tokens``).
"""
from __future__ import annotations

import base64
import io
import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from steer_serve.api.errors import APIError
from steer_serve.formats.peft_prompt import PromptAdapter

#: Names of the input-embedding weight in the checkpoints of the served architectures.
_EMBEDDING_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
                   "model.decoder.embed_tokens.weight")


class PromptEmbedder:
    """Builds ``prompt_embeds`` for a completion body: virtual tokens + the embedded prompt."""

    def __init__(self, model_path: str, dtype: torch.dtype):
        self.model_path = Path(model_path)
        self.dtype = dtype

    @cached_property
    def embedding(self) -> torch.Tensor:
        index = self.model_path / "model.safetensors.index.json"
        files = (sorted({self.model_path / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [self.model_path / "model.safetensors"])
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                key = next((k for k in _EMBEDDING_KEYS if k in f.keys()), None)
                if key is not None:
                    return f.get_tensor(key).to(self.dtype)
        raise APIError(400, f"cannot find the input embedding ({' / '.join(_EMBEDDING_KEYS)}) in the model "
                       "directory, so prompt-space adapters cannot be served", code="unsupported_model")

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)

    def _token_ids(self, prompt, add_special_tokens: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            return [ids for p in prompt for ids in self._token_ids(p, add_special_tokens)]
        raise APIError(400, "a prompt-space adapter needs a non-empty prompt", code="invalid_value", param="prompt")

    def apply(self, body, prompt: PromptAdapter) -> None:
        """Replace ``body.prompt`` by ``prompt_embeds``: one tensor per prompt, virtual tokens first."""
        if getattr(body, "prompt_embeds", None) is not None:
            raise APIError(400, "prompt_embeds cannot be combined with a prompt-space adapter (it prepends its own "
                           "virtual tokens to the prompt's embeddings)", code="unsupported_value",
                           param="prompt_embeds")
        embedding, virtual = self.embedding, prompt.virtual_tokens.to(self.dtype)
        encoded = []
        for ids in self._token_ids(body.prompt, bool(getattr(body, "add_special_tokens", True))):
            if not all(0 <= t < embedding.shape[0] for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {embedding.shape[0]})", code="invalid_value",
                               param="prompt")
            buffer = io.BytesIO()
            torch.save(torch.cat([virtual, embedding[ids]]), buffer)
            encoded.append(base64.b64encode(buffer.getvalue()))
        body.prompt_embeds = encoded if len(encoded) > 1 else encoded[0]
        body.prompt = None
