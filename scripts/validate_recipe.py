"""Choose the linear learner's recipe on a validation split carved from the TRAINING set.

The recipe shipped in configs/*_best.yaml must be fixed before the data it certifies is seen:
the test set is never read here. Train on the first 50,000 training examples (q scaled so the
expected batch stays q n = 60 of the full mechanism), validate on the last 10,000. For each
setting, K instances are trained with the same engine as `dpcert run`; their votes on the
validation split are scaled to P = 1000 (counts x 1000 / K, an approximation of a larger
ensemble with the same vote shares) and certified with the default certificate (PLD, sound)
at the full mechanism (q = 0.001, T = 1000, sigma), which is what the recipe is chosen for.

Run: python scripts/validate_recipe.py fashion-mnist --lr 0.25,0.5,1 --averaging none,tail
     python scripts/validate_recipe.py fashion-mnist --lr 0.25 --bias-feature 1,0.5
(under a minute per setting with K = 100 on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dpcert.certification.aggregation import tally_votes
from dpcert.certification.certify import certified_accuracy, certify
from dpcert.certification.mechanism import MechanismRecord
from dpcert.learning import linear
from dpcert.learning.data import load_dataset_cached

RADII = [0, 40, 80, 100, 150]


def validation_split(x: torch.Tensor, y: np.ndarray, validation: int):
    """(x_train, y_train as int64 tensor, x_val, y_val as numpy): the last ``validation``
    training examples are held out; the test set is never read."""
    n = len(y) - validation
    return x[:n], torch.tensor(y[:n]).long(), x[n:], y[n:]


def certify_validation(scores: np.ndarray, y_va: np.ndarray, mech: MechanismRecord
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Votes (N, L) of K instances' scores (K, N, L) and CA at RADII: the votes are scaled to
    P = 1000 (counts x 1000 / K, a larger ensemble with the same vote shares) and certified
    with the default certificate at the full mechanism ``mech``."""
    votes = tally_votes(scores)
    cert = certify(votes * (1000 // len(scores)), mech)
    return votes, certified_accuracy(cert, y_va, RADII)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    ap.add_argument("--data-dir", help="default: data/DATASET")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=3.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", default="0.25,0.5,1")
    ap.add_argument("--averaging", default="none,tail")
    ap.add_argument("--bias-feature", default="0.5",
                    help="values of the constant feature carrying the bias (1: plain bias)")
    ap.add_argument("--validation", type=int, default=10_000)
    args = ap.parse_args()

    data = load_dataset_cached(args.dataset, args.data_dir or f"data/{args.dataset}", "scatter")
    x_tr, y_tr, x_va, y_va = validation_split(torch.tensor(data.x_train), data.y_train,
                                              args.validation)
    n = len(y_tr)
    q_full, steps = 0.001, 1000
    mech = MechanismRecord(sample_rate=q_full, noise_multiplier=args.sigma, steps=steps,
                           clip_norm=args.clip, dataset_size=len(data.y_train))
    k = args.instances
    print(f"{args.dataset}: train {n}, validate {len(y_va)}, K = {k}, sigma = {args.sigma}, "
          f"C = {args.clip}")
    print("| lr | averaging | bias feature | ensemble acc | mean top share | "
          + " | ".join(f"CA@{r}" for r in RADII) + " | seconds |")
    print("|---|---|---|---|---|" + "---|" * len(RADII) + "---|")
    settings = [(float(lr), avg, float(s)) for lr in args.lr.split(",")
                for avg in args.averaging.split(",") for s in args.bias_feature.split(",")]
    for lr, avg, bias_feature in settings:
        cfg = linear.LinearDpSgd(q_full * len(data.y_train) / n, args.sigma, steps,
                                 args.clip, lr, averaging=None if avg == "none" else avg,
                                 bias_feature=bias_feature,
                                 declared_size=n)  # the split's size, set by the protocol
        t = time.perf_counter()
        w, b = linear.train_linear(cfg, x_tr, y_tr, data.num_classes, seed=0,
                                   instances=list(range(k)))
        seconds = time.perf_counter() - t
        scores = linear.predict_linear(w, b, x_va)
        votes, ca = certify_validation(scores, y_va, mech)
        print(f"| {lr} | {avg} | {bias_feature} | {np.mean(votes.argmax(1) == y_va):.3f} | "
              f"{np.mean(votes.max(1) / k):.3f} | "
              + " | ".join(f"{v:.3f}" for v in ca) + f" | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
