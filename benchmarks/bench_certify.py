"""Certification speed: dpcert vs the public seed code's per-point binary search.

Certify N = 10,000 test points (L = 10 labels, P = 1000 votes, radii searched up to 1000) for
the public code's MNIST mechanism (q = 0.001, T = 1000, sigma = 2):

* reference: a faithful re-implementation of the seed code's CertifyRadiusRDP: per point, a
  binary search on r in [0, 50] whose every probe scans 999 orders (1.01 .. 10.99), calling the
  RDP accountant (Opacus ``compute_rdp``) at q_r = 1 - (1-q)^r for each order. It is exactly
  linear in the number of points, so it is timed on a subset and scaled to N.
* ours: ``dpcert certify`` as a fresh process (imports included), ``rdp`` and ``pld``
  accounting, cold (empty table cache) and cached (second run).

Prints the absolute times, the ratio, and the machine. Run: python benchmarks/bench_certify.py
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, synthetic_votes  # noqa: E402

Q, SIGMA, STEPS = 0.001, 2.0, 1000
N_POINTS = 10_000
N_REFERENCE = 12


def seed_certify_radius(p1: float, p2: float) -> int:
    """The public code's CertifyRadiusRDP / check_condition_rdp, accountant call per probe."""
    from opacus.accountants.analysis.rdp import compute_rdp

    def check(radius: int) -> bool:
        if radius == 0:
            return True
        q_r = 1 - (1 - Q) ** radius
        max_lower, min_upper = 0.0, 1.0
        for alpha in [1 + x / 100 for x in range(1, 1000)]:
            eps = compute_rdp(q=q_r, noise_multiplier=SIGMA, steps=STEPS, orders=[alpha])[0]
            lower = min(max(math.exp(-eps) * p1 ** (alpha / (alpha - 1)), 0), 1)
            upper = max(min((math.exp(eps) * p2) ** ((alpha - 1) / alpha), 1), 0)
            max_lower, min_upper = max(max_lower, lower), min(min_upper, upper)
        return max_lower - min_upper > 0

    if p1 <= p2:
        return -1
    low, high = 0.0, 50
    while low <= high:
        radius = math.ceil((low + high) / 2.0)
        if check(radius):
            low = radius + 0.1
        else:
            high = radius - 1
    return math.floor(low)


def run_cli(votes: Path, accounting: str, cache: Path, out: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpcert.cli", "certify", str(votes),
                    "--sample-rate", str(Q), "--noise-multiplier", str(SIGMA),
                    "--steps", str(STEPS), "--accounting", accounting, "--max-radius", "1000",
                    "--cache-dir", str(cache), "--output", str(out), "--quiet"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    from dpcert.bounds import vote_bounds

    votes, _ = synthetic_votes(N_POINTS)
    work = Path(tempfile.mkdtemp(prefix="dpcert-bench-"))
    np.save(work / "votes.npy", votes)

    conf = vote_bounds(votes[:N_REFERENCE], 1e-3, "paper")
    t = time.perf_counter()
    ref_radii = [seed_certify_radius(a, b) for a, b in
                 zip(conf.p_lower, conf.p_upper, strict=True)]
    per_point = (time.perf_counter() - t) / N_REFERENCE
    ref_total = per_point * N_POINTS

    results = {}
    for acc in ("rdp", "pld"):
        cache = work / f"cache-{acc}"
        cold = run_cli(work / "votes.npy", acc, cache, work / f"{acc}.csv")
        warm = run_cli(work / "votes.npy", acc, cache, work / f"{acc}.csv")
        radii = np.loadtxt(work / f"{acc}.csv", delimiter=",", skiprows=1, dtype=int)[:, 2]
        results[acc] = (cold, warm, radii)

    print(f"machine: {machine()}")
    print(f"setting: N={N_POINTS}, L=10, P=1000, q={Q}, sigma={SIGMA}, T={STEPS}, max radius 1000")
    print(f"reference (seed per-point binary search, RDP paper): {per_point:.2f} s/point "
          f"measured on {N_REFERENCE} points -> {ref_total:.0f} s for {N_POINTS} "
          f"(radii {ref_radii})")
    for acc, (cold, warm, radii) in results.items():
        print(f"dpcert {acc:>3} sound: cold {cold:6.1f} s, cached {warm:5.1f} s "
              f"(whole process); median radius {np.median(radii):g}, max {radii.max()}; "
              f"speed-up vs reference: cold {ref_total / cold:,.0f}x, "
              f"cached {ref_total / warm:,.0f}x")


if __name__ == "__main__":
    main()
