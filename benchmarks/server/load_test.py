"""Load test of ``consistentee serve`` on loopback, checked against offline ``consistentee predict``.

For each configuration (by default the model's ConsistentEE policy rule and the confidence rule on the same
model) this script starts ``consistentee serve`` on 127.0.0.1 (a free port) in a subprocess, sends
``--requests`` requests of 1 to 8 texts each (a seeded draw from a labelled split) from ``--concurrency``
concurrent clients, reads ``/metrics``, stops the server with SIGTERM, then runs ``consistentee predict`` on the
same texts and counts every served answer whose label or exit layer differs from the offline one.

Writes ``--out`` (default ``benchmarks/server/results/load.json``): per configuration ``requests``, ``errors``
(non-200 answers and transport failures), ``mismatches``, ``p50_ms``, ``p99_ms``, ``texts_per_s`` and
details; and ``load.md`` beside it. The exit status is 1 when any request failed or any answer mismatched.

    nice -n 10 .venv/bin/python benchmarks/server/load_test.py \\
        --model runs/trec6-holdout/policies/beta-0.05/model --dataset trec6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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

HERE = Path(__file__).resolve().parent
CONSISTENTEE = [sys.executable, "-m", "consistentee.cli.main"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _rule_flags(rule: str, knob: str | None) -> list[str]:
    return ["--rule", rule] + (["--knob", knob] if knob is not None else [])


def start_server(args: argparse.Namespace, rule: str, knob: str | None, port: int) -> subprocess.Popen:
    command = [*CONSISTENTEE, "serve", "--model", args.model, *_rule_flags(rule, knob), "--host", "127.0.0.1",
               "--port", str(port), "--device", args.device, "--log-level", "warning", "--no-progress",
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--request-timeout-s", str(args.request_timeout_s), "--max-items", "8"]
    if args.server_threads:
        command += ["--threads", str(args.server_threads)]
    print("server:", shlex.join(command), flush=True)
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=log, text=True)
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


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def plan_requests(pool: list[str], n: int, low: int, high: int, seed: int) -> list[list[str]]:
    """``n`` requests of ``low..high`` texts each, drawn with a seed (the same plan for every configuration)."""
    rng = random.Random(seed)
    return [rng.sample(pool, rng.randint(low, high)) for _ in range(n)]


async def fire(url: str, requests: list[list[str]], concurrency: int, max_seconds: float) -> dict:
    import httpx

    results: list[dict | None] = [None] * len(requests)
    next_index = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(requests) and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    response = await client.post("/predict", json={"texts": requests[i]})
                    elapsed = time.perf_counter() - start
                    body = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else None
                    ok = response.status_code == 200
                    results[i] = {"status": response.status_code, "latency": elapsed,
                                  "predictions": (body or {}).get("predictions") if ok else None,
                                  "error": None if ok else (body or {}).get("error")}
                except httpx.HTTPError as exc:
                    results[i] = {"status": type(exc).__name__, "latency": time.perf_counter() - start,
                                  "predictions": None, "error": str(exc)[:200]}

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    return {"results": results, "wall": wall, "metrics": metrics}


def offline_predict(args: argparse.Namespace, rule: str, knob: str | None, texts: list[str]) -> dict[str, dict]:
    """``consistentee predict`` on ``texts`` (JSON lines in and out): text -> its offline answer."""
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "texts.jsonl", Path(tmp) / "offline.jsonl"
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        command = [*CONSISTENTEE, "predict", "--model", args.model, *_rule_flags(rule, knob), "--input", str(source),
                   "--text-column", "text", "--output", str(out), "--device", args.device, "--no-progress",
                   "--batch-size", "32"]
        print("offline:", shlex.join(command), flush=True)
        subprocess.run(command, env=_env(), check=True)
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return dict(zip(texts, rows, strict=True))


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def run_one(args: argparse.Namespace, name: str, rule: str, knob: str | None, requests: list[list[str]]) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, rule, knob, port)
    try:
        wait_ready(process, url, args.startup_timeout)
        print(f"{name}: server ready on {url}; {len(requests)} requests at concurrency {args.concurrency}",
              flush=True)
        fired = asyncio.run(fire(url, requests, args.concurrency, args.max_seconds))
    finally:
        exit_status = stop(process)
    done = [(i, r) for i, r in enumerate(fired["results"]) if r is not None]
    ok = [(i, r) for i, r in done if r["status"] == 200]
    latencies = [r["latency"] for _, r in ok]
    texts_served = sum(len(requests[i]) for i, _ in ok)

    offline = offline_predict(args, rule, knob, sorted({t for i, _ in ok for t in requests[i]}))
    label_mismatches = exit_mismatches = mismatches = 0
    examples = []
    for i, r in ok:
        for text, served in zip(requests[i], r["predictions"], strict=True):
            expected = offline[text]
            label_off = served["label"] != expected["label"]
            exit_off = served["exit_layer"] != expected["exit_layer"]
            label_mismatches += label_off
            exit_mismatches += exit_off
            if label_off or exit_off:
                mismatches += 1
                if len(examples) < 5:
                    examples.append({"text": text, "served": served, "offline": expected})
    metrics = fired["metrics"]
    batches = _metric(metrics, "consistentee_batches_total")
    return {
        "rule": rule,
        "knob": knob,
        "requests": len(done),
        "requests_planned": len(requests),
        "errors": len(done) - len(ok) + (len(requests) - len(done)),
        "mismatches": mismatches,
        "p50_ms": round(1000 * common.percentile(latencies, 50), 2) if latencies else None,
        "p99_ms": round(1000 * common.percentile(latencies, 99), 2) if latencies else None,
        "texts_per_s": round(texts_served / fired["wall"], 1) if fired["wall"] > 0 else None,
        "requests_per_s": round(len(ok) / fired["wall"], 1) if fired["wall"] > 0 else None,
        "texts": texts_served,
        "unique_texts": len(offline),
        "label_mismatches": label_mismatches,
        "exit_layer_mismatches": exit_mismatches,
        "mismatch_examples": examples,
        "statuses": dict(Counter(str(r["status"]) for _, r in done)),
        "error_examples": sorted({str(r["error"]) for _, r in done if r["status"] != 200})[:5],
        "latency_mean_ms": round(1000 * statistics.mean(latencies), 2) if latencies else None,
        "wall_seconds": round(fired["wall"], 2),
        "mean_exit_layer": round(statistics.mean(p["exit_layer"] for _, r in ok for p in r["predictions"]), 3)
        if ok else None,
        "server_batches": batches,
        "server_engine_calls": _metric(metrics, "consistentee_engine_calls_total"),
        "mean_texts_per_batch": round((_metric(metrics, "consistentee_batch_items_sum") or 0) / batches, 2)
        if batches else None,
        "server_client_disconnects": _metric(metrics, "consistentee_client_disconnects_total"),
        "server_exit_status": exit_status,
    }


def to_markdown(report: dict) -> str:
    env = report["environment"]
    s = report["settings"]
    lines = [
        "# Server load test", "",
        f"Command: `{env['command']}`", "",
        f"Model `{s['model']}`; {s['requests']} requests of {s['min_texts']}-{s['max_texts']} texts from "
        f"{s['dataset']} {s['split']} at concurrency {s['concurrency']}; server max batch {s['max_batch_size']}, "
        f"max wait {s['max_wait_ms']} ms, device {s['device']}. Machine: {env['platform']}, {env['cpu_count']} CPUs "
        f"(load average at the end {env['load_average']}); client, server and anything else running share it.", "",
        "| configuration | rule (knob) | requests | errors | mismatches vs offline predict | p50 ms | p99 ms "
        "| texts/s | mean exit layer | texts per micro-batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in report["configurations"]:
        r = report[name]
        lines.append(f"| {name} | {r['rule']} ({r['knob'] if r['knob'] is not None else 'default'}) | {r['requests']} "
                     f"| {r['errors']} | {r['mismatches']} | {r['p50_ms']} | {r['p99_ms']} | {r['texts_per_s']} "
                     f"| {r['mean_exit_layer']} | {r['mean_texts_per_batch']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (or run directory) to serve")
    parser.add_argument("--configs", default="consistentee=consistentee,confidence=confidence",
                        help="NAME=RULE[:KNOB],... served one after the other on the same model")
    parser.add_argument("--dataset", default="trec6", help="built-in dataset or data file the texts come from")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the dataset's splits")
    parser.add_argument("--requests", type=int, default=5000, help="requests per configuration")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--min-texts", type=int, default=1, help="fewest texts per request")
    parser.add_argument("--max-texts", type=int, default=8, help="most texts per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request plan")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server")
    parser.add_argument("--max-batch-size", type=int, default=32, help="server micro-batch size (texts)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server micro-batch wait")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="server request timeout")
    parser.add_argument("--server-threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (server and offline)")
    parser.add_argument("--out", default=str(HERE / "results" / "load.json"), help="the JSON report")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_seconds <= 0:
        parser.error("--requests, --concurrency and --max-seconds must be positive")
    if not 1 <= args.min_texts <= args.max_texts <= 8:
        parser.error("need 1 <= --min-texts <= --max-texts <= 8 (the server takes at most 8 texts per request here)")
    configs = []
    for item in args.configs.split(","):
        name, _, spec = item.partition("=")
        rule, _, knob = spec.partition(":")
        if not name or not rule:
            parser.error(f"--configs: bad item {item!r} (NAME=RULE[:KNOB])")
        configs.append((name, rule, knob or None))
    args.config_list = configs
    return args


def main(argv=None) -> int:
    common.offline()
    args = parse_args(argv)
    pool = sorted(set(common.load_split(args).texts))
    requests = plan_requests(pool, args.requests, args.min_texts, args.max_texts, args.seed)
    report: dict = {"configurations": [name for name, _, _ in args.config_list]}
    for name, rule, knob in args.config_list:
        report[name] = run_one(args, name, rule, knob, requests)
        print(json.dumps({k: report[name][k] for k in ("requests", "errors", "mismatches", "p50_ms", "p99_ms",
                                                        "texts_per_s")}), flush=True)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "config_list"}
    report["environment"] = common.environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(to_markdown(report), encoding="utf-8")
    print(to_markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = any(report[name]["errors"] or report[name]["mismatches"] for name in report["configurations"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
