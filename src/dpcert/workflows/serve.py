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
  inputs per request (behind the token when there is one).

The ensemble is loaded, verified and kept in memory once at start, and the group tables are
built up to the largest radius any input could certify, so a request costs the instances'
forward passes and a table look-up. Bad requests get a 4xx answer with a JSON ``error``
message and change nothing; the server listens on loopback unless told otherwise.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (``request: Request``) at run time, from names local to create_app.
import base64
import binascii
import io
import json
from importlib import resources

import numpy as np

from dpcert.certification.accounting import AccountingSpec
from dpcert.certification.aggregation import dp_label_flips
from dpcert.certification.certify import confidence_bounds, search_radius
from dpcert.errors import UserError, missing_extra
from dpcert.learning.inputs import decode_image
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


def create_app(ens: Ensemble, *, eta: float | None = None, accounting: str = "pld",
               max_radius: int | None = None, max_batch: int = MAX_BATCH,
               max_body: int = MAX_BODY, token: str | None = None,
               max_in_flight: int = MAX_IN_FLIGHT, body_timeout: float = BODY_TIMEOUT):
    """The ASGI app serving ``ens`` (loaded and warmed up here). ``token``: when given,
    ``/certify`` and ``/ensemble`` need ``Authorization: Bearer <token>``."""
    _require_web()
    import asyncio
    import hmac
    import logging

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

    def _certify(body: bytes, content_type: str) -> dict:
        x = _inputs(body, content_type)
        metrics.batch.observe(len(x))
        cert, pred = ens.certify_with_votes(x, eta=eta, accounting=accounting,
                                            max_radius=spec.max_radius)
        flips = (dp_label_flips(cert) if ens.info.defence == "dp" else
                 ens.certify_prediction(pred, eta=eta, max_radius=spec.max_radius,
                                        threat="label-flip"))
        return {"results": result_rows(cert, pred, flips), **settings,
                "mechanism": info["mechanism"], "instances": ens.info.instances}

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
                return await run_in_threadpool(_certify, bytes(body), content_type)
            except _TooLarge as err:
                return error(413, str(err))
            except UserError as err:
                return error(400, str(err))
            except MemoryError:
                return error(413, "the batch is too large for this server's memory")
        finally:
            in_flight -= 1

    return app


def _route(path: str) -> str:
    """A request path as a metrics label: the app's routes, everything else one label (so
    that probing clients cannot grow the metrics without bound)."""
    return path if path in ("/", "/health", "/ensemble", "/certify", "/metrics") else "other"


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app): requests
    by route and status, client errors by status, latency by route, inputs per request."""

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
        self.batch = prom.Histogram("dpcert_inputs_per_request", "inputs certified per request",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                                    registry=self.registry)
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
    uvicorn.run(create_app(ens, token=token, **settings), host=host, port=port,
                log_level="info", timeout_keep_alive=5)
