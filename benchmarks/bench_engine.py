"""Linear DP-SGD on ScatterNet-sized features: the batched engine vs one instance at a time.

Random unit-norm features of the size the `scatter` map gives MNIST (n = 60,000, D = 3969,
L = 10), q = 0.001 (expected batch 60), sigma = 3, C = 1. Both run in this process with the
same torch thread count, so the comparison is at equal cores:

* reference: dpcert's per-instance path (``train.train_instance`` with the ``linear`` model:
  ghost clipping from one backward pass, one instance after the other), the way every model
  trains on CPUs today;
* engine: ``linear.train_linear`` with K instances as one batched computation.

Reports instance-steps per second for both, the ratio, the extrapolation to the paper's
P = 1000 x T = 1000, and the machine. Run: python benchmarks/bench_engine.py [--threads 1]

``--device cuda``: the engine runs on the GPU (all K instances' batches, noise and weights on
the device; peak GPU memory reported); the reference stays on the CPU, since the per-instance
path keeps its model on the host (issue 9).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.learning import linear  # noqa: E402
from dpcert.learning.reference import TrainConfig, train_instance  # noqa: E402

N, DIM, CLASSES, Q, SIGMA = 60_000, 3969, 10, 0.001, 3.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--instances", type=int, default=100, help="K of the engine")
    ap.add_argument("--reference-instances", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="device of the engine (cpu or cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=gen)
    x /= x.norm(dim=1, keepdim=True)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    dev = torch.device(args.device)

    cfg = TrainConfig(Q, SIGMA, args.steps, 1.0, lr=0.25, optimizer="sgd", model="linear",
                      declared_size=len(y))
    t = time.perf_counter()
    for i in range(args.reference_instances):
        train_instance(cfg, x, y, CLASSES, seed=0, instance=i)
    ref = args.reference_instances * args.steps / (time.perf_counter() - t)

    lcfg = linear.LinearDpSgd(Q, SIGMA, args.steps, 1.0, 0.25, declared_size=len(y))
    xd, yd = x.to(dev), y.to(dev)
    linear.train_linear(linear.LinearDpSgd(Q, SIGMA, 2, 1.0, 0.25,
                                           declared_size=len(y)), xd, yd, CLASSES, seed=0,
                        instances=[0, 1])  # warm-up (CUDA context, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    linear.train_linear(lcfg, xd, yd, CLASSES, seed=0, instances=list(range(args.instances)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ours = args.instances * args.steps / (time.perf_counter() - t)

    where = (f"{torch.cuda.get_device_name(dev)}, peak GPU memory "
             f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
             if dev.type == "cuda" else "CPU")
    print(f"machine: {machine()}, torch threads {args.threads}; engine on {where}")
    print(f"setting: n={N}, D={DIM}, L={CLASSES}, q={Q} (batch ~{Q * N:.0f}), "
          f"{args.steps} steps")
    print(f"reference (train_instance, linear, one at a time): {ref:8.1f} instance-steps/s "
          f"-> P=1000 x T=1000 in {1e6 / ref / 60:6.1f} min")
    print(f"engine (train_linear, K={args.instances}, {dev.type}):          {ours:8.1f} "
          f"instance-steps/s -> P=1000 x T=1000 in {1e6 / ours / 60:6.1f} min")
    print(f"engine / reference: {ours / ref:.1f}x")


if __name__ == "__main__":
    main()
