"""DP-SGD for many instances of a linear softmax model as one batched computation.

The learner for fixed features (:mod:`dpcert.learning.features`): logits = x W + b, cross-entropy
loss. For that model the per-example gradient is the outer product [x_i, s] (p_i - onehot(y_i)), so
its norm is sqrt(||x_i||^2 + s^2) ||p_i - onehot(y_i)|| and the clipped sum over a batch is one
matrix product — no per-example gradient is materialised (ghost clipping, exact). K instances
train together as batched matrix products on whatever device the tensors live on.

Each step is the Sampled Gaussian Mechanism exactly as :class:`~dpcert.MechanismRecord`
describes it: every example of the instance's data is included independently with probability
q (Poisson; batches vary in size and may be empty), per-example gradients are clipped to C,
N(0, sigma^2 C^2) noise is added to the sum of every coordinate, and the result is divided by
the expected batch size q n, n the *declared* number of training examples (a configuration,
never a count of the data: :func:`dpcert.learning.philox.expected_batch`).

Randomness depends on (seed, instance) alone, never on which instances share a batch: each
instance owns a numpy stream (its subset, and its Poisson batches drawn as geometric gaps
between sampled indices — O(batch) per step instead of O(n)) and a torch stream on the device
(all of its noise for a step in one call).

Averaging of iterates (``averaging="tail"``: the uniform average of the iterates of the second
half of training, Polyak-Ruppert) is post-processing of the DP-SGD trajectory: it costs no
privacy, and the mechanism record stays exactly what ran.

The bias is learned through a constant input feature of value s (``bias_feature``; 1 is the
ordinary bias): each example is [x_i, s], the trained parameters are (W, beta) and the bias is
b = s beta. This is the same SGM on the same number of coordinates — clipping bounds the
gradient over (W, beta), noise N(0, sigma^2 C^2) lands on every coordinate — so q, sigma, T
and C, and so the certificate, do not depend on s. What s changes is how the clipping budget
and the noise are shared between weights and bias: b receives s^2 times the clipped bias
gradient and s times the noise. On unit-norm ScatterNet features s = 0.5 certified 0.01-0.04
more than s = 1 on validation splits of MNIST and Fashion-MNIST (docs/results.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError
from dpcert.learning.philox import batch_ceiling, expected_batch

AVERAGING = (None, "tail")
#: SeedSequence "purposes", so the streams of one instance never overlap.
_SAMPLING, _NOISE = 0, 1


@dataclass(frozen=True)
class LinearDpSgd:
    """What one linear instance's DP-SGD run does (privacy: q, sigma, T, C; the rest is free)."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    lr: float
    subset_size: int | None = None
    averaging: str | None = None
    bias_feature: float = 1.0
    #: the declared number of training examples the step is scaled by
    #: (:func:`dpcert.learning.philox.expected_batch`); not a count of the data
    declared_size: int | None = None

    @classmethod
    def from_record(cls, record: MechanismRecord, *, lr: float, averaging: str | None = None,
                    bias_feature: float = 1.0, declared_size: int | None = None
                    ) -> LinearDpSgd:
        """The run of the mechanism ``record`` (q, sigma, T, C and the subset size read off it:
        what is certified is what this trains) with the free settings given."""
        return cls(record.sample_rate, record.noise_multiplier, record.steps,
                   record.clip_norm, lr, record.subset_size, averaging, bias_feature,
                   declared_size=declared_size)

    def __post_init__(self) -> None:
        if self.averaging not in AVERAGING:
            raise UserError(f"averaging must be one of {AVERAGING}, got {self.averaging!r}")
        check_bias_feature(self.bias_feature)


def check_bias_feature(value: object) -> None:
    """The constant feature carrying the bias must be a finite number >= 0 (0: no bias)."""
    if not (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0):
        raise UserError(f"bias feature must be a finite number >= 0, got {value!r}")


def _numpy_stream(seed: int, instance: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, instance,
                                                                      _SAMPLING])))


def _torch_stream(seed: int, instance: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed, instance, _NOISE]).generate_state(1, dtype=np.uint64)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0] % (2**63 - 1)))
    return gen


def poisson_indices(n: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices in [0, n), each included independently with probability q.

    The gaps between consecutive included indices of a Bernoulli(q) sequence are i.i.d.
    Geometric(q) (numbers of trials to the next success), so their cumulative sums, cut at n,
    are exactly the included positions."""
    if q >= 1.0:
        return np.arange(n)
    chunk = batch_ceiling(n, q)
    pos = np.cumsum(rng.geometric(q, size=chunk)) - 1
    while pos[-1] < n:
        pos = np.concatenate([pos, pos[-1] + np.cumsum(rng.geometric(q, size=chunk))])
    return pos[pos < n]


def train_linear(cfg: LinearDpSgd, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                 seed: int, instances: list[int],
                 progress: Callable[[int], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the given instances together; returns weights (K, D, L) and biases (K, L).

    x: float32 features (n, D) and y: int64 labels (n,), on the device to train on. Instance
    i's result depends only on (seed, i), not on the other instances in ``instances``.
    ``progress(steps_done)`` is called after each step when given.
    """
    device = x.device
    n_all, dim = x.shape
    k = len(instances)
    rngs = [_numpy_stream(seed, i) for i in instances]
    gens = [_torch_stream(seed, i, device) for i in instances]
    if cfg.subset_size is not None and cfg.subset_size < n_all:
        # Each instance's own uniformly random m-subset, as row indices into x.
        rows = np.stack([np.sort(r.choice(n_all, cfg.subset_size, replace=False))
                         for r in rngs])
        n = cfg.subset_size
    else:
        rows, n = None, n_all
    # ||[x_i, s]||^2, a block of rows at a time (x.pow(2) at once is a copy of all features)
    s = cfg.bias_feature
    sq_norm = torch.cat([c.pow(2).sum(1) for c in x.split(4096)]) + s * s
    # Weights stored (K, L, D): both batched products then read contiguous operands
    # (the (K, D, B) transpose of the batch made the gradient product 6x slower on CPU).
    weight = torch.zeros(k, num_classes, dim, device=device)
    bias = torch.zeros(k, num_classes, device=device)
    avg_w, avg_b, averaged = torch.zeros_like(weight), torch.zeros_like(bias), 0
    start_avg = cfg.steps // 2
    step_size = cfg.lr / expected_batch(cfg.sample_rate, subset_size=cfg.subset_size,
                                        declared_size=cfg.declared_size)
    std = cfg.noise_multiplier * cfg.clip_norm
    eye = torch.eye(num_classes, device=device)
    # Every multi-MB tensor of a step lives in a buffer reused across steps: on the CPU a fresh
    # one is page-faulted in on every step (gathering K = 100 batches of ScatterNet rows took
    # 69 ms into a fresh tensor, 11 ms into a reused one). Same operations, same rounding:
    # the instances are bit-identical to allocating afresh (tested).
    batch_buf = torch.empty(0, device=device)
    grad_w = torch.empty_like(weight)
    noise = torch.empty(k, num_classes * (dim + 1), device=device)
    scratch = torch.empty_like(weight) if cfg.averaging == "tail" else None
    for step in range(cfg.steps):
        picks = [poisson_indices(n, cfg.sample_rate, r) for r in rngs]
        width = max(1, max(len(p) for p in picks))
        index = np.zeros((k, width), dtype=np.int64)
        mask = np.zeros((k, width), dtype=np.float32)
        for j, p in enumerate(picks):
            index[j, :len(p)] = p if rows is None else rows[j, p]
            mask[j, :len(p)] = 1.0
        index_t = torch.from_numpy(index).to(device)
        if batch_buf.numel() < k * width * dim:
            batch_buf = torch.empty(k * width * dim * 5 // 4, device=device)
        xb = batch_buf[:k * width * dim].view(k * width, dim)
        torch.index_select(x, 0, index_t.view(-1), out=xb)
        xb = xb.view(k, width, dim)
        _, grad_b = clipped_gradient_sum(
            weight, bias, xb, eye[y[index_t]], sq_norm[index_t],
            torch.from_numpy(mask).to(device), cfg.clip_norm, out=grad_w)
        for row, g in zip(noise, gens, strict=True):
            torch.randn(row.shape, generator=g, device=device, out=row)
        noise.mul_(std)
        grad_w += noise[:, :num_classes * dim].view(k, num_classes, dim)
        if s == 1.0:  # the same operations as before the option existed: same bits
            grad_b += noise[:, num_classes * dim:]
        else:  # b = s beta: b moves by s times beta's step, s (s sum + noise)
            grad_b = s * s * grad_b + s * noise[:, num_classes * dim:]
        weight -= grad_w.mul_(step_size)
        bias -= step_size * grad_b
        if cfg.averaging == "tail" and step >= start_avg:
            averaged += 1
            avg_w += torch.sub(weight, avg_w, out=scratch).div_(averaged)
            avg_b += (bias - avg_b) / averaged
        if progress is not None:
            progress(step + 1)
    if cfg.averaging == "tail":
        weight, bias = avg_w, avg_b
    return weight.transpose(1, 2).contiguous(), bias


def clipped_gradient_sum(weight: torch.Tensor, bias: torch.Tensor, xb: torch.Tensor,
                         onehot: torch.Tensor, sq_norm: torch.Tensor, mask: torch.Tensor,
                         clip: float, out: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i min(1, C / ||g_i||) g_i for K linear softmax models at once, g_i the gradient of
    example i's cross-entropy with respect to (W, beta), logits x W + s beta (s the bias
    feature, bias b = s beta) — without forming any g_i.

    g_i = (p_i - onehot_i) [x_i, s]^T, so ||g_i|| = ||p_i - onehot_i|| sqrt(||x_i||^2 + s^2).
    Shapes: weight (K, L, D), bias b (K, L), xb (K, B, D), onehot (K, B, L),
    sq_norm = ||x||^2 + s^2 (K, B), mask (K, B) (0 for padding). Returns the clipped sum for W
    (K, L, D) (into ``out`` when given) and sum_i min(1, C / ||g_i||) (p_i - onehot_i) (K, L),
    which is beta's clipped sum divided by s (b's gradient when s = 1)."""
    logits = torch.bmm(xb, weight.transpose(1, 2)) + bias[:, None, :]
    err = torch.softmax(logits, dim=2) - onehot  # d loss_i / d logits_i
    norm = (sq_norm * err.pow(2).sum(2)).sqrt()
    # NaN only from inf * 0 (an overflowing example the model fits exactly): its gradient is
    # then 0, and its factor must be too, or one example would turn every weight into NaN
    factor = torch.nan_to_num(torch.clamp(clip / norm.clamp_min(1e-12), max=1.0), nan=0.0)
    err = err * (mask * factor)[..., None]
    return torch.bmm(err.transpose(1, 2), xb, out=out), err.sum(1)


def instances_that_fit(n: int, dim: int, num_classes: int, sample_rate: float,
                       free_bytes: int, *, share: float = 0.5, cap: int = 1000) -> int:
    """How many instances :func:`train_linear` can train at once in ``share`` of
    ``free_bytes`` (at most ``cap``), from its float32 tensors per instance: weights, their
    gradient, noise, the tail average and its scratch (5 L (D + 1) values) and its slice of
    the batch buffer (1.25 W D values, W = the expected batch plus six standard deviations).
    The features themselves (n D) are already on the device."""
    width = min(n, batch_ceiling(n, sample_rate))
    per = 4 * (5 * num_classes * (dim + 1) + 1.25 * width * (dim + num_classes + 2))
    return int(max(1, min(cap, share * free_bytes // per)))


@torch.no_grad()
def predict_linear(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                   batch: int = 4096) -> np.ndarray:
    """Softmax scores (K, N, L), float32, of K linear models on features x (N, D)."""
    out = [torch.softmax(torch.einsum("nd,kdl->knl", x[i:i + batch], weight)
                         + bias[:, None, :], dim=2) for i in range(0, len(x), batch)]
    return torch.cat(out, dim=1).cpu().numpy().astype(np.float32)


def train_linear_ensemble(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                          x_eval: np.ndarray | torch.Tensor, *, instances: int,
                          sample_rate: float, noise_multiplier: float, steps: int,
                          clip_norm: float, lr: float, num_classes: int,
                          declared_size: int | None, seed: int = 0,
                          subset_size: int | None = None, averaging: str | None = None,
                          bias_feature: float = 1.0, batch_instances: int = 100,
                          device: str = "cpu",
                          progress: bool = False) -> tuple[np.ndarray, MechanismRecord]:
    """Train P linear DP-SGD instances on your own features and score ``x_eval`` with them.

    The library entry point (in the spirit of Opacus' ``make_private``): features x (n, D)
    and int labels y (n,), any device. Returns softmax scores (P, N, L) of every instance on
    x_eval (N, D) and the :class:`~dpcert.MechanismRecord` of what ran, which
    :func:`dpcert.certify` consumes (votes:
    ``dpcert.certification.aggregation.tally_votes(scores)``).

    ``num_classes`` (the label set 0..L-1) and ``declared_size`` (the number of training
    examples each noisy gradient sum is divided by, times q) are declared, never read off
    x and y: one example an attacker adds must not change every instance's shape or step
    size. None for ``declared_size`` is allowed only with ``subset_size``. A label outside
    the declared set is refused.
    """
    expected_batch(sample_rate, subset_size=subset_size, declared_size=declared_size)
    if not (isinstance(instances, int) and instances >= 1 and batch_instances >= 1):
        raise UserError("instances and batch_instances must be positive integers")
    dev = torch.device(device)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=dev)
    xe = torch.as_tensor(np.asarray(x_eval, dtype=np.float32), device=dev)
    if xt.ndim != 2 or xe.ndim != 2 or xe.shape[1] != xt.shape[1] or yt.shape != (len(xt),):
        raise UserError(f"need features x (n, D), labels y (n,), x_eval (N, D); got "
                        f"{tuple(xt.shape)}, {tuple(yt.shape)}, {tuple(xe.shape)}")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    from dpcert.learning.data import check_finite_examples

    check_finite_examples(xt.cpu().numpy(), "training example")
    if len(yt) and (int(yt.min()) < 0 or int(yt.max()) >= num_classes):
        bad = int(torch.nonzero((yt < 0) | (yt >= num_classes))[0, 0])
        raise UserError(f"training example {bad} has label {int(yt[bad])}, outside the "
                        f"declared label set 0..{num_classes - 1}")
    cfg = LinearDpSgd(sample_rate, noise_multiplier, steps, clip_norm, lr, subset_size,
                      averaging, bias_feature, declared_size=declared_size)
    record = MechanismRecord.of(cfg, len(yt))  # what this training runs, as certified
    from tqdm import tqdm

    out = []
    for start in tqdm(range(0, instances, batch_instances), desc="training instances",
                      unit="batch", disable=not progress):
        group = list(range(start, min(start + batch_instances, instances)))
        weight, bias = train_linear(cfg, xt, yt, num_classes, seed=seed, instances=group)
        out.append(predict_linear(weight, bias, xe))
    return np.concatenate(out), record
