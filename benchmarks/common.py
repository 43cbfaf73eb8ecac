"""Shared helpers for the benchmarks: synthetic ensemble votes and machine description."""

from __future__ import annotations

import os
import platform

import numpy as np


def synthetic_votes(n_points: int, n_labels: int = 10, n_instances: int = 1000, seed: int = 0):
    """Votes of P instances per test point; top-label probability ~ Beta(6, 1.2)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n_points)
    top = rng.beta(6, 1.2, n_points)
    full = np.empty((n_points, n_labels))
    for i in range(n_points):
        others = np.delete(np.arange(n_labels), labels[i])
        full[i, labels[i]] = top[i]
        full[i, others] = rng.dirichlet(np.ones(n_labels - 1)) * (1 - top[i])
    votes = np.stack([rng.multinomial(n_instances, p) for p in full])
    return votes, labels


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def mnist_validation_config(data_dir: str):
    """The run options of the MNIST validation split (the last 10,000 training examples
    held out) on ScatterNet features; exits with the fetch command when the data is absent."""
    import sys
    from pathlib import Path

    from dpcert.workflows.runconfig import RunConfig

    if not Path(data_dir).exists():
        sys.exit(f"{data_dir} not found: run scripts/fetch_data.sh first")
    return RunConfig(dataset="mnist", data_dir=data_dir, model="linear", features="scatter",
                     optimizer="sgd", validation=10000)
