"""Preparing a partition model's translated examples in a ``dpcert compare`` worker: the
dataset cache keeping both the images and their features vs keeping one dataset.

A worker training DPA models with ``augment_shift`` reads the run's features (its job's
data) and the run's images (to translate them) for every model. The reference evicts the
cache between the two reads, as a one-entry cache did: each model reloads the images and
re-reads and re-hashes the cached features. Both sides run in this process through the
functions the worker calls (``load_run_data``, ``_training_examples``), on the same models,
and must produce the same arrays.

Data: MNIST (validation split, DPA k = 1200, translations by up to 1 pixel; needs
data/mnist, scripts/fetch_data.sh). Prints seconds per model, the ratio and the machine.

Run: python benchmarks/bench_dataset_cache.py [--models 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, mnist_validation_config  # noqa: E402

from dpcert.learning.data import load_dataset_cached  # noqa: E402
from dpcert.workflows.partition import _training_examples, training_indices  # noqa: E402
from dpcert.workflows.runconfig import RunConfig, load_run_data  # noqa: E402
from dpcert.workflows.setting import BaselineConfig  # noqa: E402


def prepare(cfg: RunConfig, setting: BaselineConfig, parts: list, models: int,
            evict: bool) -> tuple[float, list[np.ndarray]]:
    """Seconds per model to load the job's data and build the model's translated examples."""
    out, start = [], time.perf_counter()
    for i in range(models):
        if evict:
            load_dataset_cached.cache_clear()
        data = load_run_data(cfg)
        if evict:
            load_dataset_cached.cache_clear()
        out.append(_training_examples(cfg, setting, data, parts[i])[0])
    return (time.perf_counter() - start) / models, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--data-dir", default="data/mnist")
    args = ap.parse_args()
    cfg = mnist_validation_config(args.data_dir)
    setting = BaselineConfig(models=1200, learner="full-batch", augment_shift=1)
    parts = training_indices("dpa", setting, load_run_data(cfg).x_train)
    _training_examples(cfg, setting, load_run_data(cfg), parts[0])  # both datasets loaded once
    ours, a = prepare(cfg, setting, parts, args.models, evict=False)
    ref, b = prepare(cfg, setting, parts, args.models, evict=True)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    print(f"MNIST, DPA k = 1200, translations by up to 1 pixel, {args.models} models")
    print(f"  both datasets kept (ours):   {ours:.3f} s per model")
    print(f"  one dataset kept (evicted):  {ref:.3f} s per model   ratio {ref / ours:.1f}x")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
