"""HTTP serving of early-exit prediction (FastAPI + uvicorn) with dynamic micro-batching.

:class:`ServerConfig` is importable without FastAPI; the rest is imported on first use."""

from consistentee.serving.config import API_KEY_ENV, ServerConfig

__all__ = ["API_KEY_ENV", "MicroBatcher", "RequestError", "ServerConfig", "create_app", "parse_request"]

_APP = ("MicroBatcher", "RequestError", "create_app", "parse_request")


def __getattr__(name: str):
    if name in _APP:
        from consistentee.serving import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
