"""``dpcert serve``: a kept ensemble behind HTTP (an ASGI app: FastAPI, run by uvicorn).

Endpoints:

* ``POST /certify`` — a JSON body ``{"inputs": [...]}`` (a batch in any form
  :class:`~dpcert.learning.inputs.InputSpec` accepts, as nested lists) or ``{"images":
  ["<base64 PNG/JPEG>", ...]}``, or one encoded image as the raw body (``Content-Type:
  image/png``, ``image/jpeg``, ...). Answers ``{"results": [...], "eta": ..., "mechanism":
  ..., ...}``: per input the prediction, its certified radius (-1: abstain), the top two
  labels' votes, all votes, and the confidence bounds the certificate rests on.
* ``GET /health`` — liveness; ``GET /ensemble`` — what is loaded (dataset, P, learner,
  input, mechanism, the test-set certified accuracy curve).
* ``GET /`` — a page to upload or draw an image and see its certificate.
* ``GET /metrics`` — Prometheus text: requests by route and status, client errors, latency,
  inputs per request and per model pass (behind the token when there is one).

The ensemble is loaded, verified and kept in memory once at start, and the group tables are
built up to the largest radius any input could certify, so a request costs the instances'
forward passes and a table look-up. Concurrent requests share those passes: each request's
inputs are checked on their own, then gathered with those of the requests arriving within a
few milliseconds and certified in one pass over the models (:class:`Batcher`); each request
gets its own rows back, the answer it would get alone. Bad requests get a 4xx answer with a
JSON ``error`` message and change nothing; the server listens on loopback unless told
otherwise, and bounds the time a client may take to send its headers and body and the
connections it may hold open (:func:`server_config`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (``request: Request``) at run time, from names local to create_app.
import asyncio
import base64
import binascii
import io
import json
import logging
from collections.abc import Callable
from importlib import resources

import numpy as np

from dpcert.certification.accounting import AccountingSpec
from dpcert.certification.aggregation import dp_label_flips
from dpcert.certification.certify import confidence_bounds, search_radius
from dpcert.errors import UserError, missing_extra
from dpcert.learning.inputs import decode_image
from dpcert.workflows import white_box
from dpcert.workflows.ensemble import Ensemble

#: Largest request body accepted (bytes) and largest batch of inputs.
MAX_BODY = 16 << 20
MAX_BATCH = 1024
#: Most pixels one request may decode (all its images together), checked from the images'
#: headers before any is decoded: a few kB of PNG can claim 4096 x 4096 pixels each.
MAX_REQUEST_PIXELS = 1 << 24
#: Most digits of a JSON number: inputs are pixels or features, never 5000-digit integers.
MAX_NUMBER_CHARS = 40
#: Requests certified at once; beyond it, 503 with Retry-After.
MAX_IN_FLIGHT = 64
#: Seconds a client may take to send its body.
BODY_TIMEOUT = 30.0
#: Seconds a client may take to send a request's line and headers, from the moment it
#: connects (or its previous answer was sent): a few hundred bytes that a real client sends in
#: one packet. uvicorn bounds only idle keep-alive time, so a client trickling a header byte
#: at a time ("slowloris") would otherwise hold its connection for ever.
HEADER_TIMEOUT = 10.0
#: Open connections at most; beyond it a new connection gets a 503 and is closed. With
#: HEADER_TIMEOUT this bounds what clients that never finish a request can hold (each
#: connection costs a little memory and a file descriptor), well above what the in-flight
#: bound lets work at once.
MAX_CONNECTIONS = 256
#: Seconds the batcher waits after a request arrives for others to join its model pass. A
#: pass over P = 1000 linear models costs a fixed part (reading 160 MB of weights, the
#: per-call work) and a smaller part per input: 32 inputs cost a few times one input's pass,
#: not 32 times, so requests that arrive together should share it. 5 ms is short next to one
#: pass (about 20 ms for one input on 2 cores), so a lone request barely notices the wait.
BATCH_WINDOW = 0.005
#: Inputs after which a pass stops gathering requests (one large request may exceed it): as
#: many as requests may be in flight, so that all waiting single-input requests share one
#: pass, which stays short (64 Fashion-MNIST images with P = 1000: a fraction of a second).
MAX_PASS_INPUTS = 64
#: Images whose features (ScatterNet) a pass computes in one call: up to 16 take the
#: scattering's path batched over wavelets (dpcert.learning.features), about 4x less CPU per
#: image than one image at a time or kymatio's own loop at 32 images. Each image's features
#: are the same, bit for bit, whatever else is in the call (tested), so a request's answer
#: does not depend on its batch-mates.
FEATURE_CHUNK = 16
#: Addresses that need no token.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _require_web():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("dpcert serve needs FastAPI and uvicorn: pip install 'dpcert[serve]'"
                        ) from None


def warm_up(ens: Ensemble, spec: AccountingSpec, eta: float) -> None:
    """Build the group tables every possible answer needs: a unanimous vote certifies the
    largest radius any input can, so certifying one builds all tables up to it."""
    votes = np.zeros((1, ens.info.num_classes), np.int64)
    votes[0, 0] = ens.info.instances
    conf = confidence_bounds(votes, inference="multinomial", eta=eta)
    search_radius(conf, ens.group_bounds(spec), max_radius=spec.max_radius)


def _number(value: float) -> float | None:
    """A float for JSON; None where there is no number (the partition defences' certificates
    rest on no confidence bound)."""
    return float(value) if np.isfinite(value) else None


def result_rows(cert, pred, flips=None) -> list[dict]:
    """Per input: prediction, radius, the top two labels and their votes, all votes, bounds;
    with ``flips`` (the certificate against label flips) also ``label_flip_radius``."""
    rows = []
    for i in range(len(cert)):
        v = pred.votes[i]
        order = np.argsort(-v, kind="stable")
        rows.append({"prediction": int(cert.prediction[i]), "radius": int(cert.radius[i]),
                     "certified": bool(cert.radius[i] >= 0),
                     "top_label": int(order[0]), "top_votes": int(v[order[0]]),
                     "runner_up": int(order[1]), "runner_up_votes": int(v[order[1]]),
                     "votes": v.tolist(), "p_lower": _number(cert.p_lower[i]),
                     "p_upper": _number(cert.p_upper[i])})
        if flips is not None:
            rows[-1]["label_flip_radius"] = int(flips.radius[i])
    return rows


class _TooLarge(UserError):
    """A request whose decoding would cost more than the server allows (413)."""


def _bounded(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise UserError(f"a number of {len(text)} characters; at most {MAX_NUMBER_CHARS}")
    return text


def _no_constant(name: str):
    raise UserError(f"{name} is not a number a request may hold")


def _parse_json(body: bytes):
    """The request's JSON, with numbers bounded in size and nesting bounded by the parser's
    recursion limit — every failure a 400, never a 500."""
    try:
        return json.loads(body, parse_int=lambda t: int(_bounded(t)),
                          parse_float=lambda t: float(_bounded(t)),
                          parse_constant=_no_constant)
    except RecursionError:
        raise UserError("the JSON body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"the body is not valid JSON ({err})") from None


def _image_pixels(raw: bytes) -> int:
    """Pixels an encoded image claims in its header (read without decoding it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 0  # not an image: decode_image says so, in its own words
    return w * h


class Batcher:
    """Certifies concurrent requests' inputs together: one model pass for all the inputs that
    arrive within ``window`` seconds of each other (up to ``max_inputs``), each request
    answered with its own rows.

    ``certify`` maps a batch of inputs to one answer per input; it must treat rows
    independently (the certificate of an input depends on its votes alone), so that a
    request's answer is the one it would get alone. Requests' inputs of one shape are
    concatenated into one call (an ensemble taking images or feature vectors gets one call
    for each form present). It runs in a worker thread, so the event loop keeps accepting and
    reading requests while the models run. One worker coroutine drains an asyncio queue; if
    a pass raises, every request of that pass gets the exception, and the worker goes on with
    the next pass."""

    def __init__(self, certify: Callable[[np.ndarray], list[dict]], *,
                 window: float = BATCH_WINDOW, max_inputs: int = MAX_PASS_INPUTS,
                 observe: Callable[[int], None] | None = None) -> None:
        self._certify = certify
        self._window = window
        self._max_inputs = max_inputs
        self._observe = observe
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, x: np.ndarray) -> list[dict]:
        """The answers for ``x`` (one per row), certified in a pass shared with the inputs of
        the requests that arrive together with it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or an app served again in another loop
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run())
        done = loop.create_future()
        self._queue.put_nowait((x, done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self._window)  # let the requests arriving now join this pass
            while (not self._queue.empty()
                   and sum(len(x) for x, _ in batch) < self._max_inputs):
                batch.append(self._queue.get_nowait())
            await self._answer(batch)

    async def _answer(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            rows = await asyncio.to_thread(self._certify_all, [x for x, _ in batch])
        except Exception as err:  # every waiting request answers with it; none hangs
            for _, done in batch:
                if not done.done():  # done: its client went away meanwhile
                    done.set_exception(err)
            return
        for (_, done), mine in zip(batch, rows, strict=True):
            if not done.done():
                done.set_result(mine)

    def _certify_all(self, xs: list[np.ndarray]) -> list[list[dict]]:
        """One ``certify`` call per input shape present, split back into each request's
        rows."""
        answers: list[list[dict]] = [[] for _ in xs]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(xs):
            by_shape.setdefault(x.shape[1:], []).append(i)
        for members in by_shape.values():
            rows = self._certify(np.concatenate([xs[i] for i in members]))
            if self._observe is not None:
                self._observe(len(rows))
            ends = np.cumsum([len(xs[i]) for i in members])
            for i, end in zip(members, ends, strict=True):
                answers[i] = rows[end - len(xs[i]):end]
        return answers


def header_timeout_protocol(header_timeout: float = HEADER_TIMEOUT,
                            max_connections: int = MAX_CONNECTIONS) -> type:
    """uvicorn's h11 HTTP protocol, bounded: a connection whose request line and headers are
    not complete ``header_timeout`` seconds after it opened (or after its previous answer) is
    closed, and a connection beyond ``max_connections`` open ones is answered 503 and closed.
    uvicorn (0.55) offers neither: its ``timeout_keep_alive`` stops at the first byte a
    client sends, and ``limit_concurrency`` answers 503 only to complete requests, so a
    client sending nothing whole holds its connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    log = logging.getLogger("dpcert.serve")
    busy = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n")

    class BoundedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections open: refusing one more", len(self.connections))
                transport.write(busy)
                transport.close()
                return
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()  # the next request's, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.warning("closed a connection whose request headers took over %g s",
                            header_timeout)
                self.transport.close()

    return BoundedH11Protocol


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000,
                  header_timeout: float = HEADER_TIMEOUT,
                  max_connections: int = MAX_CONNECTIONS, **options):
    """The uvicorn configuration ``dpcert serve`` runs ``app`` with: the bounded h11
    protocol (:func:`header_timeout_protocol`), idle keep-alive connections closed after 5 s;
    ``options``: more of :class:`uvicorn.Config`'s."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, timeout_keep_alive=5,
                          http=header_timeout_protocol(header_timeout, max_connections),
                          **{"log_level": "info", **options})


def create_app(ens: Ensemble, *, eta: float | None = None, accounting: str = "pld",
               max_radius: int | None = None, max_batch: int = MAX_BATCH,
               max_body: int = MAX_BODY, token: str | None = None,
               max_in_flight: int = MAX_IN_FLIGHT, body_timeout: float = BODY_TIMEOUT,
               batch_window: float = BATCH_WINDOW, max_pass_inputs: int = MAX_PASS_INPUTS):
    """The ASGI app serving ``ens`` (loaded and warmed up here). ``token``: when given,
    ``/certify`` and ``/ensemble`` need ``Authorization: Bearer <token>``. Concurrent
    requests' inputs share model passes (:class:`Batcher`: ``batch_window`` seconds, at most
    ``max_pass_inputs`` inputs)."""
    _require_web()
    import hmac

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    log = logging.getLogger("dpcert.serve")
    in_flight = 0
    metrics = _Metrics()

    eta = ens.info.eta if eta is None else eta
    spec = AccountingSpec(accounting=accounting, max_radius=max_radius or ens.info.max_radius)
    ens.load()
    info = ens.info.to_dict()
    if ens.info.defence == "dp":
        warm_up(ens, spec, eta)
        settings = {"defence": "dp", "eta": eta, "accounting": accounting, "group": "sound",
                    "inference": "multinomial", "max_radius": spec.max_radius}
    else:
        settings = {"defence": ens.info.defence, "eta": eta, "max_radius": spec.max_radius}
        if white_box.applies(ens.info.defence, ens.info.model):
            ens.kernel_parts()  # each part's system, factorised once at start
    app = FastAPI(title="dpcert", description="Certified predictions against training-data "
                  "poisoning", docs_url=None, redoc_url=None)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        log.warning("client error %d: %s", status, message)  # one line, no traceback
        metrics.errors.labels(status=str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def count(request: Request, call_next):
        with metrics.latency.labels(path=_route(request.url.path)).time():
            response = await call_next(request)
        metrics.requests.labels(path=_route(request.url.path),
                                status=str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def prometheus(request: Request):
        if not authorised(request):
            return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        from fastapi.responses import Response

        return Response(metrics.render(), media_type=metrics.content_type)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # the server keeps answering
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"},
                            status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "instances": ens.info.instances}

    @app.get("/ensemble")
    def ensemble(request: Request):
        if not authorised(request):
            return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return {**info, "serving": settings}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("dpcert.workflows").joinpath("page.html").read_text()

    def _inputs(body: bytes, content_type: str) -> np.ndarray:
        if content_type.startswith("image/"):
            pixels = _image_pixels(body)
            if pixels > MAX_REQUEST_PIXELS:
                raise _TooLarge(f"the image claims {pixels} pixels; at most "
                                f"{MAX_REQUEST_PIXELS} per request")
            return decode_image(body, ens.info.input, "the uploaded image")[None]
        if not content_type.startswith("application/json"):
            raise UserError("send JSON ({\"inputs\": [...]} or {\"images\": [...]}) or one "
                            f"image (Content-Type image/png or image/jpeg), not {content_type!r}")
        doc = _parse_json(body)
        if not isinstance(doc, dict) or len({"inputs", "images"} & set(doc)) != 1:
            raise UserError("the JSON body must be an object with one key: inputs (arrays) or "
                            "images (base64-encoded image files)")
        if "images" in doc:
            images = doc["images"]
            if not isinstance(images, list) or not images:
                raise UserError("images must be a non-empty list of base64 strings")
            if len(images) > max_batch:
                raise UserError(f"at most {max_batch} inputs per request, got {len(images)}")
            raws = []
            for j, s in enumerate(images):
                try:
                    raws.append(base64.b64decode(s, validate=True))
                except (binascii.Error, TypeError, ValueError):
                    raise UserError(f"images[{j}] is not base64") from None
            pixels = sum(_image_pixels(raw) for raw in raws)
            if pixels > MAX_REQUEST_PIXELS:
                raise _TooLarge(f"the images of this request claim {pixels} pixels; at most "
                                f"{MAX_REQUEST_PIXELS} per request")
            return np.stack([decode_image(raw, ens.info.input, f"images[{j}]")
                             for j, raw in enumerate(raws)])
        items = doc["inputs"]
        if not isinstance(items, list) or not items:
            raise UserError("inputs must be a non-empty list of arrays")
        if len(items) > max_batch:
            raise UserError(f"at most {max_batch} inputs per request, got {len(items)}")
        try:
            x = np.asarray(items)
        except ValueError:
            x = np.asarray([0], dtype=object)
        if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise UserError("inputs must be arrays of numbers, all of the same shape")
        return x

    spec_in = ens.info.input

    def _checked(body: bytes, content_type: str) -> np.ndarray:
        """The request's inputs, checked on their own (a bad request fails alone, before it
        joins a batch): float32 images in [0, 1] or feature vectors, which the ensemble's
        input takes back unchanged. Their features are computed with the batch's."""
        x = _inputs(body, content_type)
        return spec_in.to_model_input(x) if spec_in.is_features(x) else spec_in.to_images(x)

    def _certify(x: np.ndarray) -> list[dict]:
        """Certificates of a batch, one row per input (every step is row by row; the
        features of images FEATURE_CHUNK at a time)."""
        if spec_in.features is not None and not spec_in.is_features(x):
            x = np.concatenate([spec_in.to_model_input(x[i:i + FEATURE_CHUNK])
                                for i in range(0, len(x), FEATURE_CHUNK)])
        cert, pred = ens.certify_with_votes(x, eta=eta, accounting=accounting,
                                            max_radius=spec.max_radius)
        flips = (dp_label_flips(cert) if ens.info.defence == "dp" else
                 ens.certify_prediction(pred, eta=eta, max_radius=spec.max_radius,
                                        threat="label-flip", inputs=x))
        return result_rows(cert, pred, flips)

    batcher = Batcher(_certify, window=batch_window, max_inputs=max_pass_inputs,
                      observe=metrics.pass_inputs.observe)

    async def read_body(request: Request) -> tuple[bytearray, int]:
        body, seen = bytearray(), 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= max_body:
                body += chunk
            elif seen > 4 * max_body:
                break  # read on a little so that the client gets the answer; then stop
        return body, seen

    @app.post("/certify")
    async def certify(request: Request):
        nonlocal in_flight
        if not authorised(request):
            return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return error(413, f"request body over {max_body} bytes")
        if in_flight >= max_in_flight:
            return error(503, f"{in_flight} requests in flight; try again shortly",
                         {"Retry-After": "1"})
        in_flight += 1
        try:
            try:
                body, seen = await asyncio.wait_for(read_body(request), body_timeout)
            except TimeoutError:
                return error(408, f"the body took over {body_timeout:g} s to arrive")
            except ClientDisconnect:
                log.warning("client disconnected before sending its whole body")
                return JSONResponse({"error": "client disconnected"}, status_code=400)
            if seen > max_body:
                return error(413, f"request body over {max_body} bytes")
            if not body:
                return error(400, "empty request body")
            content_type = request.headers.get("content-type", "").lower()
            try:
                x = await run_in_threadpool(_checked, bytes(body), content_type)
                metrics.batch.observe(len(x))
                results = await batcher.submit(x)
            except _TooLarge as err:
                return error(413, str(err))
            except UserError as err:
                return error(400, str(err))
            except MemoryError:
                return error(413, "the batch is too large for this server's memory")
            return {"results": results, **settings, "mechanism": info["mechanism"],
                    "instances": ens.info.instances}
        finally:
            in_flight -= 1

    return app


def _route(path: str) -> str:
    """A request path as a metrics label: the app's routes, everything else one label (so
    that probing clients cannot grow the metrics without bound)."""
    return path if path in ("/", "/health", "/ensemble", "/certify", "/metrics") else "other"


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app): requests
    by route and status, client errors by status, latency by route, inputs per request and
    per model pass."""

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            raise missing_extra("dpcert serve's /metrics", "prometheus-client",
                                "serve") from None
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("dpcert_requests", "HTTP requests answered",
                                     ["path", "status"], registry=self.registry)
        self.errors = prom.Counter("dpcert_client_errors", "requests refused with a 4xx/5xx",
                                   ["status"], registry=self.registry)
        self.latency = prom.Histogram("dpcert_request_seconds", "time to answer a request",
                                      ["path"], registry=self.registry)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch = prom.Histogram("dpcert_inputs_per_request", "inputs certified per request",
                                    buckets=sizes, registry=self.registry)
        self.pass_inputs = prom.Histogram("dpcert_inputs_per_pass", "inputs certified per "
                                          "model pass (concurrent requests' batched together)",
                                          buckets=sizes, registry=self.registry)
        self.content_type = prom.CONTENT_TYPE_LATEST
        self._render = prom.generate_latest

    def render(self) -> bytes:
        return self._render(self.registry)


def check_exposure(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve beyond loopback without a token, unless told ``insecure``."""
    if host not in LOOPBACK and token is None and not insecure:
        raise UserError(f"serving on {host} exposes the ensemble beyond this machine: give "
                        "--token-file (clients send Authorization: Bearer <token>), or "
                        "--insecure to serve without one")


def serve(ens: Ensemble, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, insecure: bool = False, **settings) -> None:
    """Run the app with uvicorn until interrupted. Beyond loopback it needs a ``token``
    (or ``insecure``: anyone who reaches the port may query the ensemble)."""
    _require_web()
    import uvicorn

    check_exposure(host, token, insecure)
    uvicorn.Server(server_config(create_app(ens, token=token, **settings), host=host,
                                 port=port)).run()
