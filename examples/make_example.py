"""Write a small synthetic ensemble output to certify (until `dpcert run` trains real ones).

The votes are *simulated*: each test point has a known clean top-label probability and P
instance votes are drawn from it, as P independently trained DP instances would vote. The
mechanism record is the public code's MNIST setting (q = 0.001, sigma = 2, T = 1000).
"""

import sys
from pathlib import Path

import numpy as np

from dpcert.mechanism import MechanismRecord


def main(out: Path, n_points: int = 500, n_labels: int = 10, n_instances: int = 1000) -> None:
    rng = np.random.default_rng(2023)
    labels = rng.integers(0, n_labels, n_points)
    top_prob = rng.beta(6, 1.2, n_points)  # mostly confident, a few hard points
    votes = np.zeros((n_points, n_labels), dtype=np.int64)
    for i in range(n_points):
        p = rng.dirichlet(np.ones(n_labels - 1)) * (1 - top_prob[i])
        probs = np.insert(p, labels[i], top_prob[i])
        votes[i] = rng.multinomial(n_instances, probs)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "votes.npy", votes)
    np.save(out / "labels.npy", labels)
    MechanismRecord(sample_rate=0.001, noise_multiplier=2.0, steps=1000, clip_norm=1.3,
                    dataset_size=60000).save(out / "mechanism.json")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/synthetic"))
