"""Certified radii on the public code's MNIST setting: paper RDP vs sound RDP vs sound PLD.

q = 0.001, T = 1000, sigma in {1, 2, 3}; a grid of confidence bounds (p1_lo, p2_hi). The paper
column is the published Theorem 8 (unsound, reproduction only); the sound columns cover any mix
of insertions and deletions. Prints one table per sigma and the median ratio PLD / paper over
the grid points where the paper certifies at least 5.

Run: python benchmarks/radius_table.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.certification.accounting import AccountingSpec, GroupBounds  # noqa: E402
from dpcert.certification.bounds import ConfidenceBounds  # noqa: E402
from dpcert.certification.certify import search_radius  # noqa: E402
from dpcert.certification.mechanism import MechanismRecord  # noqa: E402

P1 = np.array([0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999])
FRACTIONS = np.array([1.0, 0.5, 0.1])  # p2_hi = fraction * (1 - p1_lo)


def main() -> None:
    p1 = np.repeat(P1, len(FRACTIONS))
    p2 = np.tile(FRACTIONS, len(P1)) * (1 - p1)
    conf = ConfidenceBounds(np.zeros(len(p1), int), p1, p2)
    print(f"machine: {machine()}")
    for sigma in (1.0, 2.0, 3.0):
        mech = MechanismRecord(sample_rate=0.001, noise_multiplier=sigma, steps=1000)
        cols = {}
        for name, acc, group in (("paper-RDP", "rdp", "paper"), ("sound-RDP", "rdp", "sound"),
                                 ("sound-PLD", "pld", "sound")):
            t = time.perf_counter()
            gb = GroupBounds(mech, AccountingSpec(accounting=acc, group=group))
            cols[name] = search_radius(conf, gb, max_radius=1000)
            cols[name + " s"] = time.perf_counter() - t
        print(f"\nsigma = {sigma}  (table times: "
              + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in cols.items() if k.endswith(" s"))
              + ")")
        print("  p1_lo    p2_hi   paper-RDP  sound-RDP  sound-PLD")
        for i in range(len(p1)):
            print(f"  {p1[i]:<7} {p2[i]:<8.4g} {cols['paper-RDP'][i]:>9} "
                  f"{cols['sound-RDP'][i]:>10} {cols['sound-PLD'][i]:>10}")
        sel = cols["paper-RDP"] >= 5
        for name in ("sound-RDP", "sound-PLD"):
            ratio = cols[name][sel] / cols["paper-RDP"][sel]
            print(f"  median {name} / paper-RDP over {sel.sum()} points with paper >= 5: "
                  f"{np.median(ratio):.2f} (min {ratio.min():.2f}, max {ratio.max():.2f})")


if __name__ == "__main__":
    main()
