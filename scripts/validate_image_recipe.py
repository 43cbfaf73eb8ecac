"""Choose an image model's recipe (lr, augmentation) on a validation split of the TRAINING set.

Like scripts/validate_recipe.py (the linear learner), for the stacked engine's image models:
train K instances on the first n - 10,000 training examples (q scaled so the expected batch
stays that of the full mechanism), vote on the last 10,000, scale the votes to P = 1000 and
certify them (PLD, sound) at the full mechanism (q = 0.001, T = 1000, n = 60,000). The test
set is never read.

Run: python scripts/validate_image_recipe.py fashion-mnist --sigma 3 --clip 0.8 --lr 0.1 \\
         --augment 0x1,2x4 --instances 20
(--augment takes SHIFTxCOPIES settings; 0x1 is no augmentation.) With --scatter-cnn WIDTH the
model is instead a small CNN on the ScatterNet features (81 x 7 x 7): Conv2d(81, WIDTH, 3,
padding 1), tanh, 2 x 2 average pooling, Linear(9 WIDTH, L) — Tramer & Boneh's idea of a CNN
on scattering features, at the size a CPU can train.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from validate_recipe import RADII, certify_validation, validation_split  # scripts/

from dpcert.certification.mechanism import MechanismRecord
from dpcert.learning import stacked
from dpcert.learning.data import load_dataset_cached
from dpcert.learning.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    ap.add_argument("--data-dir", help="default: data/DATASET")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--sigma", type=float, default=3.0)
    ap.add_argument("--clip", type=float, default=0.8)
    ap.add_argument("--lr", default="0.1")
    ap.add_argument("--augment", default="0x1,2x4")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--validation", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scatter-cnn", type=int, metavar="WIDTH",
                    help="a small CNN of this width on ScatterNet features instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    features = "scatter" if args.scatter_cnn else None
    data = load_dataset_cached(args.dataset, args.data_dir or f"data/{args.dataset}", features)
    x = torch.tensor(data.x_train)
    if args.scatter_cnn:
        x = x.view(len(x), 81, 7, 7)
    x_tr, y_tr, x_va, y_va = validation_split(x, data.y_train, args.validation)
    n = len(y_tr)
    channels, width = x.shape[1], args.scatter_cnn

    def model_fn() -> nn.Module:
        if width:
            return nn.Sequential(nn.Conv2d(81, width, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                                 nn.Flatten(), nn.Linear(9 * width, data.num_classes))
        return build_model(args.model, channels, data.num_classes)

    mech = MechanismRecord(sample_rate=0.001, noise_multiplier=args.sigma, steps=args.steps,
                           clip_norm=args.clip, dataset_size=len(data.y_train))
    k = args.instances
    name = f"scatter CNN width {width}" if width else args.model
    print(f"{args.dataset}, {name}: train {n}, validate {len(y_va)}, K = {k}, "
          f"sigma = {args.sigma}, C = {args.clip}, T = {args.steps}")
    print("| lr | shift x copies | ensemble acc | instance acc | mean top share | "
          + " | ".join(f"CA@{r}" for r in RADII) + " | ms per instance-step |")
    print("|---|---|---|---|---|" + "---|" * len(RADII) + "---|")
    for lr in (float(v) for v in args.lr.split(",")):
        for aug in args.augment.split(","):
            shift, copies = (int(v) for v in aug.split("x"))
            cfg = stacked.DpSgd(0.001 * len(data.y_train) / n, args.sigma, args.steps,
                                args.clip, lr, augment_shift=shift, augment_copies=copies,
                                declared_size=n)  # the split's size, set by the protocol
            t = time.perf_counter()
            st = stacked.train_stacked(cfg, model_fn, x_tr, y_tr, seed=0,
                                       instances=list(range(k)))
            ms = 1e3 * (time.perf_counter() - t) / (k * args.steps)
            scores = stacked.predict_stacked(st, x_va)
            pred = scores.argmax(2)
            votes, ca = certify_validation(scores, y_va, mech)
            print(f"| {lr} | {shift}x{copies} | {np.mean(votes.argmax(1) == y_va):.3f} | "
                  f"{np.mean(pred == y_va[None]):.3f} | {np.mean(votes.max(1) / k):.3f} | "
                  + " | ".join(f"{v:.3f}" for v in ca) + f" | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
