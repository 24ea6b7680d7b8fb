"""``consistentee serve``: an HTTP server for early-exit prediction (FastAPI + uvicorn).

POST /predict {"texts": [...]} or {"text": "..."} (pairs: "text_pairs"/"text_pair"), GET /health,
GET /metrics (Prometheus text format). Requests arriving together are micro-batched into one engine call.
Binds 127.0.0.1 unless --host says otherwise. SIGTERM/Ctrl-C answer the requests already received, then stop.
"""

from __future__ import annotations

import argparse
import sys

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.cli.predict import PREDICT_RULES
from consistentee.serving.app import ServerConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` options to ``parser`` (without the common ones)."""
    parser.add_argument("--model", required=True,
                        help="a saved model directory (config.json, model.safetensors, tokenizer) or a run directory")
    parser.add_argument("--policy-model-dir", default=None,
                        help="inside a run directory: the model directory to use instead of stage1/model")
    parser.add_argument("--learned-heads", default=None, help="directory of learned exit heads (rule 'learned')")
    parser.add_argument("--rule", default="consistentee", choices=PREDICT_RULES, help="exit rule")
    parser.add_argument("--knob", default=None, help="the rule's knob (omitted: the rule's default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--max-length", type=int, default=None,
                        help="most tokens per text (default: what the model accepts)")
    parser.add_argument("--dtype", default="none", choices=("none", "fp16", "bf16"),
                        help="mixed precision (autocast) for the model")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--graceful-timeout", type=float, default=None,
                        help="seconds to finish in-flight requests at shutdown (default: request timeout + 5)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn log level")
    add_dataclass_options(parser.add_argument_group("batching and limits"), ServerConfig)


def add_parser(verbs) -> argparse.ArgumentParser:
    from consistentee.cli.main import _common, _Formatter

    parser = verbs.add_parser(
        "serve", formatter_class=_Formatter, help="HTTP server for early-exit prediction",
        description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None,
    )
    configure(parser)
    _common(parser)
    return parser


def build_app(args: argparse.Namespace):
    """The predictor and the FastAPI app the options describe (also used by the benchmarks)."""
    import torch

    from consistentee.inference.predictor import EarlyExitPredictor, parse_knob
    from consistentee.serving.app import create_app

    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    config = dataclass_from_args(ServerConfig, args)
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    predictor = EarlyExitPredictor.from_pretrained(
        args.model, rule=args.rule, knob=parse_knob(args.rule, args.knob), device=getattr(args, "device", "auto"),
        learned_heads_dir=args.learned_heads, policy_model_dir=args.policy_model_dir, max_length=args.max_length,
        autocast_dtype=None if args.dtype == "none" else args.dtype,
    )
    return create_app(predictor, config, model_name=str(args.model)), config


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
    parser = argparse.ArgumentParser(prog="consistentee serve", description=__doc__)
    configure(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"consistentee: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
