"""The HTTP server, over real HTTP: validation, micro-batching, metrics, timeouts, graceful shutdown."""

from __future__ import annotations

import asyncio
import socket
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


# -- hostile clients: invalid Unicode, deep nesting, slow bodies, too many connections, disconnects, auth -------


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"text": "\\ud800"}', "'text' is not valid Unicode (lone surrogate at character 0)"),
    (b'{"texts": ["fine", "a \\udfff b"]}', "'texts[1]' is not valid Unicode"),
    (b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100001 levels deep, at most 8"),
    (b"[" * 9 + b"]" * 9, "nested 9 levels deep"),
])
def test_invalid_unicode_and_deep_nesting_are_400_not_500(start_server, predictor, body, message):
    server = start_server(predictor)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        assert client.post("/predict", json={"text": "fine"}).status_code == 200  # still serving
        metrics = _metrics(client)
        assert 'consistentee_requests_total{path="/predict",status="500"}' not in metrics


def test_json_depth_counts_brackets_outside_strings_only():
    from consistentee.serving.app import json_depth

    assert json_depth('{"texts": ["a [[[ {{{", "b"]}') == 2
    assert json_depth('{"a": "\\"[[[["}') == 1
    assert json_depth("[[[]]]") == 3


def test_a_half_sent_body_gets_408_and_the_connection_is_closed(start_server, predictor):
    server = start_server(predictor, body_timeout_s=0.5)
    started = time.monotonic()
    sock = _raw(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"text\": ")
    try:
        answer = _read_all(sock)  # returns only when the server closes the connection
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request body not received within 0.5 s" in answer
    assert time.monotonic() - started < 8
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert _metrics(client)['consistentee_requests_total{path="/predict",status="408"}'] == 1


def test_connections_beyond_the_cap_get_503(start_server, predictor):
    server = start_server(predictor, max_connections=2, body_timeout_s=5)
    held = []
    for _ in range(2):
        held.append(_raw(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"))
        time.sleep(0.2)  # the request is now in the server, waiting for its body
    try:
        for sock in held:  # both within the cap: no answer yet
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(100)
        response = httpx.post(f"{server.url}/predict", json={"text": "fine"}, timeout=10)
        assert response.status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the held connections are gone: served again
        status = httpx.post(f"{server.url}/predict", json={"text": "fine"}, timeout=10).status_code
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200


def test_client_disconnects_are_counted_apart_from_server_errors(start_server, predictor):
    server = start_server(predictor, body_timeout_s=5)
    for _ in range(3):
        sock = _raw(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 80\r\n\r\n{\"text\"")
        time.sleep(0.1)
        sock.close()  # gone before the body is complete
    with httpx.Client(base_url=server.url, timeout=10) as client:
        deadline = time.monotonic() + 10
        while _metrics(client).get("consistentee_client_disconnects_total", 0) < 3:
            assert time.monotonic() < deadline, _metrics(client)
            time.sleep(0.05)
        metrics = _metrics(client)
    assert metrics["consistentee_client_disconnects_total"] == 3
    assert metrics['consistentee_requests_total{path="/predict",status="499"}'] == 3
    assert 'consistentee_requests_total{path="/predict",status="500"}' not in metrics


def test_bearer_token_is_required_when_an_api_key_is_set(start_server, predictor):
    server = start_server(predictor, api_key="s3cret")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/health").status_code == 200  # probes need no key
        assert client.get("/health").json()["auth"] == "bearer"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            response = client.post("/predict", json={"text": "fine"}, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]
        assert client.get("/metrics").status_code == 401
        ok = client.post("/predict", json={"text": "fine"}, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in ("neg", "pos")
        metrics = client.get("/metrics", headers={"authorization": "Bearer s3cret"}).text
    assert 'consistentee_requests_total{path="/predict",status="401"} 3' in metrics


def test_serve_options_are_checked_before_the_port_and_the_model(monkeypatch):
    import argparse

    from consistentee.cli import serve

    parser = argparse.ArgumentParser()
    serve.configure(parser)
    args = parser.parse_args(["--model", "/nowhere", "--host", "0.0.0.0"])
    monkeypatch.delenv("CONSISTENTEE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="reachable from other machines: set an API key"):
        serve.check_options(args)
    monkeypatch.setenv("CONSISTENTEE_API_KEY", "from-env")
    assert serve.api_key_from(args) == "from-env"
    with pytest.raises(FileNotFoundError, match="no such model"):  # auth fine now; the model is next
        serve.check_options(args)
    args = parser.parse_args(["--model", "/nowhere", "--api-key", "flag"])
    assert serve.api_key_from(args) == "flag"  # the flag wins over the environment


def test_a_port_in_use_fails_before_listening_is_printed(served_model_dir, capsys):
    from consistentee.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve", "--model", served_model_dir, "--rule", "entropy", "--port", str(port),
                     "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err == f"consistentee: error: cannot listen on 127.0.0.1:{port}: Address already in use"
