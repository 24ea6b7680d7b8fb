"""``consistentee serve``: an HTTP server for early-exit prediction (FastAPI + uvicorn).

POST /predict {"texts": [...]} or {"text": "..."} (pairs: "text_pairs"/"text_pair"), GET /health,
GET /metrics (Prometheus text format). Requests arriving together are micro-batched into one engine call.
Binds 127.0.0.1 unless --host says otherwise; the port is claimed before the model loads, so a port in use
fails at once. Optional bearer-token auth: --api-key or the CONSISTENTEE_API_KEY environment variable (better:
not visible in `ps`); then every path but /health needs "Authorization: Bearer <key>". Binding a non-loopback
host requires a key unless --allow-unauthenticated is given. Without --rule/--knob the model's stored operating
point is served (and said so). SIGTERM/Ctrl-C answer the requests already received, then stop.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.cli.predict import (
    add_model_options,
    add_verb,
    check_model_options,
    predictor_from_args,
    standalone_main,
)
from consistentee.serving.config import API_KEY_ENV, ServerConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (without the common ones)."""
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--graceful-timeout", type=float, default=None,
                        help="seconds to finish in-flight requests at shutdown (default: request timeout + 5)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} when set; the variable "
                             "keeps the key out of the process list)%(default).0s")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve a non-loopback --host without an API key (anyone who reaches it can use it)%(default).0s")
    add_dataclass_options(parser.add_argument_group("batching and limits"), ServerConfig)


def add_parser(verbs) -> argparse.ArgumentParser:
    return add_verb(verbs, "serve", "HTTP server for early-exit prediction", __doc__, configure)


def api_key_from(args: argparse.Namespace) -> str | None:
    """``--api-key``, else the environment variable; None when neither is set."""
    key = getattr(args, "api_key", None)
    if key is None:
        key = os.environ.get(API_KEY_ENV) or None
    if key is not None and not key.strip():
        raise ValueError("--api-key is empty")
    return key


def check_options(args: argparse.Namespace) -> tuple[ServerConfig, str | None]:
    """Every serve option that can be checked before loading the model: limits, port, threads, auth."""
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "graceful_timeout", None) is not None and not args.graceful_timeout >= 0:
        raise ValueError(f"--graceful-timeout must be >= 0, got {args.graceful_timeout}")
    config = dataclass_from_args(ServerConfig, args)
    key = api_key_from(args)
    if key is None and args.host not in LOOPBACK and not getattr(args, "allow_unauthenticated", False):
        raise ValueError(f"--host {args.host} is reachable from other machines: set an API key (--api-key or "
                         f"${API_KEY_ENV}) or pass --allow-unauthenticated")
    check_model_options(args)
    return config, key


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, claimed now: a port in use is an error before anything else."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def build_app(args: argparse.Namespace, log=None):
    """The predictor and the FastAPI app the options describe."""
    import torch

    from consistentee.serving.app import create_app

    config, key = check_options(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    predictor = predictor_from_args(args, log=log)
    return create_app(predictor, config, model_name=str(args.model), api_key=key), config


def run(args: argparse.Namespace) -> int:
    check_options(args)  # before the port and the model: option errors come first
    sock = bind(args.host, args.port)
    try:
        import uvicorn

        from consistentee.serving.app import uvicorn_options

        app, config = build_app(args)
        host, port = sock.getsockname()[:2]
        if args.host not in LOOPBACK and app.state.auth == "none":
            print(f"consistentee serve: warning: binding {args.host}, reachable from other machines, without "
                  "authentication (--allow-unauthenticated)", file=sys.stderr)
        graceful = args.graceful_timeout if args.graceful_timeout is not None else config.request_timeout_s + 5
        print(f"consistentee serve: {args.model} ({app.state.predictor.rule!r}) listening on "
              f"http://{args.host}:{port} (POST /predict, GET /health, GET /metrics"
              f"{'; bearer token required' if app.state.auth == 'bearer' else ''})", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=graceful,
                                               access_log=False, **uvicorn_options(config)))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m consistentee.cli.serve``), same options as the verb."""
    return standalone_main("consistentee serve", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
