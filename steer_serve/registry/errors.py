"""The registry's error: a message, a machine-readable ``code`` and the request field it concerns.

HTTP statuses are the API's business (``steer_serve.api.errors`` maps codes to them).
"""
from __future__ import annotations


class RegistryError(Exception):
    """A registry request that cannot be honoured (``code``: ``invalid_request``, ``conflict``,
    ``intervention_not_found``, ``registry_write_failed``, ...)."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def not_found(intervention_id: str) -> RegistryError:
    return RegistryError(f"The intervention `{intervention_id}` does not exist.", code="intervention_not_found",
                         param="intervention")
