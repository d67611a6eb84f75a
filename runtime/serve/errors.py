"""A request the server cannot honour: an HTTP status and the field to blame (never a 500)."""

from __future__ import annotations


class RequestError(ValueError):
    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the queue is full; retry later")
        self.retry_after = retry_after
