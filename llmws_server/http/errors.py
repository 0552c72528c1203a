"""A refusal with an HTTP status, as the HTTP front ends send it."""
from llmws_server.errors import Refused


class APIError(Refused):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", **fields: object):
        super().__init__(message, param, **fields)
        self.param, self.status, self.kind = param, status, kind
        self.headers: dict[str, str] = {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None, **self.fields}}
