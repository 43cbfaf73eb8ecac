"""Sound certification at radii in the thousands: the table ladder vs a table at every radius.

Votes: synthetic (``common.synthetic_votes``), N = 10,000 points, L = 10, P = 1000; mechanism
q = 0.0002, sigma = 5, T = 300, whose radii reach about 3,300; ``--max-radius 10000``.

* ours: ``dpcert certify`` as a fresh process (imports included), cold table cache, defaults
  (tables at every radius up to 256 and at relative spacing 1/256 beyond, the PLD loss
  interval growing with r beyond 128, one table-building process per usable CPU).
* reference: the search as it was before the ladder, in-process: a table at every radius,
  the base PLD interval (1e-4) at every r, one process. By default its per-table time is
  measured at 12 radii spread over 1..(our largest radius) and integrated over every radius
  up to our largest radius (the cost of a table grows with r); the search itself is left out,
  which favours the reference. ``--full`` runs it completely (about 17 minutes on 2 cores)
  and compares the radii point by point.

Prints the absolute times, the ratio, the radius ratios (with --full) and the machine.
Run: python benchmarks/bench_large_radius.py [--full]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, synthetic_votes  # noqa: E402

Q, SIGMA, STEPS, MAX_RADIUS = 0.0002, 5.0, 300, 10_000


def ours(votes: np.ndarray, tmp: Path) -> tuple[float, np.ndarray]:
    np.save(tmp / "votes.npy", votes)
    cmd = [sys.executable, "-m", "dpcert", "certify", str(tmp / "votes.npy"),
           "--sample-rate", str(Q), "--noise-multiplier", str(SIGMA), "--steps", str(STEPS),
           "--max-radius", str(MAX_RADIUS), "--cache-dir", str(tmp / "cache"),
           "--output", str(tmp / "ours.csv"), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    rows = np.loadtxt(tmp / "ours.csv", delimiter=",", skiprows=1, dtype=np.int64)
    return elapsed, rows[:, 2]


def reference_spec():
    from dpcert.certification import accounting
    from dpcert.certification.accounting import AccountingSpec

    accounting.INTERVAL_SCALE_FROM = 10**9  # the base loss interval at every r
    return AccountingSpec(max_radius=MAX_RADIUS, resolution=0)


def reference_estimate(top: int) -> float:
    from dpcert.certification.accounting import _sgm_pure
    from dpcert.certification.mechanism import MechanismRecord

    record = MechanismRecord(sample_rate=Q, noise_multiplier=SIGMA, steps=STEPS)
    spec = reference_spec()
    radii = np.unique(np.linspace(1, top, 12).astype(int))
    cost = []
    for r in radii:
        start = time.perf_counter()
        _sgm_pure(record, spec, int(r))
        cost.append(time.perf_counter() - start)
    return float(np.sum(np.interp(np.arange(1, top + 1), radii, cost)))


def reference_full(votes: np.ndarray) -> tuple[float, np.ndarray]:
    from dpcert.certification.certify import certify
    from dpcert.certification.mechanism import MechanismRecord

    record = MechanismRecord(sample_rate=Q, noise_multiplier=SIGMA, steps=STEPS)
    start = time.perf_counter()
    cert = certify(votes, record, spec=reference_spec(), cache_dir=None, workers=1)
    return time.perf_counter() - start, cert.radius


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the reference completely")
    args = parser.parse_args()
    votes, _ = synthetic_votes(10_000)
    print(f"machine: {machine()}")
    print(f"setting: N={len(votes)}, L=10, P=1000, q={Q}, sigma={SIGMA}, T={STEPS}, "
          f"max radius {MAX_RADIUS}")
    with tempfile.TemporaryDirectory() as tmp:
        t_ours, r_ours = ours(votes, Path(tmp))
    top = int(r_ours.max())
    print(f"dpcert certify (cold, ladder, parallel tables): {t_ours:.1f} s; median radius "
          f"{np.median(r_ours):g}, max {top}")
    if args.full:
        t_ref, r_ref = reference_full(votes)
        pos = r_ref > 0
        ratio = r_ours[pos] / r_ref[pos]
        print(f"reference (a table at every radius, one process), run in full: {t_ref:.1f} s; "
              f"max radius {int(r_ref.max())}")
        print(f"radii ours / reference: min {ratio.min():.4f}, mean {ratio.mean():.4f}; "
              f"points above the reference: {int(np.sum(r_ours > r_ref))}; "
              f"same abstentions: {bool(np.array_equal(r_ours < 0, r_ref < 0))}")
    else:
        t_ref = reference_estimate(top)
        print(f"reference (a table at every radius, one process), tables 1..{top} from 12 "
              f"timed radii: {t_ref:.0f} s")
    print(f"speed-up: {t_ref / t_ours:.1f}x")


if __name__ == "__main__":
    main()
