"""A real uvicorn server on 127.0.0.1 (a free port) in a thread, around a tiny early-exit model."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory, tiny_encoder_dir):
    from transformers import AutoTokenizer

    from consistentee.model.modeling import EarlyExitForSequenceClassification

    torch.manual_seed(1)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["neg", "pos"], pooling="mean")
    with torch.no_grad():
        for head in model.exits:
            head.weight.mul_(60.0)
    path = tmp_path_factory.mktemp("served") / "model"
    model.save_pretrained(path, tokenizer=AutoTokenizer.from_pretrained(tiny_encoder_dir))
    return str(path)


@pytest.fixture(scope="session")
def predictor(served_model_dir):
    from consistentee.inference import EarlyExitPredictor

    return EarlyExitPredictor.from_pretrained(served_model_dir, rule="entropy", knob=0.3, device="cpu",
                                              max_length=64)


class RunningServer:
    def __init__(self, app):
        import uvicorn

        from consistentee.serving.app import uvicorn_options

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10,
                                **uvicorn_options(app.state.config))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "the server did not stop"


@pytest.fixture
def start_server():
    """start_server(predictor, api_key=None, **config) -> a RunningServer; stopped after the test."""
    from consistentee.serving import ServerConfig, create_app

    running = []

    def start(predictor, api_key=None, **config):
        server = RunningServer(create_app(predictor, ServerConfig(**config), model_name="tiny",
                                          api_key=api_key)).start()
        running.append(server)
        return server

    yield start
    for server in running:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture(scope="session")
def calibration_csv(tmp_path_factory) -> str:
    """240 labelled texts: enough rows for Learn-then-Test to certify a loose budget."""
    import pandas as pd

    words = ["good", "bad", "film", "great", "dull", "moving", "boring", "witty", "slow", "fine", "awful", "fun"]
    rows = [{"id": f"r{i}", "text": " ".join(words[(i * k) % len(words)] for k in range(1, 2 + i % 5)),
             "label": "pos" if i % 2 else "neg"} for i in range(240)]
    path = tmp_path_factory.mktemp("calibration") / "texts.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)
