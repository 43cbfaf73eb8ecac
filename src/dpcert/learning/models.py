"""DP-compatible models: no BatchNorm (it mixes examples, breaking per-example clipping).

* ``digits_cnn``: a small CNN for 8x8 digits.
* ``lenet5``: LeNet-5 for 28x28 MNIST / Fashion-MNIST (as in the paper).
* ``cifar_cnn``: the small CNN of the Opacus CIFAR-10 tutorial (GroupNorm-free, tanh).
* ``resnet18_gn``: ResNet-18 with GroupNorm in place of BatchNorm.
* ``linear``: softmax regression on fixed features (``features: scatter``).
* ``scatter_cnn``: a small CNN on ScatterNet feature vectors, their maps restored (the
  partition defences' few-shot learner; after Tramèr & Boneh 2021, who train a CNN on the same
  features).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dpcert.errors import UserError


def digits_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, num_classes),
    )


def lenet5(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def cifar_cnn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1),
        nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.Tanh(), nn.Conv2d(64, 64, 3, padding=1), nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.Tanh(), nn.Conv2d(128, 128, 3, padding=1),
        nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.Tanh(), nn.Linear(128, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(min(32, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(min(32, cout), cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.GroupNorm(min(32, cout), cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + self.short(x))


def resnet18_gn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False),
                               nn.GroupNorm(32, 64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def linear(in_channels: int, num_classes: int = 10) -> nn.Module:
    """Softmax regression on fixed features (n, D): ``in_channels`` is D. DP runs train it
    with :mod:`dpcert.learning.linear`; the aggregation baselines through this module."""
    return nn.Linear(in_channels, num_classes)


def scatter_grid(feature_dim: int) -> tuple[int, int]:
    """(channels, side) of the ScatterNet maps flattened into ``feature_dim`` numbers: 81
    channels per image channel (grey or RGB) on a square grid, D = channels * side^2."""
    for channels in (81, 243):
        side = math.isqrt(feature_dim // channels)
        if feature_dim == channels * side * side and side >= 1:
            return channels, side
    raise UserError(f"{feature_dim} numbers are not ScatterNet maps of a square image "
                    "(81 or 243 channels on a square grid)")


def scatter_cnn(in_channels: int, num_classes: int = 10, width: int = 32) -> nn.Module:
    """A CNN on ScatterNet feature vectors (n, D): ``in_channels`` is D, reshaped to the maps
    (channels, side, side) of :func:`scatter_grid`; two 3x3 convolutions of ``width``
    channels with a 2x2 max-pool between them, then a linear layer."""
    channels, side = scatter_grid(in_channels)
    pooled = max(1, side // 2)
    return nn.Sequential(
        nn.Unflatten(1, (channels, side, side)),
        nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2) if side >= 2 else nn.Identity(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * pooled * pooled, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "lenet5": lenet5,
    "cifar_cnn": cifar_cnn,
    "resnet18_gn": resnet18_gn,
    "linear": linear,
    "scatter_cnn": scatter_cnn,
}


def build_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes)
