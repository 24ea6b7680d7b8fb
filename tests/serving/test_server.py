"""The HTTP server, over real HTTP: validation, micro-batching, metrics, timeouts, graceful shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

TEXTS = ["a great and moving film", "dull", "wonderful acting, loved it from the first scene to the last",
         "a disaster", "flat lifeless and long", "ok", "sharp witty and true", "painfully bad",
         "charming and smart but a little too long", "tiresome and ugly", "bright funny and warm", "fine"]


def _metrics(client: httpx.Client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


class SlowPredictor:
    """The real predictor, with a delay before every model call (to hold requests in flight)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_encoded(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.predict_encoded(*args, **kwargs)


def test_predict_health_and_results_match_offline(start_server, predictor):
    server = start_server(predictor)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["num_layers"] == 3
        response = client.post("/predict", json={"texts": TEXTS})
        assert response.status_code == 200
        served = response.json()["predictions"]
        offline = predictor.predict(TEXTS)
        assert [(r["label"], r["exit_layer"]) for r in served] == [(r["label"], r["exit_layer"]) for r in offline]
        single = client.post("/predict", json={"text": TEXTS[2]}).json()["predictions"]
        assert single[0]["label"] == offline[2]["label"] and single[0]["exit_layer"] == offline[2]["exit_layer"]
        pair = client.post("/predict", json={"texts": TEXTS[:2], "text_pairs": TEXTS[2:4]})
        assert pair.status_code == 200
        expected = predictor.predict(list(zip(TEXTS[:2], TEXTS[2:4], strict=True)))
        assert [r["label"] for r in pair.json()["predictions"]] == [r["label"] for r in expected]


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"json": {"text": ""}}, 422, "'text' is empty"),
    ({"json": {"texts": ["fine", "   "]}}, 422, "'texts[1]' is empty"),
    ({"json": {"texts": []}}, 422, "'texts' is empty"),
    ({"json": {"texts": ["x"] * 5}}, 422, "too many items: 5 in 'texts', at most 4"),
    ({"json": {"texts": "not a list"}}, 422, "must be a list of strings"),
    ({"json": {"texts": [1]}}, 422, "'texts[0]' must be a string"),
    ({"json": {"txt": "typo"}}, 422, "unknown field(s) 'txt'"),
    ({"json": ["a", "b"]}, 422, "must be a JSON object"),
    ({"json": {"text": "x" * 301}}, 422, "too long: 301 characters, at most 300"),
    ({"json": {"texts": ["a", "b"], "text_pairs": ["c"]}}, 422, "'text_pairs' has 1 items but 'texts' has 2"),
    ({"json": {"text": "a " * 140}}, 422, "input 0 is too long: 142 tokens, more than max_length 64"),
    ({"content": b'{"texts": ["a",', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "not UTF-8"),
    ({"content": b'{"text": "' + b"y" * 2000 + b'"}'}, 413, "request body too large"),
])
def test_validation_errors_are_4xx_with_messages(start_server, predictor, kwargs, status, message):
    server = start_server(predictor, max_items=4, max_text_chars=300, max_body_bytes=1000)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/predict", **kwargs)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert client.get("/health").status_code == 200  # the server is still fine
        metrics = _metrics(client)
        assert metrics[f'consistentee_requests_total{{path="/predict",status="{status}"}}'] == 1


def test_chunked_oversized_body_is_rejected(start_server, predictor):
    server = start_server(predictor, max_body_bytes=1000)

    def chunks():
        for _ in range(10):
            yield b"x" * 500

    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/predict", content=chunks())  # no Content-Length: streamed
        assert response.status_code == 413 and "too large" in response.json()["error"]


def test_concurrent_requests_are_batched_and_metrics_move(start_server, predictor):
    server = start_server(predictor, max_batch_size=64, max_wait_ms=300)
    n = 12

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            return await asyncio.gather(*(client.post("/predict", json={"text": t}) for t in TEXTS[:n]))

    with httpx.Client(base_url=server.url, timeout=10) as client:
        before = _metrics(client)
        responses = asyncio.run(fire())
        after = _metrics(client)
    assert [r.status_code for r in responses] == [200] * n
    offline = predictor.predict(TEXTS[:n])
    assert [r.json()["predictions"][0]["label"] for r in responses] == [r["label"] for r in offline]
    ok = 'consistentee_requests_total{path="/predict",status="200"}'
    assert after[ok] - before.get(ok, 0) == n
    engine_calls = after["consistentee_engine_calls_total"] - before["consistentee_engine_calls_total"]
    batches = after["consistentee_batches_total"] - before["consistentee_batches_total"]
    assert 1 <= engine_calls < n and batches == engine_calls
    assert after["consistentee_predictions_total"] - before["consistentee_predictions_total"] == n
    assert after["consistentee_exit_layer_count"] - before["consistentee_exit_layer_count"] == n
    assert after['consistentee_exit_layer_bucket{le="3"}'] == after["consistentee_exit_layer_count"]
    assert after["consistentee_request_latency_seconds_count"] - before["consistentee_request_latency_seconds_count"] == n
    assert after['consistentee_request_latency_seconds_bucket{le="+Inf"}'] == after[
        "consistentee_request_latency_seconds_count"]
    assert after["consistentee_batch_items_sum"] - before["consistentee_batch_items_sum"] == n
    assert after["consistentee_queue_items"] == 0


def test_request_timeout_gives_504(start_server, predictor):
    server = start_server(SlowPredictor(predictor, 1.0), request_timeout_s=0.2)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/predict", json={"text": "fine"})
        assert response.status_code == 504 and "no answer within 0.2 s" in response.json()["error"]
        time.sleep(1.0)  # the worker finishes the abandoned batch and drops its result
        assert client.post("/predict", json={"text": "fine"}).status_code == 504


def test_graceful_shutdown_answers_in_flight_request(start_server, predictor):
    server = start_server(SlowPredictor(predictor, 0.8))
    result = {}

    def call():
        with httpx.Client(base_url=server.url, timeout=20) as client:
            result["response"] = client.post("/predict", json={"texts": TEXTS[:3]})

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while server.app.state.metrics.in_flight.value() < 1:  # the request has arrived
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.stop()  # what SIGTERM does: stop accepting, finish in-flight, then lifespan shutdown
    caller.join(timeout=20)
    response = result["response"]
    assert response.status_code == 200
    assert [r["label"] for r in response.json()["predictions"]] == [r["label"] for r in predictor.predict(TEXTS[:3])]
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=server.url, timeout=2) as client:
        client.get("/health")


def test_unknown_path_and_config_validation(start_server, predictor):
    from consistentee.serving import ServerConfig

    server = start_server(predictor)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/nope").status_code == 404
        assert _metrics(client)['consistentee_requests_total{path="other",status="404"}'] == 1
    with pytest.raises(ValueError, match="max_items"):
        ServerConfig(max_items=0)


def test_serve_cli_sigterm_answers_in_flight_request(served_model_dir):
    """The real command in a subprocess: a request waiting in the micro-batcher survives SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "consistentee.cli.serve", "--model", served_model_dir, "--device", "cpu",
         "--rule", "entropy", "--knob", "0.3", "--port", str(port), "--max-wait-ms", "1500",
         "--log-level", "warning", "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        result = {}
        caller = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/predict", json={"text": "fine"},
                                                                              timeout=30)))
        started = time.monotonic()
        caller.start()
        time.sleep(0.5)  # the request is now waiting in the micro-batcher (max wait 1.5 s)
        process.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        assert result["r"].status_code == 200 and result["r"].json()["predictions"][0]["label"] in ("neg", "pos")
        assert time.monotonic() - started >= 1.0
        # uvicorn re-raises the signal after its graceful shutdown: exit by SIGTERM (or 0 on older uvicorn)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
