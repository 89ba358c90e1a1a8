"""The one error type every intervention loader and validator raises."""
from __future__ import annotations


class InterventionFormatError(ValueError):
    """A source could not be read, or what it holds is not a servable intervention.

    ``param`` names what was wrong (a file, a field such as ``hidden_size``, or an edit's
    parameter such as ``edits[2].rotate_layer``); the API reports it as the OpenAI error's
    ``param`` with a 400 status. ``code`` is a short machine-readable reason.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_intervention"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        """The error as an OpenAI-style ``error`` object."""
        return {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
