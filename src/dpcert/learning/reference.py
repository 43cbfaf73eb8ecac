"""The per-instance DP-SGD reference path, and non-private training for the baselines.

Runs train with :mod:`dpcert.learning.stacked`; this one-instance-at-a-time implementation (torch
generators per instance) stays as the reference the engine is benchmarked against.

Each step includes every training example independently with probability q (Poisson sampling:
batch sizes vary and may be 0), clips each per-example gradient to L2 norm C over all
parameters, adds N(0, sigma^2 C^2) to the sum, and divides by the *expected* batch size q n,
n the *declared* number of training examples (dividing by the realised batch size, or by the
count of examples present, would let one example rescale every step). Per-example gradient
norms and the clipped sum come from one forward and one backward pass for models made of
Linear/Conv2d layers (:mod:`dpcert.learning.ghost`), and from torch.func (``vmap`` of
``grad``) for any other model.
Every instance draws its sampling, subset and noise from its own generator seeded by (master seed,
instance index), so an instance is the same model whether it is trained alone or among others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpcert.errors import UserError
from dpcert.learning import ghost, philox
from dpcert.learning.models import build_model
from dpcert.learning.stacked import DpSgd, on_host


@dataclass(frozen=True)
class TrainConfig(DpSgd):
    """One instance's DP-SGD run (:class:`dpcert.learning.stacked.DpSgd`) of a built-in model."""

    model: str = "lenet5"


def instance_generator(seed: int, instance: int) -> torch.Generator:
    """Independent stream per (master seed, instance), via numpy's SeedSequence spawning."""
    state = np.random.SeedSequence([seed, instance]).generate_state(2, dtype=np.uint64)
    gen = torch.Generator()
    gen.manual_seed(int(state[0] % (2**63 - 1)))
    return gen


def _seeded_model(name: str, in_channels: int, num_classes: int,
                  gen: torch.Generator) -> nn.Module:
    """Initial weights drawn from the instance's own stream, on the host whatever the default
    device (:func:`dpcert.learning.stacked.on_host`); the caller's random state is kept."""
    start = torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device)
    with on_host(int(start)):
        return build_model(name, in_channels, num_classes)


def _optimizer(name: str, params, lr: float, weight_decay: float = 0.0
               ) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _subset(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance's own uniformly random m-subset (sub-dataset training), else all data."""
    if cfg.subset_size is not None and cfg.subset_size < len(y):
        keep = torch.randperm(len(y), generator=gen, device=gen.device)[: cfg.subset_size]
        return x[keep], y[keep]
    return x, y


def poisson_batch(n: int, q: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the examples sampled this step (each independently with probability q)."""
    return torch.nonzero(torch.rand(n, generator=gen, device=gen.device) < q).flatten()


def clipped_gradient_sum(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """sum_i g_i min(1, C / ||g_i||) over the batch, g_i the per-example gradient."""
    if len(y) == 0:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    sq = sum(g.reshape(len(y), -1).pow(2).sum(dim=1) for g in per_example.values())
    factor = torch.clamp(clip / (sq.sqrt() + 1e-12), max=1.0)
    return {k: torch.einsum("b,b...->...", factor, g) for k, g in per_example.items()}


def train_instance(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                   seed: int, instance: int) -> nn.Module:
    """Train one instance with DP-SGD on (x, y) — or on its own random subset of them."""
    gen = instance_generator(seed, instance)
    # Weights and noise are drawn on the host from the instance's stream and moved to the data's
    # device, so an instance is the same numbers on every device (up to float rounding).
    model = _seeded_model(cfg.model, x.shape[1], num_classes, gen).to(x.device)
    expected = philox.expected_batch(cfg.sample_rate, subset_size=cfg.subset_size,
                                     declared_size=cfg.declared_size)
    x, y = _subset(cfg, x, y, gen)
    n = len(y)
    opt = _optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    std = cfg.noise_multiplier * cfg.clip_norm
    use_ghost = ghost.supports(model)
    for _ in range(cfg.steps):
        idx = poisson_batch(n, cfg.sample_rate, gen)
        if use_ghost:
            summed = ghost.clipped_gradient_sum(model, x[idx], y[idx], cfg.clip_norm)
        else:
            params = {k: v.detach() for k, v in model.named_parameters()}
            summed = clipped_gradient_sum(model, params, x[idx], y[idx], cfg.clip_norm)
        for (name, p) in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=gen.device).to(p.device) * std
            p.grad = (summed[name] + noise) / expected
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


@torch.no_grad()
def predict_scores(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Softmax scores on x, shape (N, L), float32."""
    model.eval()
    out = [torch.softmax(model(x[i: i + batch]), dim=1) for i in range(0, len(x), batch)]
    return torch.cat(out).cpu().numpy().astype(np.float32)


@contextmanager
def repeatable_kernels() -> Iterator[None]:
    """cuDNN restricted to deterministic algorithms, chosen without benchmarking, inside the
    block (the previous settings restored after it).

    DPA, Finite Aggregation, Run-off Election and Bagging certify on the premise that each
    model is a fixed function of its examples (and its seed): a part the attacker did not
    touch must give the same model again. cuDNN's default convolution backward algorithms add
    with atomics, so on a GPU the same part could train to another model; CPU kernels are
    deterministic already."""
    backend = torch.backends.cudnn
    before = backend.deterministic, backend.benchmark
    backend.deterministic, backend.benchmark = True, False
    try:
        yield
    finally:
        backend.deterministic, backend.benchmark = before


def train_plain(model_name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                epochs: int, batch_size: int, lr: float, optimizer: str,
                gen: torch.Generator, weight_decay: float = 0.0) -> nn.Module:
    """Ordinary (non-private) minibatch training, for the aggregation baselines (DPA, Bagging,
    Finite Aggregation), with all randomness drawn from ``gen`` (on the host; the model
    trains on x's device) and repeatable kernels (:func:`repeatable_kernels`): the same
    examples and generator state give the same model. A batch size >= len(y) makes every
    epoch one full-batch step."""
    model = _seeded_model(model_name, x.shape[1], num_classes, gen).to(x.device)
    opt = _optimizer(optimizer, model.parameters(), lr, weight_decay)
    with repeatable_kernels():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen, device=gen.device).to(x.device)
            for i in range(0, len(y), batch_size):
                idx = order[i: i + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return model


def translations(x: np.ndarray, shift: int) -> np.ndarray:
    """Every translation of images x (n, C, H, W) by (dy, dx) in [-shift, shift]^2, pixels
    moved off the image dropped and uncovered ones 0: ((2 shift + 1)^2 n, C, H, W), offset
    block by offset block in row-major order of (dy, dx) (the (0, 0) block is x itself).
    A function of each image alone, so a partition model trained on the translations of its
    own examples is still a function of its part."""
    n, _, h, w = x.shape
    if not (isinstance(shift, int) and 0 <= shift < min(h, w)):
        raise UserError(f"a translation by up to {shift!r} pixels needs an integer in "
                        f"[0, {min(h, w) - 1}] for {h}x{w} images")
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    span = range(-shift, shift + 1)
    # the content at (i, j) of the image moved by (dy, dx) is that at (i - dy, j - dx)
    return np.concatenate([padded[:, :, shift - dy:shift - dy + h, shift - dx:shift - dx + w]
                           for dy in span for dx in span])


def nearest_neighbour_params(x: np.ndarray, y: np.ndarray, rows: int
                             ) -> dict[str, np.ndarray]:
    """A nearest-neighbour classifier on feature vectors x (n, D): the examples themselves,
    padded to ``rows`` >= n (label -1, never matched; a defence keeps each model at its own n
    and :func:`dpcert.learning.inference.stack_params` pads a stack) so that models have the
    same shapes. ``scale`` = 1 / tau, tau the mean squared distance of the examples to their
    class mean (1 if zero), only sets how soft the scores are
    (:func:`dpcert.learning.inference.score_instances` scores it)."""
    x = np.asarray(x, np.float32)
    if rows < len(x):
        raise UserError(f"a nearest-neighbour model of {len(x)} examples needs rows >= "
                        f"{len(x)}, got {rows}")
    examples = np.zeros((rows, x.shape[1]), np.float32)
    labels = np.full(rows, -1.0, np.float32)
    examples[:len(x)], labels[:len(x)] = x, y
    tau = 1.0
    if len(x):
        classes, inverse = np.unique(y, return_inverse=True)
        means = np.stack([x[inverse == i].mean(axis=0) for i in range(len(classes))])
        spread = float(np.mean(np.sum((x - means[inverse]) ** 2, axis=1)))
        tau = spread if spread > 1e-12 else 1.0
    return {"examples": examples, "labels": labels,
            "scale": np.array([1.0 / tau], np.float32)}


def prototype_params(x: np.ndarray, y: np.ndarray, num_classes: int,
                     metric: str = "euclidean") -> dict[str, np.ndarray]:
    """Nearest-class-mean classifier on feature vectors x (n, D), as linear parameters.

    ``euclidean``: argmin_c |x - mu_c|^2 = argmax_c (2 mu_c . x - |mu_c|^2), the linear model
    with weight 2 mu / tau (D, L) and bias -|mu|^2 / tau (L,); tau (the mean squared distance
    of the examples to their class mean) only sets how soft its softmax scores are.
    ``cosine``: argmax_c cos(x, mu_c) = argmax_c (mu_c / |mu_c|) . x, weight mu / |mu| / tau
    and bias 0, tau the mean of 1 - cos(x_i, mu_{y_i}). A label absent from x gets bias
    -1e30: never predicted. Sample-efficient learners for partition defences (every model
    sees few examples).
    """
    if metric not in ("euclidean", "cosine"):
        raise UserError(f"prototype metric must be euclidean or cosine, got {metric!r}")
    x = np.asarray(x, np.float64)
    counts = np.bincount(y, minlength=num_classes)
    means = np.zeros((num_classes, x.shape[1]))
    np.add.at(means, y, x)
    present = counts > 0
    means[present] /= counts[present, None]
    if metric == "euclidean":
        spread = float(np.mean(np.sum((x - means[y]) ** 2, axis=1)))
        weight, bias = 2.0 * means, -np.sum(means**2, axis=1)
    else:
        norms = np.linalg.norm(means, axis=1)
        weight = means / np.where(norms > 0, norms, 1.0)[:, None]
        x_norms = np.linalg.norm(x, axis=1)
        cos = np.sum(x * weight[y], axis=1) / np.where(x_norms > 0, x_norms, 1.0)
        spread, bias = float(np.mean(1.0 - cos)), np.zeros(num_classes)
    tau = spread if spread > 1e-12 else 1.0
    bias = np.where(present, bias / tau, -1e30)
    return {"weight": np.ascontiguousarray((weight / tau).T, dtype=np.float32),
            "bias": bias.astype(np.float32)}


#: Softness of a kernel-ridge model's scores: logit = KERNEL_SCALE * regression output (about
#: 1 at the label it predicts, 0 elsewhere); the votes and rankings do not depend on it.
KERNEL_SCALE = 10.0


def kernel_ridge_params(x: np.ndarray, y: np.ndarray, num_classes: int, rows: int, *,
                        gamma: float, ridge: float) -> dict[str, np.ndarray]:
    """Kernel ridge regression of the one-hot labels on feature vectors x (n, D), with the
    Gaussian kernel k(a, b) = exp(-gamma |a - b|^2): the model predicts
    argmax_c sum_i A_ic k(x, x_i), A = (K + ridge I)^-1 Y (n, L), K_ij = k(x_i, x_j)
    (scikit-learn's ``KernelRidge(kernel="rbf")`` without intercept; solved here in float64 by
    Cholesky so that the package does not need scikit-learn).

    Returns the examples and their coefficients padded to ``rows`` >= n (zero rows add
    nothing), ``gamma``, the scores' ``scale`` and a ``bias`` (L,) that is zero except for
    a model with no examples, which answers label 0 (a partition defence's empty part).
    The examples are put in an order set by their own content first, so that the model, to
    the last bit, depends on its part as a set and not on the order the dataset lists it in."""
    import hashlib

    from scipy.linalg import solve

    x = np.ascontiguousarray(x, np.float32)
    y = np.asarray(y)
    order = sorted(range(len(x)), key=lambda i: (hashlib.sha256(x[i].tobytes()).digest(),
                                                 int(y[i])))
    x, y = x[order].astype(np.float64), y[order]
    n = len(x)
    if rows < n:
        raise UserError(f"a kernel-ridge model of {n} examples needs rows >= {n}, got {rows}")
    if not (gamma > 0 and ridge > 0):
        raise UserError(f"kernel ridge needs gamma > 0 and ridge > 0, got {gamma}, {ridge}")
    examples = np.zeros((rows, x.shape[1]), np.float32)
    coef = np.zeros((rows, num_classes), np.float32)
    bias = np.zeros(num_classes, np.float32)
    if n:
        sq = np.sum(x * x, axis=1)
        gram = np.exp(-gamma * np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
        targets = np.eye(num_classes)[y]
        examples[:n] = x
        coef[:n] = solve(gram + ridge * np.eye(n), targets, assume_a="pos")
    else:
        bias[0] = 3.0  # logit 30 at label 0, as an empty part's constant model
    return {"examples": examples, "coef": coef, "bias": bias,
            "gamma": np.array([gamma], np.float32),
            "scale": np.array([KERNEL_SCALE], np.float32)}
