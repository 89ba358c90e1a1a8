"""Bearer-token auth: ``--api-key`` guards ``/v1/*``, ``--admin-api-key`` guards intervention changes."""
from __future__ import annotations

import hmac

from fastapi import Request

from steer_serve.api.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, key: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


async def require_api_key(request: Request) -> None:
    """401 unless the request carries the API key (or the admin key); no-op when none is set."""
    state = request.app.state.steer
    keys = [k for k in (state.api_key, state.admin_api_key) if k]
    if not state.api_key:
        return
    token = _bearer(request)
    if not any(_matches(token, k) for k in keys):
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def require_admin_key(request: Request) -> None:
    """For intervention management: 401 without a key, 403 with a key that is not the admin key."""
    state = request.app.state.steer
    await require_api_key(request)
    if not state.admin_api_key:
        return
    token = _bearer(request)
    if token is None:
        raise APIError(401, "Intervention management needs the admin API key.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not _matches(token, state.admin_api_key):
        raise APIError(403, "This key may not manage interventions; use the admin API key.",
                       code="insufficient_permissions")
