"""Markdown rows of certified accuracy from run directories' certificate CSVs.

Run: python scripts/ca_table.py runs/fashion-mnist_sigma3_best [more runs] \
         [--radii 0,40,80,100,150] [--method pld]
Per run: clean accuracy, CA@r, median radius of the correctly predicted points (certified at
r >= 0), the median over all points (-1 for wrong or abstained ones) and the maximum.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--radii", default="0,40,80,100,150")
    ap.add_argument("--method", default="pld", help="pld (default certificate) or another "
                    "method's CSV suffix, e.g. rdp, paper_rdp")
    args = ap.parse_args()
    radii = [int(r) for r in args.radii.split(",")]
    print("| run | clean acc | " + " | ".join(f"CA@{r}" for r in radii)
          + " | median r (correct) | median r (all) | max r |")
    print("|---|---|" + "---|" * len(radii) + "---|---|---|")
    for run in args.runs:
        name = "certificates.csv" if args.method == "pld" else f"certificates_{args.method}.csv"
        rows = np.loadtxt(run / name, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        correct = rows[:, 1] == rows[:, 3]
        good = np.where(correct, rows[:, 2], -1)
        certified = good[good >= 0]
        print(f"| {run.name} | {correct.mean():.3f} | "
              + " | ".join(f"{np.mean(good >= r):.3f}" for r in radii)
              + f" | {np.median(certified) if certified.size else -1:g} | {np.median(good):g} "
              f"| {good.max()} |")


if __name__ == "__main__":
    main()
