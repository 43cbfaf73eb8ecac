"""Per-example Conv2d weight gradients: dpcert's grouped convolution vs an as_strided patch
contraction (the previous implementation, kept here as the reference), same inputs, same run.

Shapes: LeNet-5's two convolutions and one layer of the Opacus CIFAR CNN, batch 128, one
thread (dpcert trains one instance per core). Prints ms per call (median of REPEATS) and the
ratio, plus the machine.

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

from dpcert.ghost import _conv_weight_grads  # noqa: E402

REPEATS, CALLS = 9, 10
SHAPES = [("lenet5 conv1", 1, 6, 5, 2, 28), ("lenet5 conv2", 6, 16, 5, 0, 14),
          ("cifar_cnn conv3", 32, 64, 3, 1, 16)]


def patches_einsum(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Reference: contract an as_strided view of the padded input's patches with g."""
    ph, pw = layer.padding
    sh, sw = layer.stride
    kh, kw = layer.kernel_size
    ap = nn.functional.pad(a, (pw, pw, ph, ph))
    b, c = ap.shape[:2]
    ho, wo = g.shape[2], g.shape[3]
    s = ap.stride()
    patches = ap.as_strided((b, c, ho, wo, kh, kw), (s[0], s[1], s[2] * sh, s[3] * sw, s[2], s[3]))
    return torch.einsum("bchwuv,bohw->bocuv", patches, g)


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
        torch.testing.assert_close(_conv_weight_grads(layer, a, g), patches_einsum(layer, a, g),
                                   rtol=1e-4, atol=1e-3)
        ours, ref = ms_per_call(_conv_weight_grads, layer, a, g), ms_per_call(patches_einsum,
                                                                              layer, a, g)
        print(f"  {name:<16} grouped conv {ours:7.2f} ms   as_strided einsum {ref:7.2f} ms   "
              f"speed-up {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
