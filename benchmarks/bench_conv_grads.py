"""Per-example Conv2d weight gradients, four ways on the same inputs in the same run — the
measurement behind ``dpcert.learning.ghost.GROUPED_MIN_OUTPUT`` (the previous per-instance path) and
``dpcert.learning.stacked._weight_grad_method`` (the stacked engine's grouped layout):

* grouped: a convolution of the input with the output gradient as kernel, one group per example;
* patches: an ``as_strided`` patch view contracted with the output gradient;
* backward / backward_cl: torch's convolution backward (weight) of one convolution whose groups
  are the examples, in the default and in channels-last memory.

Shapes: the convolutions of LeNet-5, digits_cnn and the Opacus CIFAR CNN, one thread (dpcert
trains one instance per core on CPUs), batch 60 (LeNet-5 at q = 0.001 on 60,000) by default.
Prints ms per call (median of REPEATS), what each path picks, and the machine.

Run: python benchmarks/bench_conv_grads.py [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.learning.ghost import (  # noqa: E402
    GROUPED_MIN_OUTPUT,
    conv_weight_grads_grouped,
    conv_weight_grads_patches,
)
from dpcert.learning.stacked import _weight_grad_method, conv_weight_grads_backward  # noqa: E402

METHODS = {"grouped": conv_weight_grads_grouped, "patches": conv_weight_grads_patches,
           "backward": lambda layer, a, g: conv_weight_grads_backward(layer, a, g, False),
           "backward_cl": lambda layer, a, g: conv_weight_grads_backward(layer, a, g, True)}

REPEATS, CALLS = 9, 10
SHAPES = [("lenet5 conv1", 1, 6, 5, 2, 28), ("lenet5 conv2", 6, 16, 5, 0, 14),
          ("digits_cnn conv1", 1, 16, 3, 1, 8), ("digits_cnn conv2", 16, 32, 3, 1, 4),
          ("cifar_cnn conv1", 3, 32, 3, 1, 32), ("cifar_cnn conv2", 32, 32, 3, 1, 32),
          ("cifar_cnn conv3", 32, 64, 3, 1, 16), ("cifar_cnn conv5", 64, 128, 3, 1, 8)]


def ms_per_call(fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        for _ in range(CALLS):
            fn(*args)
        times.append((time.perf_counter() - t) / CALLS * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=60)
    batch = parser.parse_args().batch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"machine: {machine()}, torch {torch.__version__}, 1 thread, batch {batch}; "
          "ms per call")
    print(f"  {'layer':<17} {'output':<6} " + " ".join(f"{m:>11}" for m in METHODS)
          + "   previous path / stacked engine use")
    for name, cin, cout, k, pad, size in SHAPES:
        layer = nn.Conv2d(cin, cout, k, padding=pad)
        a = torch.rand(batch, cin, size, size)
        g = torch.rand_like(layer(a))
        want = conv_weight_grads_grouped(layer, a, g)
        times = {}
        for method, fn in METHODS.items():
            torch.testing.assert_close(fn(layer, a, g), want, rtol=1e-4, atol=1e-3)
            times[method] = ms_per_call(fn, layer, a, g)
        out = g.shape[2] * g.shape[3]
        previous = "grouped" if out >= GROUPED_MIN_OUTPUT else "patches"
        rule = _weight_grad_method(layer, out)
        stacked = previous if rule == "ghost" else rule
        print(f"  {name:<17} {g.shape[2]:>2}x{g.shape[3]:<3} "
              + " ".join(f"{t:11.2f}" for t in times.values())
              + f"   {previous} / {stacked} ({times[previous] / times[stacked]:.2f}x)")


if __name__ == "__main__":
    main()
