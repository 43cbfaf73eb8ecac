"""Per-example Conv2d weight gradients: grouped convolution vs as_strided patch contraction,
same inputs, same run — the measurement behind ``dpcert.ghost.GROUPED_MIN_OUTPUT``.

Shapes: the convolutions of LeNet-5, digits_cnn and the Opacus CIFAR CNN, batch 128, one
thread (dpcert trains one instance per core). Prints ms per call (median of REPEATS), the
ratio, which method dpcert picks, and the machine.

Run: python benchmarks/bench_conv_grads.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from dpcert.ghost import (  # noqa: E402
    GROUPED_MIN_OUTPUT,
    conv_weight_grads_grouped,
    conv_weight_grads_patches,
)

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
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"machine: {machine()}, torch {torch.__version__}, 1 thread, batch 128")
    for name, cin, cout, k, pad, size in SHAPES:
        layer = nn.Conv2d(cin, cout, k, padding=pad)
        a = torch.rand(128, cin, size, size)
        g = torch.rand_like(layer(a))
        torch.testing.assert_close(conv_weight_grads_grouped(layer, a, g),
                                   conv_weight_grads_patches(layer, a, g), rtol=1e-4, atol=1e-3)
        grouped = ms_per_call(conv_weight_grads_grouped, layer, a, g)
        patches = ms_per_call(conv_weight_grads_patches, layer, a, g)
        pick = "grouped" if g.shape[2] * g.shape[3] >= GROUPED_MIN_OUTPUT else "patches"
        print(f"  {name:<17} out {g.shape[2]:>2}x{g.shape[3]:<2}  grouped {grouped:7.2f} ms   "
              f"patches {patches:7.2f} ms   patches/grouped {patches / grouped:5.2f}   "
              f"dpcert uses {pick}")


if __name__ == "__main__":
    main()
