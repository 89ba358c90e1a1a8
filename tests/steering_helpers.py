"""Build small random interventions for the default model and talk to a live server about them."""
from __future__ import annotations

from pathlib import Path

import httpx
import torch

from steer_serve.formats.native import save_native
from steer_serve.interventions.base import Edit, Intervention, Placement

HIDDEN = 576


def random_loreft(seed: int, layer: int = 15, rank: int = 4, strength: float = 3.0,
                  component: str = "block_output", positions: str = "all", width: int = HIDDEN,
                  head: int | None = None, num_heads: int | None = None) -> Intervention:
    """A LoReFT with orthonormal R and a source strong enough to change greedy text, on a component
    ``width`` columns wide (or one head of it: ``head_<component>`` with ``head``/``num_heads``)."""
    gen = torch.Generator().manual_seed(seed)
    cols = width // num_heads if head is not None else width
    rotate, _ = torch.linalg.qr(torch.randn(cols, rank, generator=gen))
    params = {"rotate_layer": rotate.contiguous(),
              "weight": torch.randn(rank, cols, generator=gen) * strength / cols ** 0.5,
              "bias": torch.randn(rank, generator=gen) * strength}
    config = {} if head is None else {"head": head, "head_dim": cols, "num_heads": num_heads}
    edit = Edit("loreft", Placement(layer, component, head), params, config,
                width=width if width != HIDDEN else None)
    return Intervention([edit], HIDDEN, positions=positions)


def hook_hf_module(module: torch.nn.Module, where: str, edit_fn, columns: tuple[int, int] | None = None):
    """Hook ``edit_fn`` on a transformers module where pyvene hooks a component: its ``"output"``
    (the first element of a tuple; only ``columns`` of it for a fused QKV projection) or its
    ``"input"`` (the ``hidden_states`` keyword, else the first positional argument)."""
    if where == "input":
        def pre_hook(m, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": edit_fn(kwargs["hidden_states"])}
            return (edit_fn(args[0]), *args[1:]), kwargs
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def edit_output(out):
        if columns is None:
            return edit_fn(out)
        out = out.clone()
        out[..., columns[0]:columns[1]] = edit_fn(out[..., columns[0]:columns[1]])
        return out

    def hook(m, args, out):
        return (edit_output(out[0]), *out[1:]) if isinstance(out, tuple) else edit_output(out)
    return module.register_forward_hook(hook)


def random_vector(seed: int, layer: int, component: str, strength: float = 4.0) -> Intervention:
    gen = torch.Generator().manual_seed(seed)
    params = {"vector": torch.randn(HIDDEN, generator=gen) * strength}
    return Intervention([Edit("steering_vector", Placement(layer, component), params)], HIDDEN)


def register(client: httpx.Client, directory: Path, name: str, iv: Intervention, **fields) -> dict:
    """Save ``iv`` natively under ``directory/name`` and register it on the server as ``name``."""
    target = directory / name
    if not target.exists():
        save_native(iv, target)
    response = client.post("/v1/interventions", json={"id": name, "source": str(target), **fields})
    assert response.status_code in (201, 409), response.text
    return response.json()


def complete(client: httpx.Client, prompt, max_tokens: int = 24, **fields) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tokens(body: dict) -> list[int]:
    return body["choices"][0]["token_ids"]
