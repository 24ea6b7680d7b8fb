"""Load test of ``consistentee serve`` on loopback.

Starts the server in a subprocess on 127.0.0.1 (a free port), sends ``--requests`` single-text requests
(rt-snippets test texts, cycled) from ``--concurrency`` concurrent clients, stops by itself after
``--max-seconds`` even if not done, then compares every answer with offline predictions of the same texts
(same model, rule, knob and max length), stops the server with SIGTERM and reports errors, mismatches,
latency p50/p99, throughput and the server's micro-batching counters. Results: ``--out``/results.json and
results.md.

    python benchmarks/server/load_test.py --model runs/rt-minilm --rule entropy --knob 0.2 \\
        --requests 5000 --concurrency 32 --out benchmarks/server/results/rt-minilm-entropy
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
import common  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "consistentee.cli.serve", "--model", args.model, "--rule", args.rule,
        "--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--log-level", "warning",
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-length", str(args.max_length), "--truncation", "--request-timeout-s", str(args.request_timeout_s),
    ]
    for flag, value in (("--knob", args.knob), ("--threads", args.server_threads),
                        ("--policy-model-dir", args.policy_model_dir), ("--learned-heads", args.learned_heads)):
        if value is not None:
            command += [flag, str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("server:", " ".join(shlex.quote(c) for c in command), flush=True)
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def server_log(process: subprocess.Popen) -> str:
    log = process.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read()[-2000:]


def wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {server_log(process)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:g} s")


async def fire(url: str, texts: list[str], concurrency: int, max_seconds: float) -> dict:
    import httpx

    results: list[dict | None] = [None] * len(texts)
    next_index = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(texts) and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", json={"text": texts[i]})
                    elapsed = time.perf_counter() - start
                    body = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else None
                    results[i] = {"status": response.status_code, "latency": elapsed,
                                  "prediction": (body or {}).get("predictions", [None])[0]
                                  if response.status_code == 200 else None,
                                  "error": None if response.status_code == 200 else (body or {}).get("error")}
                except httpx.HTTPError as exc:
                    results[i] = {"status": type(exc).__name__, "latency": time.perf_counter() - start,
                                  "prediction": None, "error": str(exc)[:200]}

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    return {"results": results, "wall": wall, "metrics": metrics}


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(args: argparse.Namespace) -> dict:
    split = common.load_split(args)
    pool = list(split.texts)
    texts = [pool[i % len(pool)] for i in range(args.requests)]
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, port)
    try:
        wait_ready(process, url, args.startup_timeout)
        print(f"server ready on {url}; {args.requests} requests at concurrency {args.concurrency} "
              f"(stops after {args.max_seconds:g} s)", flush=True)
        fired = asyncio.run(fire(url, texts, args.concurrency, args.max_seconds))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    exit_status = process.returncode

    done = [(i, r) for i, r in enumerate(fired["results"]) if r is not None]
    ok = [(i, r) for i, r in done if r["status"] == 200]
    statuses = Counter(str(r["status"]) for _, r in done)
    latencies = [r["latency"] for _, r in ok]

    predictor = common.load_predictor(args)
    unique = sorted({texts[i] for i, _ in ok})
    offline = dict(zip(unique, predictor.predict(unique, batch_size=32, max_length=args.max_length,
                                                 truncation=True), strict=True))
    label_mismatch = sum(r["prediction"]["label"] != offline[texts[i]]["label"] for i, r in ok)
    exit_mismatch = sum(r["prediction"]["exit_layer"] != offline[texts[i]]["exit_layer"] for i, r in ok)
    metrics = fired["metrics"]
    batches = _metric(metrics, "consistentee_batches_total")
    report = {
        "environment": common.environment(),
        "settings": {k: v for k, v in vars(args).items()},
        "requests_planned": args.requests,
        "requests_sent": len(done),
        "stopped_by_time_limit": len(done) < args.requests,
        "succeeded": len(ok),
        "statuses": dict(statuses),
        "error_examples": sorted({str(r["error"]) for _, r in done if r["status"] != 200})[:5],
        "label_mismatches": label_mismatch,
        "exit_layer_mismatches": exit_mismatch,
        "latency_p50_ms": 1000 * common.percentile(latencies, 50),
        "latency_p99_ms": 1000 * common.percentile(latencies, 99),
        "latency_mean_ms": 1000 * statistics.mean(latencies) if latencies else None,
        "throughput_rps": len(ok) / fired["wall"] if fired["wall"] > 0 else None,
        "wall_seconds": fired["wall"],
        "mean_exit_layer": statistics.mean(r["prediction"]["exit_layer"] for _, r in ok) if ok else None,
        "server_batches": batches,
        "server_engine_calls": _metric(metrics, "consistentee_engine_calls_total"),
        "mean_items_per_batch": (_metric(metrics, "consistentee_batch_items_sum") or 0) / batches if batches else None,
        "server_exit_status": exit_status,
    }
    return report


def to_markdown(report: dict) -> str:
    s = report["settings"]
    return "\n".join([
        "# Server load test", "",
        f"Command: `{report['environment']['command']}`", "",
        f"Machine: {report['environment']['platform']}, {report['environment']['cpu_count']} CPUs, load average "
        f"at end {report['environment']['load_average']}. Server: `{s['model']}`, rule {s['rule']} knob {s['knob']}, "
        f"device {s['device']}, max batch {s['max_batch_size']}, max wait {s['max_wait_ms']} ms, server threads "
        f"{s['server_threads']}; client and server share the machine.", "",
        "| requests sent / planned | ok | statuses | label / exit mismatches vs offline | p50 ms | p99 ms "
        "| throughput req/s | mean exit | batches (mean size) |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
        f"| {report['requests_sent']} / {report['requests_planned']} | {report['succeeded']} | {report['statuses']} "
        f"| {report['label_mismatches']} / {report['exit_layer_mismatches']} | {report['latency_p50_ms']:.1f} "
        f"| {report['latency_p99_ms']:.1f} | {report['throughput_rps']:.1f} | "
        f"{report['mean_exit_layer'] if report['mean_exit_layer'] is None else round(report['mean_exit_layer'], 3)} "
        f"| {report['server_batches']} ({report['mean_items_per_batch'] or 0:.1f}) |",
        "", f"Stopped by the time limit: {report['stopped_by_time_limit']}. Error examples: "
        f"{report['error_examples'] or 'none'}. Server exit status after SIGTERM: {report['server_exit_status']}.", "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_options(parser)
    parser.add_argument("--requests", type=int, default=5000, help="requests to send (one text each)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server")
    parser.add_argument("--max-batch-size", type=int, default=32, help="server micro-batch size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server micro-batch wait")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (server and offline)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="server request timeout")
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the offline predictions")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (server and offline)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument("--out", required=True, help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency and --max-seconds must be positive")
    return args


def main(argv=None) -> int:
    common.offline()
    args = parse_args(argv)
    report = run(args)
    print(to_markdown(report))
    common.write_results(args.out, report, to_markdown(report))
    return 0 if report["succeeded"] == report["requests_sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
