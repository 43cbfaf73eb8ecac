"""Partition models that fit no parameters: scoring a chunk of models in one stacked call vs
one model per call.

A DPA / Run-off Election setting with ``learner: prototype`` (or ``prototype-cosine``,
``nearest-neighbour``) has nothing to train; the cost of each model is scoring the evaluation
set, and scoring one linear model at a time re-reads the whole (N, D) feature matrix for 10
output columns. ``dpcert compare`` scores ``ROW_MODELS_PER_CALL`` models per call.

Data: MNIST ScatterNet features when ``data/mnist`` is there (validation split: 50,000
training examples in k = 5000 parts, 10,000 evaluation points, D = 3969), else the embedded
digits set. Both sides run in this process on the same parts, through
``dpcert.workflows.partition._train_units`` (the function ``compare`` runs in its workers,
files written included): ours with the chunk size ``compare`` uses, the reference with one
model per call. Prints the absolute times, the ratio and the machine, and checks that both
wrote the same votes.

Run: python benchmarks/bench_free_learners.py [--models 500] [--learner prototype]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.learning.inference import ROW_MODELS_PER_CALL  # noqa: E402
from dpcert.workflows.partition import _train_units, training_indices  # noqa: E402
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit  # noqa: E402
from dpcert.workflows.setting import BaselineConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=500, help="models timed on each side")
    ap.add_argument("--learner", default="prototype",
                    choices=["prototype", "prototype-cosine", "nearest-neighbour"])
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    if (root / "data" / "mnist").exists():
        options = {"dataset": "mnist", "data_dir": str(root / "data" / "mnist"),
                   "validation": 10000}
        parts = 5000
    else:
        options, parts = {"dataset": "digits"}, 100
    cfg = RunConfig.from_mapping({**options, "features": "scatter", "model": "linear",
                                  "optimizer": "sgd"})
    data = load_run_data(cfg)
    bc = BaselineConfig(models=parts, learner=args.learner)
    indices = training_indices("dpa", bc, data.x_train)
    rows = max(len(i) for i in indices)
    count = min(args.models, parts)
    print(f"{cfg.dataset}: {len(data.y_train)} training examples in k = {parts} parts, "
          f"{len(data.y_test)} evaluation points, D = {data.x_train.shape[1]}; "
          f"learner {args.learner}, {count} models per side")
    times, votes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, per in (("stacked", ROW_MODELS_PER_CALL), ("one per call", 1)):
            out = Path(tmp) / name.replace(" ", "_")
            out.mkdir()
            units = [(i, indices[i], str(out / f"model_{i:06d}.npz")) for i in range(count)]
            start = time.perf_counter()
            for j in range(0, count, per):
                _train_units(asdict(cfg), asdict(bc), "dpa", units[j:j + per], True, rows)
            times[name] = time.perf_counter() - start
            votes[name] = np.stack([read_unit(Path(u[2])).argmax(axis=1) for u in units])
    same = float(np.mean(votes["stacked"] == votes["one per call"]))
    print(f"ours (stacked, {ROW_MODELS_PER_CALL} models per call): {times['stacked']:.2f} s "
          f"({count / times['stacked']:.1f} models/s)")
    print(f"reference (one model per call): {times['one per call']:.2f} s "
          f"({count / times['one per call']:.1f} models/s)")
    print(f"ratio: {times['one per call'] / times['stacked']:.1f}x; identical votes: "
          f"{same:.6f} of model x point pairs")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
