"""Build small random interventions for the default model and talk to a live server about them."""
from __future__ import annotations

from pathlib import Path

import httpx
import torch

from steer_serve.formats.native import save_native
from steer_serve.interventions.base import Edit, Intervention, Placement

HIDDEN = 576


def random_loreft(seed: int, layer: int = 15, rank: int = 4, strength: float = 3.0,
                  component: str = "block_output", positions: str = "all") -> Intervention:
    """A LoReFT with orthonormal R and a source strong enough to change greedy text."""
    gen = torch.Generator().manual_seed(seed)
    rotate, _ = torch.linalg.qr(torch.randn(HIDDEN, rank, generator=gen))
    params = {"rotate_layer": rotate.contiguous(),
              "weight": torch.randn(rank, HIDDEN, generator=gen) * strength / HIDDEN ** 0.5,
              "bias": torch.randn(rank, generator=gen) * strength}
    return Intervention([Edit("loreft", Placement(layer, component), params)], HIDDEN, positions=positions)


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
