"""Peak memory of Run-off Election certification: blocks of test points vs all points at once.

Synthetic per-model scores (k models, N points, L = 10 labels, float32, as ``dpcert compare``
stacks them). Ours: ``baselines.roe_certificate`` as shipped (blocks of at most
``ROE_BLOCK_ELEMENTS`` model x point x label entries); the reference: the same function with
one block holding every point (the computation before blocking). Peak memory is numpy's
allocations traced by ``tracemalloc`` beyond the scores themselves. Prints both peaks, their
ratio, both times, whether the certificates agree, and the machine.

Run: python benchmarks/bench_roe_memory.py [--models 1000] [--points 4000]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.certification import baselines  # noqa: E402


def peak(scores: np.ndarray, block_elements: int) -> tuple[float, float, tuple]:
    """(peak MB beyond the scores, seconds, certificate) of ROE with that block size."""
    saved = baselines.ROE_BLOCK_ELEMENTS
    baselines.ROE_BLOCK_ELEMENTS = block_elements
    try:
        tracemalloc.start()
        start = time.perf_counter()
        cert = baselines.roe_certificate(scores)
        seconds = time.perf_counter() - start
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        baselines.ROE_BLOCK_ELEMENTS = saved
    return top / 2**20, seconds, cert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--points", type=int, default=4000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.full(10, 0.3), size=(args.models, args.points)).astype(np.float32)
    print(f"Run-off Election over k = {args.models} models, N = {args.points} points, L = 10 "
          f"(scores: {scores.nbytes / 2**20:.0f} MB)")
    ours = peak(scores, baselines.ROE_BLOCK_ELEMENTS)
    reference = peak(scores, scores.size)
    same = all(np.array_equal(a, b) for a, b in zip(ours[2], reference[2], strict=True))
    print(f"ours (blocks of {baselines.ROE_BLOCK_ELEMENTS} entries): peak {ours[0]:.0f} MB, "
          f"{ours[1]:.1f} s")
    print(f"reference (all points at once): peak {reference[0]:.0f} MB, {reference[1]:.1f} s")
    print(f"ratio (reference / ours peak): {reference[0] / ours[0]:.1f}x; same certificates: "
          f"{same}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
