"""Certification speed: dpcert vs the public seed code's per-point binary search.

Certify N = 10,000 test points (L = 10 labels, P = 1000 votes) for the public code's MNIST
mechanism (q = 0.001, T = 1000, sigma = 2):

* reference: a faithful re-implementation of the seed code's CertifyRadiusRDP: per point, a
  binary search on r in [0, 50] whose every probe scans 999 orders (1.01 .. 10.99), calling the
  RDP accountant (Opacus ``compute_rdp``) at q_r = 1 - (1-q)^r for each order. It is exactly
  linear in the number of points, so it is timed on a subset and scaled to N.
* ours: ``dpcert certify`` as a fresh process (imports included), cold (empty table cache) and
  cached (second run), every accounting in both group modes, ``--max-radius 10000``;
* the previous search (issue 10): the linear walk over r = 1, 2, ... (``search_radius_linear``),
  in-process and cold, on the same votes and tables, side by side with the new search in-process.

Then the case that never finished before: the paper's RDP mode at q = 1 (sigma = 20, T = 1),
13 points, ``--max-radius 10000``, where every point certifies to the maximum. The linear walk is
timed to r = 100 and extrapolated linearly (it builds one table per r).

Prints the absolute times, the ratios, and the machine. Run: python benchmarks/bench_certify.py
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


def run_cli(votes: Path, cache: Path, out: Path, *args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dpcert.cli", "certify", str(votes), *args,
                    "--cache-dir", str(cache), "--output", str(out), "--quiet"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def in_process(search, votes: np.ndarray, mech, accounting: str, group: str, max_radius: int,
               cache: Path) -> tuple[float, np.ndarray]:
    """Cold certification in this process with the given radius search."""
    from dpcert.certification.accounting import AccountingSpec, GroupBounds
    from dpcert.certification.bounds import vote_bounds

    t = time.perf_counter()
    spec = AccountingSpec(accounting=accounting, group=group, max_radius=max_radius)
    conf = vote_bounds(votes, 1e-3, "simuem")
    radius = search(conf, GroupBounds(mech, spec, cache_dir=cache), max_radius=max_radius)
    return time.perf_counter() - t, radius


MODES = [("pld", "sound"), ("rdp", "sound"), ("adp", "sound"), ("rdp", "paper"),
         ("adp", "paper")]


def main() -> None:
    from dpcert.certification.bounds import vote_bounds
    from dpcert.certification.certify import search_radius, search_radius_linear
    from dpcert.certification.mechanism import MechanismRecord

    votes, _ = synthetic_votes(N_POINTS)
    work = Path(tempfile.mkdtemp(prefix="dpcert-bench-"))
    np.save(work / "votes.npy", votes)
    mech_args = ["--sample-rate", str(Q), "--noise-multiplier", str(SIGMA), "--steps", str(STEPS)]
    mech = MechanismRecord(sample_rate=Q, noise_multiplier=SIGMA, steps=STEPS)

    conf = vote_bounds(votes[:N_REFERENCE], 1e-3, "paper")
    t = time.perf_counter()
    ref_radii = [seed_certify_radius(a, b) for a, b in
                 zip(conf.p_lower, conf.p_upper, strict=True)]
    per_point = (time.perf_counter() - t) / N_REFERENCE
    ref_total = per_point * N_POINTS

    print(f"machine: {machine()}")
    print(f"setting: N={N_POINTS}, L=10, P=1000, q={Q}, sigma={SIGMA}, T={STEPS}, "
          f"max radius 10000")
    print(f"reference (seed per-point binary search, RDP paper): {per_point:.2f} s/point "
          f"measured on {N_REFERENCE} points -> {ref_total:.0f} s for {N_POINTS} "
          f"(radii {ref_radii})")
    for acc, group in MODES:
        tag = f"{acc}-{group}"
        args = [*mech_args, "--accounting", acc, "--group", group, "--max-radius", "10000"]
        cold = run_cli(work / "votes.npy", work / f"cache-{tag}", work / f"{tag}.csv", *args)
        warm = run_cli(work / "votes.npy", work / f"cache-{tag}", work / f"{tag}.csv", *args)
        radii = np.loadtxt(work / f"{tag}.csv", delimiter=",", skiprows=1, dtype=int)[:, 2]
        t_new, r_new = in_process(search_radius, votes, mech, acc, group, 10_000,
                                  work / f"new-{tag}")
        t_old, r_old = in_process(search_radius_linear, votes, mech, acc, group, 10_000,
                                  work / f"old-{tag}")
        assert np.array_equal(r_new, r_old) and np.array_equal(r_new, radii)
        print(f"dpcert {tag:>11}: CLI cold {cold:6.1f} s, cached {warm:5.1f} s (whole "
              f"process); in-process cold: bisection {t_new:6.1f} s vs linear walk "
              f"{t_old:6.1f} s ({t_old / t_new:.2f}x); median radius {np.median(radii):g}, "
              f"max {radii.max()}; vs reference: cold {ref_total / cold:,.0f}x")

    # The paper RDP mode at q = 1: every point certifies to max_radius.
    q1 = MechanismRecord(sample_rate=1.0, noise_multiplier=20.0, steps=1)
    small = votes[:13]
    np.save(work / "q1.npy", small)
    args = ["--sample-rate", "1.0", "--noise-multiplier", "20", "--steps", "1",
            "--accounting", "rdp", "--group", "paper", "--max-radius", "10000"]
    cold = run_cli(work / "q1.npy", work / "cache-q1", work / "q1.csv", *args)
    radii = np.loadtxt(work / "q1.csv", delimiter=",", skiprows=1, dtype=int)[:, 2]
    t_old, _ = in_process(search_radius_linear, small, q1, "rdp", "paper", 100, work / "old-q1")
    print(f"paper RDP at q=1 (sigma 20, T 1), 13 points, max radius 10000: CLI cold {cold:.1f} s "
          f"(radii {sorted(set(radii.tolist()))}); linear walk {t_old:.1f} s to r = 100 -> "
          f"~{t_old * 100:.0f} s to 10000 ({t_old * 100 / cold:,.0f}x)")


if __name__ == "__main__":
    main()
