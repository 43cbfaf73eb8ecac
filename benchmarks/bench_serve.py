"""Certifying new inputs with a kept ensemble: HTTP latency, batched vs one-by-one, memory.

Four measurements, side by side in one run, printed with the machine:

1. ``dpcert serve`` on loopback: median and 90th-percentile latency of ``POST /certify`` with
   one PNG image (decode, ScatterNet features, all P models, certificate; group tables built
   at start), over ``--requests`` sequential requests.
2. Throughput of ``dpcert serve`` (its own process, as the command runs it) for 1 client and
   for ``--clients`` concurrent clients, each sending one PNG per request on a kept-alive
   connection and waiting for the answer before the next: requests per second, median and
   99th-percentile latency, the server's CPU time per request, the mean inputs per model
   pass, and the ratio of the two rates (concurrent requests share model passes).
3. Batched certification (:meth:`Ensemble.certify`, instances streamed in blocks as stacked
   computations) against the reference a user without dpcert would write: load each
   instance's file and run it on the batch, one instance at a time. Reported per image, with
   the ratio, and checked to give the same votes.
4. Peak memory (max RSS of a fresh process) of certifying a batch with a P = ``--big``
   ensemble. The big ensemble is made by repeating the run's instances with small random
   perturbations (weights only matter for the votes, not for memory or time).

Run (after training the run, see docs/benchmarks.md):
    python benchmarks/bench_serve.py runs/fashion-mnist_sigma3_best --data-dir data/fashion-mnist
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def http_latency(run_dir: Path, images: np.ndarray, requests: int) -> tuple[float, float, float]:
    import uvicorn

    from dpcert.workflows.ensemble import load_ensemble
    from dpcert.workflows.serve import create_app, server_config

    t0 = time.perf_counter()
    app = create_app(load_ensemble(run_dir))
    start_s = time.perf_counter() - t0
    srv = uvicorn.Server(server_config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not (srv.started and srv.servers):
        time.sleep(0.05)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}/certify"
    bodies = [_png(images[i % len(images)]) for i in range(requests)]
    times = []
    for i, body in enumerate(bodies):
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"})
        t = time.perf_counter()
        with urllib.request.urlopen(req) as resp:
            json.loads(resp.read())
        if i >= 3:  # the first requests warm caches and allocators
            times.append(time.perf_counter() - t)
    srv.should_exit = True
    times.sort()
    return statistics.median(times), times[int(0.9 * len(times))], start_s


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(port: int, bodies: list[bytes], start: threading.Barrier,
            times: list[float]) -> None:
    """One client: each body in turn on one kept-alive connection; latencies into times."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start.wait()
    for body in bodies:
        t = time.perf_counter()
        conn.request("POST", "/certify", body, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"the server answered {resp.status}")
        times.append(time.perf_counter() - t)
    conn.close()


def _drive(port: int, bodies: list[bytes], clients: int,
           per_client: int) -> tuple[float, float, float]:
    """``clients`` concurrent clients of ``per_client`` requests each: (requests/s, median
    and 99th-percentile latency in s)."""
    start = threading.Barrier(clients + 1)
    times: list[float] = []
    threads = [threading.Thread(target=_client, args=(
        port, [bodies[(c * per_client + i) % len(bodies)] for i in range(per_client)],
        start, times)) for c in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if len(times) != clients * per_client:
        raise RuntimeError("a client failed")
    times.sort()
    return len(times) / wall, statistics.median(times), times[int(0.99 * (len(times) - 1))]


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _passes(port: int) -> tuple[float, float]:
    """(inputs, model passes) the server has certified so far, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
    values = dict(line.split() for line in text.decode().splitlines()
                  if line.startswith("dpcert_inputs_per_pass_"))
    return (float(values["dpcert_inputs_per_pass_sum"]),
            float(values["dpcert_inputs_per_pass_count"]))


def client_rates(run_dir: Path, images: np.ndarray, clients: int, per_client: int,
                 sequential: int) -> dict[int, tuple[float, float, float, float, float]]:
    """``dpcert serve`` started as a command on a free loopback port; 1 client sending
    ``sequential`` requests, then ``clients`` clients sending ``per_client`` each (after a
    round of warm-up requests): per number of clients, (requests/s, median s, p99 s, server
    CPU s per request, mean inputs per model pass). The CPU per request depends less than the
    rates on what else the machine runs: it bounds the rate the server's cores allow."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "dpcert.cli", "serve", str(run_dir),
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dpcert serve did not start") from None
                time.sleep(0.5)
        bodies = [_png(img) for img in images]
        _drive(port, bodies, clients, 2)  # warm-up: allocators, caches, connections
        rates = {}
        for n, each in ((1, sequential), (clients, per_client)):
            cpu, (inputs, passes) = _cpu_seconds(server.pid), _passes(port)
            measured = _drive(port, bodies, n, each)
            cpu = (_cpu_seconds(server.pid) - cpu) / (n * each)
            inputs_after, passes_after = _passes(port)
            rates[n] = (*measured, cpu, (inputs_after - inputs) / (passes_after - passes))
        return rates
    finally:
        server.terminate()
        server.wait(timeout=30)


def one_by_one(run_dir: Path, x: np.ndarray, instances: int,
               features: np.ndarray | None = None) -> np.ndarray:
    """The reference: each instance's file loaded and run alone on the batch; votes (N, L).
    ``features``: the batch's model input, when already computed."""
    import torch

    from dpcert.certification.aggregation import tally_votes
    from dpcert.learning.inference import score_instances
    from dpcert.store import load_tensors
    from dpcert.workflows.ensemble import load_ensemble, model_path

    info = load_ensemble(run_dir).info
    xin = torch.from_numpy(info.input.to_model_input(x) if features is None else features)
    votes = np.zeros((len(x), info.num_classes), np.int64)
    for i in range(instances):
        params, _ = load_tensors(model_path(run_dir, i))
        p = {k: torch.from_numpy(v)[None] for k, v in params.items()}
        channels = info.input.shape[0] if info.input.shape else 0
        s = score_instances(info.model, p, xin, in_channels=channels,
                            num_classes=info.num_classes)[0]
        votes += tally_votes(s[None])
    return votes


def naive_per_image(run_dir: Path, images: np.ndarray, instances: int, total: int) -> float:
    """Seconds per image of the naive server: for each request, the image's features, then
    each instance's file loaded and run on it (``instances`` measured, scaled to ``total``)."""
    from dpcert.workflows.ensemble import load_ensemble

    spec = load_ensemble(run_dir).info.input
    seconds = 0.0
    for img in images:
        t = time.perf_counter()
        feats = spec.to_model_input(img[None])
        seconds += time.perf_counter() - t
        t = time.perf_counter()
        one_by_one(run_dir, img[None], instances, feats)
        seconds += (time.perf_counter() - t) * total / instances
    return seconds / len(images)


def big_memory(run_dir: Path, big: int, batch: int, data_dir: str) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of certifying ``batch`` inputs with a P = ``big`` ensemble,
    in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        code = f"""
import dataclasses
import numpy as np
from dpcert.workflows.ensemble import load_ensemble, write_export
ens = load_ensemble({str(run_dir)!r})
p = ens.info.instances
base = ens._source.read(0, p)
rng = np.random.default_rng(0)
reps = -(-{big} // p)
stacked = {{k: np.concatenate([v] * reps)[:{big}] for k, v in base.items()}}
for v in stacked.values():
    v += rng.normal(0, 1e-3, v.shape).astype(np.float32)
write_export({str(path)!r}, stacked, dataclasses.replace(
    ens.info, instances={big}, training={{**ens.info.training, "instances": {big}}}))
"""
        subprocess.run([sys.executable, "-c", code], check=True)
        measure = f"""
import time
import numpy as np
from dpcert.learning.data import load_dataset
from dpcert.workflows.ensemble import load_ensemble
x = load_dataset({load_name(run_dir)!r}, {data_dir!r}).x_test[:{batch}]
t = time.perf_counter()
cert = load_ensemble({str(path)!r}).certify(x)
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t, int(peak) / 1024)
"""
        out = subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True,
                             text=True).stdout.split()
        return float(out[1]), float(out[0])


def load_name(run_dir: Path) -> str:
    return json.loads((run_dir / "ensemble.json").read_text())["dataset"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data-dir", default=None, help="the dataset's folder (test images)")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (2)")
    ap.add_argument("--per-client", type=int, default=25,
                    help="requests each concurrent client sends (2)")
    ap.add_argument("--sequential", type=int, default=100,
                    help="requests the single client sends (2)")
    ap.add_argument("--batch", type=int, default=1000, help="images in the batched test")
    ap.add_argument("--reference-instances", type=int, default=100,
                    help="instances the one-by-one reference runs (its time is scaled to P)")
    ap.add_argument("--big", type=int, default=10_000)
    args = ap.parse_args()

    from dpcert.learning.data import load_dataset
    from dpcert.workflows.ensemble import load_ensemble

    data = load_dataset(load_name(args.run_dir), args.data_dir)
    images = (data.x_test[: max(args.batch, 64), 0] * 255).round().astype(np.uint8)
    ens = load_ensemble(args.run_dir)
    p = ens.info.instances
    print(f"machine: {machine()}")
    print(f"ensemble: {ens}")

    med, p90, start = http_latency(args.run_dir, images, args.requests)
    print(f"HTTP POST /certify, one PNG: median {med * 1e3:.1f} ms, p90 {p90 * 1e3:.1f} ms "
          f"over {args.requests - 3} requests (server start incl. tables: {start:.1f} s)")

    rates = client_rates(args.run_dir, images, args.clients, args.per_client,
                         args.sequential)
    for clients, (rate, median, p99, cpu, per_pass) in rates.items():
        print(f"dpcert serve, {clients} client(s), one PNG per request: {rate:.1f} requests/s, "
              f"median {median * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; server CPU "
              f"{cpu * 1e3:.1f} ms/request; {per_pass:.1f} inputs per model pass")
    print(f"  {args.clients} clients / 1 client: {rates[args.clients][0] / rates[1][0]:.1f}x "
          "the requests per second")

    x = data.x_test[: args.batch]
    ens.load()
    ens.certify(x[:8])  # tables and features warm
    t = time.perf_counter()
    _, pred = ens.certify_with_votes(x)
    batched = (time.perf_counter() - t) / len(x)
    k = min(args.reference_instances, p)
    t = time.perf_counter()
    feats_x = ens.model_input(x)
    feats = (time.perf_counter() - t) / len(x)
    t = time.perf_counter()
    ref_votes = one_by_one(args.run_dir, x, k, feats_x)
    # features once per batch, then every instance: the loop over k instances scaled to P
    reference = feats + (time.perf_counter() - t) / len(x) * p / k
    same = np.array_equal(ref_votes, pred.votes) if k == p else "n/a (reference ran a subset)"
    print(f"batched certify: {batched * 1e3:.2f} ms/image ({len(x)} images, P = {p}); "
          f"one-by-one reference (features once, then each instance loaded and run on the "
          f"batch): {reference * 1e3:.2f} ms/image (instances measured on {k}, scaled to P); "
          f"ratio {reference / batched:.1f}x; same votes: {same}")
    print(f"  of which ScatterNet features (the same in both): {feats * 1e3:.2f} ms/image; "
          f"the instances alone: ratio {(reference - feats) / (batched - feats):.1f}x")

    naive = naive_per_image(args.run_dir, data.x_test[:3], k, p)
    t = time.perf_counter()
    for i in range(20):
        ens.certify(data.x_test[i:i + 1])
    resident = (time.perf_counter() - t) / 20
    print(f"one image at a time, in process: resident ensemble {resident * 1e3:.1f} ms/image; "
          f"naive (load and run each instance per image) {naive * 1e3:.0f} ms/image "
          f"(measured on {k} instances, scaled to P); ratio {naive / resident:.0f}x")

    rss, secs = big_memory(args.run_dir, args.big, args.batch, args.data_dir)
    print(f"P = {args.big}: certified {args.batch} images in {secs:.1f} s (group tables as "
          f"cached), peak RSS of that process {rss:.0f} MB (VmHWM)")


if __name__ == "__main__":
    main()
