"""``consistentee serve``: an HTTP server for early-exit prediction (FastAPI + uvicorn).

POST /predict {"texts": [...]} or {"text": "..."} (pairs: "text_pairs"/"text_pair"), GET /health,
GET /metrics (Prometheus text format). Requests arriving together are micro-batched into one engine call.
Binds 127.0.0.1 unless --host says otherwise. SIGTERM/Ctrl-C answer the requests already received, then stop.
"""

from __future__ import annotations

import argparse
import sys

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.cli.predict import add_model_options, add_verb, predictor_from_args, standalone_main
from consistentee.serving.app import ServerConfig

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
    add_dataclass_options(parser.add_argument_group("batching and limits"), ServerConfig)


def add_parser(verbs) -> argparse.ArgumentParser:
    return add_verb(verbs, "serve", "HTTP server for early-exit prediction", __doc__, configure)


def build_app(args: argparse.Namespace):
    """The predictor and the FastAPI app the options describe."""
    import torch

    from consistentee.serving.app import create_app

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    config = dataclass_from_args(ServerConfig, args)
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return create_app(predictor_from_args(args), config, model_name=str(args.model)), config


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, config = build_app(args)
    if args.host not in LOOPBACK:
        print(f"consistentee serve: warning: binding {args.host}, reachable from other machines; "
              "the server has no authentication", file=sys.stderr)
    graceful = args.graceful_timeout if args.graceful_timeout is not None else config.request_timeout_s + 5
    print(f"consistentee serve: {args.model} ({app.state.predictor.rule!r}) on http://{args.host}:{args.port} "
          "(POST /predict, GET /health, GET /metrics)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=graceful, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m consistentee.cli.serve``), same options as the verb."""
    return standalone_main("consistentee serve", __doc__, configure, run, argv)


if __name__ == "__main__":
    sys.exit(main())
