"""The prompt-index, prompt-slice and generation-step positions, served: equal under chunked prefill
(``small_server`` steps 32 tokens) to the unchunked server, and equal to transformers with the edit
hooked on the block's output at exactly those absolute positions."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from steering_helpers import complete, random_vector, register, tokens
from steer_serve.interventions.positions import parse_positions

LAYER = 10
#: 67 prompt tokens: three chunks (32 + 32 + 3) on the small server.
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lantern and a "
        "notebook in which he recorded the ships he saw, the colour of the sea, and the birds that nested on the "
        "rocks below. One stormy night in November, a small boat with a torn red sail appeared near the reef, and "
        "he realised that")
NEW_TOKENS = 12
SPECS = ["-1", "-40:-10", ":-60", "g0:4", "g3:", "g1:2"]


@pytest.fixture(scope="module")
def prompt():
    from transformers import AutoTokenizer

    from steer_serve.model import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())(TEXT)["input_ids"]


@pytest.fixture(scope="module")
def clients(server, small_server, intervention_dir):
    iv = random_vector(71, LAYER, "block_output", strength=12.0)
    with httpx.Client(base_url=server.url, timeout=300) as big, httpx.Client(base_url=small_server.url,
                                                                              timeout=600) as small:
        for client in (big, small):
            register(client, intervention_dir, "positions-vector", iv)
        yield big, small, iv.edits[0].params["vector"]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from steer_serve.model import prepare_default_model

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model, prompt, vector, spec: str | None, mask_of=None) -> list[int]:
    """Greedy tokens with ``vector`` added to block ``LAYER``'s output at the spec's absolute positions
    (or where ``mask_of(positions)`` says): the prefill forward holds positions 0..P-1, the n-th decode
    forward position P+n-1."""
    calls = []

    def hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        start = 0 if not calls else len(prompt) + len(calls) - 1
        calls.append(start)
        positions = np.arange(start, start + h.shape[1])
        mask = mask_of(positions) if mask_of else parse_positions(spec).mask(positions, len(prompt))
        h = h + torch.from_numpy(mask.astype(np.float32))[None, :, None] * vector
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[LAYER].register_forward_hook(hook) if spec else None
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    finally:
        if handle:
            handle.remove()
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def plain(hf_model, prompt):
    return hf_greedy(hf_model, prompt, None, None)


@pytest.mark.parametrize("spec", SPECS)
def test_positions_chunked_equal_unchunked_and_transformers(clients, hf_model, prompt, plain, spec):
    big, small, vector = clients
    assert len(prompt) > 64
    fields = {"interventions": [{"id": "positions-vector", "positions": spec}], "ignore_eos": True}
    expected = hf_greedy(hf_model, prompt, vector, spec)
    assert expected != plain, "the edit must change the greedy tokens"
    assert tokens(complete(big, prompt, NEW_TOKENS, **fields)) == expected
    assert tokens(complete(small, prompt, NEW_TOKENS, **fields)) == expected


@pytest.mark.parametrize("where, span", [("prompt", None), ("prompt", 5), ("generated", None)])
def test_token_triggers_chunked_equal_unchunked_and_transformers(clients, hf_model, prompt, plain, where, span):
    """``t<id>`` / ``t<id>:<n>``: the edit starts after the trigger token's first occurrence — one in the
    prompt's second chunk on the small server, or one the plain answer generates (nothing is edited before
    it, so it is generated as without the edit) — on both servers as in transformers."""
    big, small, vector = clients
    if where == "prompt":
        token = next(t for i, t in enumerate(prompt) if i > 40 and prompt.index(t) == i)
        at = prompt.index(token)
        assert 32 <= at < 64
    else:
        k = next(k for k, t in enumerate(plain) if k >= 2 and t not in prompt and t not in plain[:k])
        token, at = plain[k], len(prompt) + k
    spec = f"t{token}" + ("" if span is None else f":{span}")
    stop = np.iinfo(np.int64).max if span is None else at + 1 + span
    expected = hf_greedy(hf_model, prompt, vector, spec, lambda positions: (positions > at) & (positions < stop))
    assert expected != plain, "the edit must change the greedy tokens"
    fields = {"interventions": [{"id": "positions-vector", "positions": spec}], "ignore_eos": True}
    assert tokens(complete(big, prompt, NEW_TOKENS, **fields)) == expected
    assert tokens(complete(small, prompt, NEW_TOKENS, **fields)) == expected


@pytest.mark.parametrize("spec, first, stop", [("g-4:", 8, None), ("g2:-6", 2, 6)])
def test_steps_counted_back_from_max_tokens(clients, hf_model, prompt, plain, spec, first, stop):
    """A negative generation-step bound counts back from the request's ``max_tokens`` (12): ``g-4:`` the
    last 4 generated tokens, ``g2:-6`` the third to the sixth; chunked or not, as transformers. Without
    ``max_tokens`` (a chat request's default) it is a 400 naming the field."""
    big, small, vector = clients
    lo, hi = len(prompt) + first, len(prompt) + (stop if stop is not None else NEW_TOKENS + 1)
    expected = hf_greedy(hf_model, prompt, vector, spec, lambda positions: (positions >= lo) & (positions < hi))
    assert expected != plain, "the edit must change the greedy tokens"
    fields = {"interventions": [{"id": "positions-vector", "positions": spec}], "ignore_eos": True}
    assert tokens(complete(big, prompt, NEW_TOKENS, **fields)) == expected
    assert tokens(complete(small, prompt, NEW_TOKENS, **fields)) == expected
    response = big.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **fields})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens", response.text
