"""HTTP serving of early-exit prediction (FastAPI + uvicorn) with dynamic micro-batching."""

from consistentee.serving.app import MicroBatcher, RequestError, ServerConfig, create_app, parse_request

__all__ = ["MicroBatcher", "RequestError", "ServerConfig", "create_app", "parse_request"]
