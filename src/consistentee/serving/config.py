"""The server's limits and batching settings, in a module that imports nothing heavy (the CLI builds its
options from :class:`ServerConfig` before it knows whether it will serve)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["API_KEY_ENV", "ServerConfig"]

#: Environment variable read for the bearer token when ``--api-key`` is not given (keeps it out of ``ps``).
API_KEY_ENV = "CONSISTENTEE_API_KEY"


@dataclass
class ServerConfig:
    """Limits and batching settings of the server (all configurable from ``consistentee serve``)."""

    max_batch_size: int = field(default=32, metadata={"help": "most texts per engine call"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for others to batch with"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted (bytes)"})
    max_items: int = field(default=64, metadata={"help": "most texts in one request"})
    max_text_chars: int = field(default=10_000, metadata={"help": "longest text accepted (characters)"})
    request_timeout_s: float = field(default=30.0, metadata={"help": "a request not answered by then gets 504"})
    max_queue_items: int = field(default=10_000, metadata={"help": "texts waiting beyond this get 503"})
    truncation: bool = field(default=False, metadata={
        "help": "truncate texts longer than the model's max length instead of rejecting them (422)"})
    max_json_depth: int = field(default=8, metadata={
        "help": "deepest JSON nesting accepted in a body (a valid request needs 2); deeper gets 400"})
    body_timeout_s: float = field(default=10.0, metadata={
        "help": "a request body not fully received within this many seconds gets 408 and its connection closed"})
    max_connections: int = field(default=256, metadata={
        "help": "most concurrent connections; beyond it new requests get 503 (slow or idle clients can't "
                "exhaust the server)"})

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_items", "max_text_chars", "max_queue_items",
                     "max_json_depth", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.max_wait_ms >= 0 or not math.isfinite(self.max_wait_ms):
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        for name in ("request_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be > 0, got {value!r}")
