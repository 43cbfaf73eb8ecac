"""`dpcert serve`: answers equal Ensemble.certify, bad requests get one 4xx JSON error and
change nothing, concurrent clients on loopback get correct answers, and the page works in a
real browser (Debian's headless Chromium, driven by Playwright)."""

import base64
import contextlib
import io
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dpcert.learning.data import load_digits
from dpcert.workflows.ensemble import load_ensemble
from dpcert.workflows.run import RunConfig, run
from dpcert.workflows.serve import Batcher, create_app, server_config

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    run(RunConfig(instances=30, steps=60, sample_rate=0.05, noise_multiplier=2.0, workers=2,
                  eta=0.05, max_radius=20), out, progress=False)
    with _serving(out) as url:
        yield url, load_ensemble(out)


@contextlib.contextmanager
def _serving(path, server: dict | None = None, **settings):
    """A server for the kept ensemble at ``path`` on a free loopback port, for the block,
    configured as ``dpcert serve`` configures it (``server``: options of server_config)."""
    ens = load_ensemble(path)
    app = create_app(ens, **{"max_batch": 64, "max_body": 1 << 20, **settings})
    config = server_config(app, host="127.0.0.1", port=0,
                           **{"log_level": "warning", **(server or {})})
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (srv.started and srv.servers):
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _post(url, body: bytes, content_type="application/json"):
    req = urllib.request.Request(url + "/certify", data=body, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return resp.status, resp.read()


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_answers_equal_ensemble_certify(server):
    url, ens = server
    x = load_digits().x_test[:20]
    status, doc = _post(url, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    cert, pred = ens.certify_with_votes(x)
    assert [r["prediction"] for r in doc["results"]] == cert.prediction.tolist()
    assert [r["radius"] for r in doc["results"]] == cert.radius.tolist()
    assert [r["votes"] for r in doc["results"]] == pred.votes.tolist()
    assert [r["label_flip_radius"] for r in doc["results"]] == \
        ens.certify(x, threat="label-flip").radius.tolist()
    assert doc["eta"] == ens.info.eta and doc["mechanism"] == ens.mechanism.to_dict()
    r0 = doc["results"][0]
    assert r0["top_votes"] == max(r0["votes"]) and r0["top_votes"] >= r0["runner_up_votes"]


def test_image_uploads_equal_the_decoded_image(server):
    url, ens = server
    img = (load_digits().x_test[3, 0] * 255).astype(np.uint8)
    png = _png(img)
    status, raw_doc = _post(url, png, "image/png")
    assert status == 200
    expected = ens.certify((img / 255.0).astype(np.float32)[None])
    assert raw_doc["results"][0]["radius"] == int(expected.radius[0])
    assert raw_doc["results"][0]["prediction"] == int(expected.prediction[0])
    status, b64_doc = _post(url, json.dumps({"images": [base64.b64encode(png).decode()] * 2}
                                            ).encode())
    assert status == 200 and b64_doc["results"] == raw_doc["results"] * 2


@pytest.mark.parametrize(("body", "ctype", "code", "message"), [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"inputs": []}', "application/json", 400, "non-empty"),
    (b'{"inputs": [[1, 2], [3]]}', "application/json", 400, "same shape"),
    (json.dumps({"inputs": np.zeros((2, 5, 5)).tolist()}).encode(), "application/json", 400,
     "shape"),
    (json.dumps({"inputs": np.zeros((65, 8, 8)).tolist()}).encode(), "application/json", 400,
     "at most 64"),
    (json.dumps({"inputs": np.full((1, 8, 8), 3.5).tolist()}).encode(), "application/json",
     400, r"[0, 1]"),
    (b'{"images": ["%%%"]}', "application/json", 400, "base64"),
    (b"GIF89a broken", "image/png", 400, "not a readable image"),
    (b"", "application/json", 400, "empty"),
    (b"a,b", "text/csv", 400, "Content-Type"),
])
def test_bad_requests_get_one_json_error_and_the_server_keeps_answering(
        server, body, ctype, code, message):
    url, _ = server
    status, doc = _post(url, body, ctype)
    assert status == code and message in doc["error"]
    status, health = _get(url, "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"


def _raw_exchange(url: str, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request by hand, tolerate the server closing early, return what it answered."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may refuse before the whole body is sent
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_oversized_bodies_are_refused_with_413(server):
    url, _ = server
    # declared too large: refused before the body is read
    answer = _raw_exchange(url, b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 99999999\r\n"
                           b"Connection: close\r\n\r\n", [])
    assert answer.startswith(b"HTTP/1.1 413") and b'"error"' in answer
    # streamed without a length: refused once the limit is passed
    chunk = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 20 + [b"0\r\n\r\n"]
    answer = _raw_exchange(url, b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nTransfer-Encoding: chunked\r\n"
                           b"Connection: close\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413")
    status, health = _get(url, "/health")
    assert status == 200


def test_concurrent_clients_get_correct_answers(server):
    url, ens = server
    x = load_digits().x_test[:32]
    cert = ens.certify(x)

    def one(i):
        status, doc = _post(url, json.dumps({"inputs": x[i:i + 1].tolist()}).encode())
        return status, doc["results"][0]["prediction"], doc["results"][0]["radius"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(32)))
    assert got == [(200, int(p), int(r)) for p, r in zip(cert.prediction, cert.radius,
                                                             strict=True)]


def test_ensemble_description(server):
    url, ens = server
    status, body = _get(url, "/ensemble")
    info = json.loads(body)
    assert status == 200 and info["instances"] == ens.info.instances
    assert info["test_curve"]["radii"][0] == 0 and len(info["test_curve"]["ca"]) >= 2
    assert info["input"]["shape"] == [1, 8, 8]


def _open_page(pw, url: str):
    """Debian's headless Chromium on the served page, once it has read the ensemble."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('about').textContent.includes('×')")
    return browser, page


@pytest.mark.skipif(not (Path(CHROMIUM).exists() or os.environ.get("DPCERT_REQUIRE_BROWSER")),
                    reason="headless Chromium not installed (CI installs it)")
def test_page_in_a_real_browser(server, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    url, _ = server
    shot = tmp_path / "page.png"
    with sync_playwright() as pw:
        browser, page = _open_page(pw, url)
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + 112, box["y"] + 30)
        page.mouse.down()
        for y in range(30, 200, 8):  # a vertical stroke: a "1"
            page.mouse.move(box["x"] + 112, box["y"] + y)
        page.mouse.up()
        page.click("#send")
        page.wait_for_function("document.getElementById('answer').textContent"
                               ".startsWith('Prediction')", timeout=30000)
        answer = page.text_content("#answer")
        bars = page.locator("#hist .bar").count()
        page.screenshot(path=str(shot))
        # an uploaded image replaces the drawing on the pad: the picture is what was sent
        digit = np.round(load_digits().x_test[5, 0] * 255).astype(np.uint8)
        Image.fromarray(digit).save(tmp_path / "digit.png")
        page.evaluate("document.getElementById('answer').textContent = ''")
        page.set_input_files("#file", str(tmp_path / "digit.png"))
        page.wait_for_function("document.getElementById('answer').textContent"
                               ".startsWith('Prediction')", timeout=30000)
        uploaded = page.text_content("#answer")
        page.screenshot(path=str(tmp_path / "upload.png"))
        browser.close()
    want = server[1].certify((digit[None, None] / 255.0).astype(np.float32))
    assert f"Prediction {int(want.prediction[0])}" in uploaded
    shown = np.asarray(Image.open(tmp_path / "upload.png").convert("L")).astype(float)
    cell = box["width"] / 8
    centres = np.array([[shown[int(box["y"] + (i + 0.5) * cell),
                               int(box["x"] + (j + 0.5) * cell)] for j in range(8)]
                        for i in range(8)])
    assert np.corrcoef(centres.ravel(), digit.astype(float).ravel())[0, 1] > 0.9
    assert bars == 10 and ("certified radius" in answer or "abstain" in answer)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    pad = img[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"]
                                                                               + box["width"])]
    white = (pad.min(axis=2) > 240).mean()
    assert 0.02 < white < 0.5  # the stroke is on the black pad
    # the vote histogram is drawn: pixels of the top label's green bar
    green = ((abs(img[..., 0] - 0x0a) < 20) & (abs(img[..., 1] - 0x6b) < 20)
             & (abs(img[..., 2] - 0x2d) < 20))
    assert green.sum() > 50


@pytest.mark.skipif(not (Path(CHROMIUM).exists() or os.environ.get("DPCERT_REQUIRE_BROWSER")),
                    reason="headless Chromium not installed (CI installs it)")
def test_page_of_a_feature_vector_ensemble_takes_vectors(tmp_path):
    """An ensemble trained on the user's own feature vectors has no image to draw: the page
    offers a vector field instead, and its answer is the ensemble's."""
    from playwright.sync_api import sync_playwright

    from dpcert.workflows.defence import run_defence
    from dpcert.workflows.setting import BaselineConfig

    d = load_digits()
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    np.savez(tmp_path / "f.npz", x_train=flat(d.x_train), y_train=d.y_train,
             x_test=flat(d.x_test), y_test=d.y_test)
    run_defence("dpa", BaselineConfig(models=10, learner="prototype"),
                RunConfig(dataset="npz", data_dir=str(tmp_path / "f.npz"), model="linear",
                          optimizer="sgd"), tmp_path / "run", progress=False)
    want = load_ensemble(tmp_path / "run").certify(flat(d.x_test[:1]))
    with _serving(tmp_path / "run") as url, sync_playwright() as pw:
        browser, page = _open_page(pw, url)
        assert not page.is_visible("#pad") and page.is_visible("#vector")
        assert page.text_content("#dim") == "64"
        page.fill("#vector", json.dumps(flat(d.x_test[:1])[0].tolist()))
        page.click("#sendvec")
        page.wait_for_function("document.getElementById('answer').textContent"
                               ".startsWith('Prediction')", timeout=30000)
        answer = page.text_content("#answer")
        page.fill("#vector", "[1, 2,")
        page.click("#sendvec")
        page.wait_for_function("document.getElementById('error').textContent != ''")
        error = page.text_content("#error")
        browser.close()
    assert answer.startswith(f"Prediction {int(want.prediction[0])}")
    assert "not a JSON array" in error


@pytest.mark.parametrize(("body", "match"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|inputs"),
    (b'{"inputs": [[' + b"1" * 5000 + b"]]}", "a number of 5000 characters"),
    (b'{"inputs": [[NaN]]}', "NaN is not a number"),
])
def test_hostile_json_gets_a_400_never_a_500(server, body, match):
    import re

    url, _ = server
    status, doc = _post(url, body)
    assert status == 400 and re.search(match, doc["error"]), doc
    assert _get(url, "/health")[0] == 200


def test_images_are_bounded_by_their_claimed_pixels_before_decoding(server):
    """Two 4096 x 4096 PNGs (a few kB each) claim more pixels than a request may decode."""
    url, _ = server
    big = _png(np.zeros((4096, 4096), np.uint8))
    assert len(big) < 100_000
    images = [base64.b64encode(big).decode()] * 2
    status, doc = _post(url, json.dumps({"images": images}).encode())
    assert status == 413 and "pixels" in doc["error"]
    status, _ = _post(url, big, "image/png")  # one alone is within the limit
    assert status == 200


def test_a_token_guards_certify_and_the_description_but_not_health(server):
    _, ens = server
    with _serving(Path(ens.origin), token="s3cret-s3cret-s3cret") as url:
        body = json.dumps({"inputs": load_digits().x_test[:1].tolist()}).encode()
        assert _post(url, body)[0] == 401
        req = urllib.request.Request(url + "/certify", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": "Bearer s3cret-s3cret-s3cret"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(url, "/ensemble")
        assert err.value.code == 401
        assert _get(url, "/health")[0] == 200


def test_requests_beyond_the_in_flight_bound_get_503_with_retry_after(server):
    _, ens = server
    with _serving(Path(ens.origin), max_in_flight=0) as url:
        req = urllib.request.Request(url + "/certify", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "1"


def test_a_slow_body_is_cut_off_and_a_vanished_client_costs_one_log_line(server, caplog):
    import socket

    _, ens = server
    with _serving(Path(ens.origin), body_timeout=0.5) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{")
            answer = sock.recv(4096).decode()  # the server answers before the body ends
        assert answer.startswith("HTTP/1.1 408")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100000\r\n\r\n{\"in")
        time.sleep(1.0)  # the client has gone mid-body
        assert _get(url, "/health")[0] == 200
    assert "Traceback" not in caplog.text


def test_serving_beyond_loopback_needs_a_token_or_insecure(tmp_path):
    from click.testing import CliRunner

    from dpcert.cli import main
    from dpcert.workflows.serve import check_exposure

    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", "a-token", False)
    check_exposure("0.0.0.0", None, True)
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "nothing"), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token-file" in res.output  # refused before loading
    (tmp_path / "short").write_text("abc")
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "nothing"), "--token-file",
                                    str(tmp_path / "short")])
    assert res.exit_code == 2 and "at least 16" in res.output


def test_metrics_count_requests_errors_latency_and_batch_sizes(server):
    _, ens = server
    with _serving(Path(ens.origin)) as url:
        x = load_digits().x_test[:3]
        assert _post(url, json.dumps({"inputs": x.tolist()}).encode())[0] == 200
        assert _post(url, b"{not json")[0] == 400
        for _ in range(3):
            try:
                _get(url, "/probe/" + "x" * 20)  # unknown paths share one label
            except urllib.error.HTTPError:
                pass
        status, body = _get(url, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'dpcert_requests_total{path="/certify",status="200"} 1.0' in text
    assert 'dpcert_client_errors_total{status="400"} 1.0' in text
    assert 'dpcert_requests_total{path="other",status="404"} 3.0' in text
    assert 'dpcert_inputs_per_request_bucket{le="4.0"} 1.0' in text
    assert 'dpcert_request_seconds_count{path="/certify"} 2.0' in text


def _metric(text: str, name: str) -> float:
    """The value of one sample line ``name value`` of Prometheus text."""
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith(name + " ")))


def test_concurrent_requests_batched_together_get_the_answers_they_get_alone(server):
    """Requests of every form, one or several inputs, some bad, sent at once so that they
    share model passes: each valid one gets exactly the certificates (against poisoning and
    against label flips) and votes of its inputs certified alone; each bad one its own 400,
    without failing its batch-mates."""
    _, ens = server
    x = load_digits().x_test[:40]
    raw = np.round(x * 16).astype(np.int64)  # integer JSON numbers: raw pixels 0..16
    requests = []  # (body, content type, the inputs it certifies or None for a bad one)
    for i in range(24):
        k = 1 + i % 4
        xi = x[i:i + k]
        if i % 6 == 0:
            requests.append((json.dumps({"inputs": raw[i:i + k].tolist()}).encode(),
                             "application/json", raw[i:i + k]))
        elif i % 6 == 1:
            img = (x[i, 0] * 255).astype(np.uint8)
            requests.append((_png(img), "image/png", (img / 255.0).astype(np.float32)[None]))
        else:
            requests.append((json.dumps({"inputs": xi.tolist()}).encode(), "application/json",
                             xi))
        if i % 5 == 2:  # a bad request beside the good ones
            bad = [b'{"inputs": [[1, 2], [3]]}', b"{not json",
                   json.dumps({"inputs": np.full((1, 8, 8), 3.5).tolist()}).encode()][i % 3]
            requests.append((bad, "application/json", None))
    with _serving(Path(ens.origin), batch_window=0.05) as url:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: _post(url, r[0], r[1]), requests))
        metrics = _get(url, "/metrics")[1].decode()
    for (_, _, xi), (status, doc) in zip(requests, answers, strict=True):
        if xi is None:
            assert status == 400 and "error" in doc
            continue
        assert status == 200, doc
        cert, pred = ens.certify_with_votes(xi)
        flips = ens.certify(xi, threat="label-flip")
        assert [r["prediction"] for r in doc["results"]] == cert.prediction.tolist()
        assert [r["radius"] for r in doc["results"]] == cert.radius.tolist()
        assert [r["label_flip_radius"] for r in doc["results"]] == flips.radius.tolist()
        assert [r["votes"] for r in doc["results"]] == pred.votes.tolist()
        assert [r["p_lower"] for r in doc["results"]] == pytest.approx(cert.p_lower.tolist())
    valid = [xi for _, _, xi in requests if xi is not None]
    # every input went through exactly one pass, and passes were shared
    assert _metric(metrics, "dpcert_inputs_per_pass_sum") == sum(len(xi) for xi in valid)
    assert _metric(metrics, "dpcert_inputs_per_pass_count") < len(valid)


def test_the_batcher_answers_each_request_with_its_rows_and_survives_a_failing_pass():
    """Requests submitted together share one pass and get their own rows; requests beyond
    max_inputs wait for the next pass; a pass that raises answers each of its requests with
    the exception (none hangs), and the next pass works; a batcher used from a new event loop
    starts a worker there."""
    import asyncio

    passes: list[int] = []
    fail = {"now": False}

    def certify(x: np.ndarray) -> list[dict]:
        passes.append(len(x))
        if fail["now"]:
            raise RuntimeError("the models failed")
        return [{"row": float(v)} for v in x[:, 0]]

    async def scenario():
        batcher = Batcher(certify, window=0.01, max_inputs=6)
        sizes = [1, 3, 2, 1, 4]
        starts = np.cumsum([0, *sizes[:-1]])
        xs = [np.arange(s, s + k, dtype=float)[:, None] for s, k in zip(starts, sizes,
                                                                         strict=True)]
        got = await asyncio.gather(*(batcher.submit(x) for x in xs))
        fail["now"] = True
        failed = await asyncio.gather(*(batcher.submit(x) for x in xs[:2]),
                                      return_exceptions=True)
        fail["now"] = False
        again = await asyncio.wait_for(batcher.submit(xs[0]), 5)
        return xs, got, failed, again

    xs, got, failed, again = asyncio.run(scenario())
    batcher = Batcher(certify)
    for _ in range(2):  # one batcher, served in one event loop and then another
        assert asyncio.run(batcher.submit(xs[0])) == [{"row": 0.0}]
    assert got == [[{"row": float(v)} for v in x[:, 0]] for x in xs]
    assert passes[:2] == [6, 5]  # 1 + 3 + 2 reach max_inputs; the rest go in the next pass
    assert all(isinstance(f, RuntimeError) for f in failed) and passes[2] == 4
    assert again == [{"row": 0.0}]


def test_a_failing_model_pass_answers_every_waiting_request_with_500(server, monkeypatch):
    from dpcert.workflows.ensemble import Ensemble

    url, _ = server

    def broken(self, x, **kw):
        raise RuntimeError("out of order")

    monkeypatch.setattr(Ensemble, "certify_with_votes", broken)
    body = json.dumps({"inputs": load_digits().x_test[:1].tolist()}).encode()
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _post(url, body), range(6)))
    assert all(status == 500 and "RuntimeError" in doc["error"] for status, doc in answers)
    monkeypatch.undo()
    assert _post(url, body)[0] == 200


def _connect(url: str):
    import socket

    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_after(sock, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte at a time, 0.1 s
    apart, meanwhile); fails if it is still open after the socket's 10 s timeout."""
    t = time.monotonic()
    sock.settimeout(0.1)
    for byte in trickle:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t
        except TimeoutError:
            pass
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t


def test_clients_slow_to_send_their_headers_are_disconnected(server):
    """Slowloris: a connection sending nothing, one stopping mid-header and one trickling its
    headers a byte at a time are all closed once the header timeout passes, while a normal
    client is served meanwhile, also on a kept-alive connection between requests."""
    import http.client

    _, ens = server
    body = json.dumps({"inputs": load_digits().x_test[:1].tolist()}).encode()
    with _serving(Path(ens.origin), server={"header_timeout": 1.0}) as url:
        with _connect(url) as silent, _connect(url) as partial, _connect(url) as trickle:
            partial.sendall(b"POST /certify HTTP/1.1\r\nHost: x\r\nContent-Ty")
            assert _post(url, body)[0] == 200  # served while three connections dawdle
            assert _closed_after(silent) < 5
            assert _closed_after(partial) < 5
            assert _closed_after(trickle, b"GET /health HTTP/1.1\r\nHost: x\r\n" * 3) < 5
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for _ in range(2):  # the timer restarts after each answer on a kept-alive connection
            conn.request("GET", "/health")
            assert conn.getresponse().read() and conn.sock is not None
            time.sleep(0.6)
        conn.close()


def test_connections_beyond_the_bound_get_503_and_are_closed(server):
    _, ens = server
    with _serving(Path(ens.origin), server={"max_connections": 2}) as url:
        with _connect(url) as first, _connect(url) as second:
            first.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(4096).startswith(b"HTTP/1.1 200")
            with _connect(url) as third:
                answer = third.recv(4096)
                assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
                assert third.recv(4096) == b""
            second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert second.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)  # the server sees the two close
        assert _get(url, "/health")[0] == 200


def test_the_server_keeps_answering_while_a_model_pass_runs(server, monkeypatch):
    """The pass runs in a worker thread: while it is held, /health and the metrics answer."""
    from dpcert.workflows.ensemble import Ensemble

    url, _ = server
    entered, release = threading.Event(), threading.Event()
    real = Ensemble.certify_with_votes

    def held(self, x, **kw):
        entered.set()
        release.wait(30)
        return real(self, x, **kw)

    monkeypatch.setattr(Ensemble, "certify_with_votes", held)
    body = json.dumps({"inputs": load_digits().x_test[:1].tolist()}).encode()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, url, body)
        assert entered.wait(30)
        assert _get(url, "/health")[0] == 200  # the event loop is free while the pass runs
        release.set()
        assert pending.result()[0] == 200


def test_an_images_features_do_not_depend_on_its_batch_mates():
    """The server computes the features of concurrent requests' images together
    (FEATURE_CHUNK at a time): each image's features must equal those it gets alone, bit for
    bit, for a request's answer to be the one it gets alone."""
    pytest.importorskip("kymatio")
    from dpcert.learning.features import scatter_features
    from dpcert.workflows.serve import FEATURE_CHUNK

    x = np.random.default_rng(0).random((FEATURE_CHUNK + 4, 1, 28, 28), dtype=np.float32)
    alone = np.concatenate([scatter_features(x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(scatter_features(x[:FEATURE_CHUNK]), alone[:FEATURE_CHUNK])
    assert np.array_equal(scatter_features(x), alone)  # beyond the chunk: kymatio's own loop


def test_a_kernel_ridge_dpa_ensemble_serves_white_box_label_flip_radii(tmp_path):
    """Served label-flip radii of DPA over kernel ridge are its white-box certificates: those
    its run wrote, and above counting somewhere."""
    from click.testing import CliRunner

    from dpcert.certification import baselines
    from dpcert.cli import main

    out = tmp_path / "dpa"
    res = CliRunner().invoke(main, ["run", "--defence", "dpa", "--models", "20", "--learner",
                                    "kernel-ridge", "--gamma", "0.05", "--ridge", "1",
                                    "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    flips = np.loadtxt(out / "certificates_label_flip.csv", delimiter=",", skiprows=1,
                       dtype=np.int64)[:60, 2]
    counting = baselines.dpa_radius(np.load(out / "votes.npy"))[1][:60]
    assert (flips > counting).any()
    x = load_digits().x_test[:60]
    with _serving(out) as url:
        status, doc = _post(url, json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    assert [r["label_flip_radius"] for r in doc["results"]] == flips.tolist()
