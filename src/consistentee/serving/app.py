"""HTTP server for early-exit prediction, with dynamic micro-batching.

Endpoints:

* ``POST /predict`` -- ``{"texts": ["...", ...]}`` or ``{"text": "..."}``; sentence pairs with
  ``"text_pairs": [...]`` / ``"text_pair": "..."``. Answers ``{"predictions": [{"label", "probability",
  "exit_layer"}, ...]}`` in input order.
* ``GET /health`` -- ``{"status": "ok", ...}`` (503 ``draining`` while shutting down).
* ``GET /metrics`` -- Prometheus text format: requests by path and status, a latency histogram, an
  exit-layer histogram, micro-batch counters.

Micro-batching: each request is validated and tokenized on arrival, then queued. One worker task
takes the first queued request, keeps collecting until ``max_batch_size`` texts or ``max_wait_ms``
have passed, and runs them as one engine call in a worker thread (the event loop stays responsive).
Shutdown stops accepting connections, answers every request already received, then stops the worker.

Errors are JSON ``{"error": "..."}``: 400 bad JSON (also invalid Unicode such as a lone surrogate, and
nesting deeper than ``max_json_depth``), 401 missing or wrong bearer token (when an API key is set), 408 body
not received within ``body_timeout_s`` (the connection is closed), 413 body too large, 422 invalid request
(empty or too long text, too many items, wrong types), 503 overloaded or shutting down, 504 timed out.
A client that disconnects before its answer is counted as status 499 and in
``consistentee_client_disconnects_total``, never as a server error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect

from consistentee.serving.config import ServerConfig
from consistentee.serving.metrics import CONTENT_TYPE, ServerMetrics

__all__ = ["MicroBatcher", "RequestError", "ServerConfig", "create_app", "json_depth", "parse_request",
           "uvicorn_options"]

KNOWN_PATHS = ("/predict", "/health", "/metrics")
#: Status recorded for a request whose client went away first (nginx's convention; never sent).
CLIENT_CLOSED = 499
#: Paths open without the API key: load balancers probe /health.
OPEN_PATHS = ("/health",)

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class RequestError(Exception):
    """A client error: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _string_list(payload: dict, key: str, limit: int, max_chars: int) -> list[str]:
    values = payload[key]
    if not isinstance(values, list):
        raise RequestError(422, f"'{key}' must be a list of strings")
    if not values:
        raise RequestError(422, f"'{key}' is empty: send at least one text")
    if len(values) > limit:
        raise RequestError(422, f"too many items: {len(values)} in '{key}', at most {limit} per request")
    for i, value in enumerate(values):
        _check_string(value, f"{key}[{i}]", max_chars)
    return values


def _check_string(value: Any, where: str, max_chars: int) -> None:
    if not isinstance(value, str):
        raise RequestError(422, f"'{where}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(422, f"'{where}' is empty")
    if len(value) > max_chars:
        raise RequestError(422, f"'{where}' is too long: {len(value)} characters, at most {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escape decodes to a lone surrogate: not text
        raise RequestError(400, f"'{where}' is not valid Unicode (lone surrogate at character {exc.start})") from None


def json_depth(text: str) -> int:
    """Deepest nesting of arrays and objects in a JSON text (strings skipped), without parsing it: the parser
    itself recurses, and 100,000 nested brackets would exhaust its stack."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_request(body: bytes, config: ServerConfig) -> list:
    """Validate a /predict body; returns texts or (text, pair) tuples. Raises RequestError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    if (depth := json_depth(text)) > config.max_json_depth:
        raise RequestError(400, f"request body is nested {depth} levels deep, at most {config.max_json_depth}")
    try:
        payload = json.loads(text)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                           ) from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'the body must be a JSON object: {"texts": [...]} or {"text": "..."}')
    allowed = {"text", "texts", "text_pair", "text_pairs"}
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise RequestError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    if ("text" in payload) == ("texts" in payload):
        raise RequestError(422, 'send exactly one of "text" (a string) or "texts" (a list of strings)')
    if "text" in payload:
        if "text_pairs" in payload:
            raise RequestError(422, '"text" goes with "text_pair", not "text_pairs"')
        _check_string(payload["text"], "text", config.max_text_chars)
        if "text_pair" in payload:
            _check_string(payload["text_pair"], "text_pair", config.max_text_chars)
            return [(payload["text"], payload["text_pair"])]
        return [payload["text"]]
    if "text_pair" in payload:
        raise RequestError(422, '"texts" goes with "text_pairs", not "text_pair"')
    texts = _string_list(payload, "texts", config.max_items, config.max_text_chars)
    if "text_pairs" in payload:
        pairs = _string_list(payload, "text_pairs", config.max_items, config.max_text_chars)
        if len(pairs) != len(texts):
            raise RequestError(422, f"'text_pairs' has {len(pairs)} items but 'texts' has {len(texts)}")
        return list(zip(texts, pairs, strict=True))
    return texts


@dataclass
class _Job:
    features: list
    future: asyncio.Future


class MicroBatcher:
    """An asyncio queue and one worker: requests are grouped into micro-batches, one engine call each."""

    def __init__(self, predictor, config: ServerConfig, metrics: ServerMetrics):
        self.predictor = predictor
        self.config = config
        self.metrics = metrics
        self._queue: asyncio.Queue[_Job | None] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._held: _Job | None = None
        self.queued_items = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="consistentee-engine")
        self._task = asyncio.create_task(self._worker(), name="consistentee-batcher")

    async def stop(self) -> None:
        """Answer everything queued, then stop the worker."""
        if self._task is None or self._queue is None:
            return
        await self._queue.put(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, features: list) -> list[dict]:
        if not self.running or self._queue is None:
            raise RequestError(503, "the server is shutting down")
        if self.queued_items + len(features) > self.config.max_queue_items:
            raise RequestError(503, f"server overloaded: {self.queued_items} texts queued; retry later")
        future = asyncio.get_running_loop().create_future()
        self.queued_items += len(features)
        self.metrics.queue_items.set(self.queued_items)
        await self._queue.put(_Job(features, future))
        return await future

    async def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        assert self._queue is not None
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:  # only what is already queued
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                raise TimeoutError from None
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._next(None)
            if first is None:
                break
            jobs, items = [first], len(first.features)
            deadline = loop.time() + self.config.max_wait_ms / 1000.0
            while items < self.config.max_batch_size:
                try:
                    job = await self._next(deadline - loop.time())
                except TimeoutError:
                    break
                if job is None:
                    stopping = True
                    break
                if items + len(job.features) > self.config.max_batch_size:
                    self._held = job  # does not fit: first in the next micro-batch
                    break
                jobs.append(job)
                items += len(job.features)
            await self._run(jobs)
        if self._held is not None:
            job, self._held = self._held, None
            await self._run([job])

    async def _run(self, jobs: list[_Job]) -> None:
        self.queued_items -= sum(len(j.features) for j in jobs)
        self.metrics.queue_items.set(self.queued_items)
        live = [j for j in jobs if not j.future.done()]  # timed-out requests are dropped
        if not live:
            return
        features = [f for j in live for f in j.features]
        calls_before = self.predictor.engine_calls
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self._executor, lambda: self.predictor.predict_encoded(features, batch_size=self.config.max_batch_size)
            )
        except Exception as exc:  # a model failure answers every request of the batch with 500
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batches.inc()
        self.metrics.engine_calls.inc(self.predictor.engine_calls - calls_before)
        self.metrics.batch_items.observe(len(features))
        self.metrics.predictions.inc(len(features))
        self.metrics.exit_layer.observe_many(r["exit_layer"] for r in results)
        start = 0
        for job in live:
            part = results[start:start + len(job.features)]
            start += len(job.features)
            if not job.future.done():
                job.future.set_result(part)


class _ClientGone(Exception):
    """The client disconnected before its answer."""


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if size > limit:
            raise RequestError(413, f"request body too large: {size} bytes, at most {limit}")
    chunks, total = [], 0

    async def read() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"request body too large: more than {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise RequestError(408, f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise _ClientGone from None
    return b"".join(chunks)


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """Settings the server needs from uvicorn itself: the connection cap (503 beyond it). uvicorn counts the
    connection asking, so ``max_connections`` connections are served with a limit of one more."""
    return {"limit_concurrency": config.max_connections + 1}


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def create_app(predictor, config: ServerConfig | None = None, *, model_name: str | None = None,
               api_key: str | None = None) -> FastAPI:
    """The FastAPI application around an :class:`~consistentee.inference.EarlyExitPredictor`.

    ``api_key``: when set, every path but /health needs ``Authorization: Bearer <api_key>`` (401 otherwise)."""
    config = config or ServerConfig()
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty")
    metrics = ServerMetrics(predictor.num_layers)
    batcher = MicroBatcher(predictor, config, metrics)
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            state["draining"] = True
            await batcher.stop()

    app = FastAPI(title="consistentee", description="Early-exit text classification", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.config = config
    app.state.predictor = predictor
    app.state.auth = "bearer" if api_key is not None else "none"

    @app.middleware("http")
    async def record(request: Request, call_next):
        started = time.perf_counter()
        metrics.in_flight.add(1)
        status = 500
        try:
            if api_key is not None and request.url.path not in OPEN_PATHS and not _authorized(request, api_key):
                status = 401
                return JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer <key>'"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                response = await call_next(request)
            except (ClientDisconnect, _ClientGone):
                status = CLIENT_CLOSED
                raise
            status = response.status_code
            return response
        finally:
            if status == CLIENT_CLOSED:
                metrics.client_disconnects.inc()
            metrics.in_flight.add(-1)
            path = request.url.path if request.url.path in KNOWN_PATHS else "other"
            metrics.requests.inc(path=path, status=str(status))
            if path == "/predict":
                metrics.latency.observe(time.perf_counter() - started)

    @app.post("/predict")
    async def predict(request: Request):
        try:
            if state["draining"] or not batcher.running:
                raise RequestError(503, "the server is shutting down")
            body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
            items = parse_request(body, config)
            try:
                features = predictor.encode(items, truncation=config.truncation)
            except ValueError as exc:
                raise RequestError(422, str(exc)) from None
            try:
                results = await asyncio.wait_for(batcher.submit(features), config.request_timeout_s)
            except TimeoutError:
                raise RequestError(504, f"no answer within {config.request_timeout_s:g} s; retry later") from None
        except RequestError as exc:
            response = _error(exc.status, exc.message)
            if exc.status == 408:  # the rest of the body may never come: don't wait for it on this connection
                response.headers["connection"] = "close"
            return response
        except _ClientGone:
            return _error(CLIENT_CLOSED, "client disconnected")
        except Exception as exc:  # never leak a traceback to the client
            if await request.is_disconnected():
                return _error(CLIENT_CLOSED, "client disconnected")
            return _error(500, f"internal error: {type(exc).__name__}")
        return {"predictions": results}

    @app.get("/health")
    async def health():
        body = {
            "status": "draining" if state["draining"] else "ok",
            "model": model_name,
            "rule": repr(predictor.rule),
            "num_layers": predictor.num_layers,
            "labels": list(predictor.label_names),
            "queued_items": batcher.queued_items,
            "limits": asdict(config),
            "auth": "bearer" if api_key is not None else "none",
        }
        return JSONResponse(body, status_code=503 if state["draining"] else 200)

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app
