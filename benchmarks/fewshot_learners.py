"""How accurate is one partition model? The learners of ``dpcert compare`` side by side on the
same parts.

A partition defence is as robust as its base learner is sample-efficient (the Lethal Dose
Conjecture, Wang et al. 2022): at k = 1200 parts of MNIST each model sees about 42-50
examples, at k = 5000 about 10. This script trains the first ``--parts`` models of a
hash partition of the MNIST validation split (50,000 training examples; the last 10,000
training examples are the evaluation points; the test set is never read) with every learner
below, through the functions ``dpcert compare`` runs in its workers, and prints each
learner's mean single-model accuracy on the evaluation points, its time per model, and the
machine. The ensemble's accuracy is much higher than one model's; this measures the learner.

Learners: nearest class mean (``prototype``), nearest example (``nearest-neighbour``),
kernel ridge regression (``kernel-ridge``: Gaussian kernel, gamma 0.25, ridge 0.001), softmax
regression trained full-batch (300 Adam steps, lr 0.01), the small CNN on the ScatterNet maps
(``scatter-cnn``: 300 Adam steps, lr 0.003, weight decay 0.001), and the two gradient learners
again on every translation of their examples by up to ``--shift`` pixels (``augment_shift``;
features recomputed for each translation).

Run: python benchmarks/fewshot_learners.py [--parts 6] [--models 1200] [--shift 2] [--only ...]
(needs data/mnist: scripts/fetch_data.sh)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, mnist_validation_config  # noqa: E402

from dpcert.learning.reference import instance_generator  # noqa: E402
from dpcert.workflows.partition import (  # noqa: E402
    _fit_free,
    _train_one,
    learner_model,
    training_indices,
)
from dpcert.workflows.runconfig import RunConfig, load_run_data  # noqa: E402
from dpcert.workflows.setting import FREE_LEARNERS, BaselineConfig  # noqa: E402


def settings(k: int, shift: int) -> dict[str, BaselineConfig]:
    linear = dict(models=k, learner="full-batch", steps=300, lr=0.01)
    cnn = dict(models=k, learner="scatter-cnn", steps=300, lr=0.003, weight_decay=0.001)
    return {"prototype": BaselineConfig(models=k, learner="prototype"),
            "nearest-neighbour": BaselineConfig(models=k, learner="nearest-neighbour"),
            "kernel-ridge": BaselineConfig(models=k, learner="kernel-ridge"),
            "full-batch linear": BaselineConfig(**linear),
            f"full-batch linear, shift {shift}": BaselineConfig(**linear, augment_shift=shift),
            "scatter-cnn": BaselineConfig(**cnn),
            f"scatter-cnn, shift {shift}": BaselineConfig(**cnn, augment_shift=shift)}


def model_scores(cfg: RunConfig, setting: BaselineConfig, data, idx: np.ndarray, i: int,
                 rows: int) -> np.ndarray:
    """Scores (N, L) of model ``i`` of a setting, as ``compare`` computes them."""
    import torch

    from dpcert.learning.inference import score_instances

    if setting.learner not in FREE_LEARNERS:
        return _train_one(cfg, setting, data, idx, instance_generator(cfg.seed + 7919, i))[0]
    params = _fit_free(cfg, setting, data, idx, rows)
    family = learner_model(setting, "linear")
    stacked = {k: torch.from_numpy(v[None]) for k, v in params.items()}
    return score_instances(family, stacked, torch.from_numpy(data.x_test),
                           in_channels=data.x_train.shape[1], num_classes=data.num_classes)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", type=int, default=6, help="models per learner")
    ap.add_argument("--models", type=int, default=1200, help="k of the partition")
    ap.add_argument("--shift", type=int, default=2, help="largest translation, pixels")
    ap.add_argument("--data-dir", default="data/mnist")
    ap.add_argument("--only", nargs="*", help="learners to run (names as printed; default all)")
    args = ap.parse_args()
    cfg = mnist_validation_config(args.data_dir)
    data = load_run_data(cfg)
    chosen = settings(args.models, args.shift)
    if args.only:
        unknown = set(args.only) - set(chosen)
        if unknown:
            ap.error(f"unknown learners {sorted(unknown)}; choose from {list(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    parts = training_indices("dpa", next(iter(chosen.values())), data.x_train)
    assert parts is not None
    rows = max(len(p) for p in parts)
    print(f"MNIST validation split, k = {args.models} (examples per part: "
          f"{min(len(p) for p in parts)}-{rows}), first {args.parts} parts, "
          f"{len(data.y_test)} evaluation points")
    print("| learner | mean single-model accuracy | min | max | seconds per model |")
    print("|---|---|---|---|---|")
    for name, setting in chosen.items():
        acc, start = [], time.perf_counter()
        for i in range(args.parts):
            scores = model_scores(cfg, setting, data, parts[i], i, rows)
            acc.append(float(np.mean(scores.argmax(axis=1) == data.y_test)))
        per = (time.perf_counter() - start) / args.parts
        print(f"| {name} | {np.mean(acc):.3f} | {min(acc):.3f} | {max(acc):.3f} | {per:.1f} |",
              flush=True)
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
