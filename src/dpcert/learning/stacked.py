"""DP-SGD for K instances of one torch model as a single stacked computation, on any device.

The training engine for image models (the linear model on fixed features has its closed-form
twin in :mod:`dpcert.learning.linear`). Every step of every instance is the Sampled Gaussian
Mechanism that :class:`~dpcert.MechanismRecord` describes: Poisson sampling at rate q of the
instance's data, per-example clipping to C over all parameters, N(0, sigma^2 C^2) noise on
every coordinate of the sum, division by the expected batch size q n (n declared, never counted:
:func:`dpcert.learning.philox.expected_batch`).

* Everything in a step lives on the device: the K instances' parameters are stacked (K, ...)
  tensors, Poisson batches are drawn for all K at once and gathered into a padded (W, K) index
  (W the largest batch; a mask zeroes the padding), and noise for all K comes from one call.
* Randomness is counter-based (:mod:`dpcert.learning.philox`): instance i's batch at step t and its
  noise are functions of (seed, i, t) alone, so an instance is the same model whatever else shares
  its batch, on any worker, after any resume. Initial weights come from the model's own
  initialiser under a torch seed derived from (seed, i), drawn on the host.
* Clipping: for an ``nn.Sequential`` of Linear / Conv2d / parameter-free layers
  (:func:`dpcert.learning.ghost.supports`), per-example norms and the clipped sum come from one
  forward and one backward pass of the stacked model — Linear layers by the ghost norm
  ||g_i||^2 ||a_i||^2 and a batched matrix product (no per-example gradient is formed), Conv2d
  layers by their per-example weight gradients (a few thousand numbers per example). Any other
  model falls back to ``vmap(vmap(grad))`` over instances and examples.
* The optimizer (SGD or Adam) is applied to the stacked tensors: both act element by element,
  so each instance's update is exactly its own.
* Optional augmentation multiplicity (:class:`Augmentation`): each example's gradient is the
  mean over M random translations of it, taken before clipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError, check_device
from dpcert.learning import ghost, philox

ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class DpSgd:
    """One instance's DP-SGD run (privacy: q, sigma, T, C and the subset size; the rest free)."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float
    lr: float = 0.1
    optimizer: str = "sgd"
    subset_size: int | None = None
    augment_shift: int = 0
    augment_copies: int = 1
    #: the declared number of training examples the step is scaled by
    #: (:func:`dpcert.learning.philox.expected_batch`); not a count of the data
    declared_size: int | None = None

    @classmethod
    def from_record(cls, record: MechanismRecord, *, lr: float, optimizer: str = "sgd",
                    augment_shift: int = 0, augment_copies: int = 1,
                    declared_size: int | None = None) -> DpSgd:
        """The run of the mechanism ``record`` (q, sigma, T, C and the subset size read off it:
        what is certified is what this trains) with the free settings given."""
        return cls(record.sample_rate, record.noise_multiplier, record.steps,
                   record.clip_norm, lr, optimizer, record.subset_size, augment_shift,
                   augment_copies, declared_size=declared_size)

    def __post_init__(self) -> None:
        if not (isinstance(self.augment_shift, int) and self.augment_shift >= 0
                and isinstance(self.augment_copies, int) and self.augment_copies >= 1):
            raise UserError(f"augment_shift must be an integer >= 0 and augment_copies >= 1, "
                            f"got {self.augment_shift!r}, {self.augment_copies!r}")
        if self.augment_copies > 1 and self.augment_shift == 0:
            raise UserError("augment_copies > 1 needs augment_shift > 0")


@dataclass(frozen=True)
class Augmentation:
    """Augmentation multiplicity (De et al., "Unlocking high-accuracy differentially private
    image classification through scale", 2022): each sampled example is seen as ``copies``
    random translations by up to ``shift`` pixels (zero fill), and its gradient is the mean
    over its copies *before* clipping — still one example's contribution, bounded by C, so
    the mechanism (q, sigma, T, C) and its certificate are unchanged. The translations come
    from the counter-based generator (purpose AUGMENT), keyed by (seed, instance, step, slot
    of the example in the instance's batch, copy): independent of the data and of whatever
    else trains beside the instance."""

    shift: int
    copies: int = 1

    @classmethod
    def of(cls, cfg: DpSgd) -> Augmentation | None:
        return cls(cfg.augment_shift, cfg.augment_copies) if cfg.augment_shift > 0 else None


def shifted_copies(x_kb: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor], step: int,
                   aug: Augmentation) -> torch.Tensor:
    """M = aug.copies random translations of every example: x_kb (K, W, C, H, Wd) ->
    (K, W M, C, H, Wd), copy m of slot j at position j M + m, translated by (dy, dx), each
    uniform on [-shift, shift], from Philox block j M + m of (instance, step, AUGMENT)."""
    k, w, c, h, wd = x_kb.shape
    s, m = aug.shift, aug.copies
    u = philox.uniform(keys, step, philox.AUGMENT, w * m).view(k, w * m, 2)
    off = torch.floor(u * (2 * s + 1)).to(torch.int64)  # (K, W M, 2) in [0, 2s]
    padded = nn.functional.pad(x_kb, (s, s, s, s))
    dev = x_kb.device
    rows = off[..., 0, None] + torch.arange(h, device=dev)  # (K, W M, H)
    cols = off[..., 1, None] + torch.arange(wd, device=dev)  # (K, W M, Wd)
    slot = (torch.arange(w * m, device=dev) // m)[None, :, None, None, None]
    kk = torch.arange(k, device=dev)[:, None, None, None, None]
    cc = torch.arange(c, device=dev)[None, None, :, None, None]
    return padded[kk, slot, cc, rows[:, :, None, :, None], cols[:, :, None, None, :]]


@dataclass
class Stacked:
    """K trained instances: the model's structure and its parameters stacked along dim 0."""

    base: nn.Module
    params: dict[str, torch.Tensor]

    @property
    def instances(self) -> int:
        return next(iter(self.params.values())).shape[0]


def init_seed(seed: int, instance: int) -> int:
    """The torch seed under which instance ``instance`` builds its initial weights."""
    state = np.random.SeedSequence([seed, instance, 0]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@contextmanager
def on_host(seed: int | None = None) -> Iterator[None]:
    """Build modules on the host CPU, their weights drawn by the host generator (seeded with
    ``seed`` when given), whatever default device the caller has set: under
    ``torch.set_default_device("cuda")`` layers would otherwise draw from the CUDA generator,
    i.e. other weights than a CPU run's. Only the host generator is touched, inside a fork, so
    the caller's random state stays as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        yield


def init_stacked(model_fn: ModelFn, seed: int, instances: list[int],
                 device: torch.device) -> Stacked:
    """Each instance's model built under its own seed on the host (:func:`on_host`), stacked,
    moved to device."""
    models = []
    for i in instances:
        with on_host(init_seed(seed, i)):
            models.append(model_fn())
    names = [k for k, _ in models[0].named_parameters()]
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]).to(device)
              for k in names}
    return Stacked(models[0].to(device).eval(), params)


# -- stacked forward pass (ghost-compatible models) ---------------------------------------------


#: How Conv2d layers of K instances run: "grouped" (one grouped convolution, groups = K; the
#: fastest on CPU, where K is small) or "patches" (im2col: each instance's patches gathered
#: once into a (K, B Ho Wo, C kh kw) matrix that serves both the forward product and the
#: per-example weight gradients, all as batched matrix products; no per-sample loops or
#: many-group kernels, which made ``F.unfold`` and a grouped convolution with B K groups
#: 0.7-1.3 ms per instance-step on an H200); "auto": patches on CUDA, grouped elsewhere;
#: "vmap": no stacked forward at all, every model by materialised per-example gradients
#: (nested ``vmap``). All are exact and tested against each other; the environment variable
#: DPCERT_CONV_IMPL sets it (benchmarks and GPU checks compare them).
CONV_IMPL = os.environ.get("DPCERT_CONV_IMPL", "auto")
CONV_IMPLS = ("auto", "grouped", "patches", "vmap")


def _conv_impl(device: torch.device) -> str:
    if CONV_IMPL not in CONV_IMPLS:
        raise UserError(f"DPCERT_CONV_IMPL must be one of {', '.join(CONV_IMPLS)}, got "
                        f"{CONV_IMPL!r}")
    if CONV_IMPL != "auto":
        return CONV_IMPL
    return "patches" if device.type == "cuda" else "grouped"


def _stacked_forward_ok(model: nn.Module, device: torch.device) -> bool:
    """Whether the stacked forward (and ghost norms) serve this model."""
    return ghost.supports(model) and _conv_impl(device) != "vmap"


def _columns(layer: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """im2col of K instances' examples: h (K, B, C, H, W) -> (K, B, Ho, Wo, C kh kw).

    The receptive fields as a strided view (``Tensor.unfold``; its backward has its own
    kernel), copied once into the order that both products below read without another copy."""
    ph, pw = layer.padding
    hp = nn.functional.pad(h, (pw, pw, ph, ph)) if ph or pw else h
    view = hp.unfold(3, layer.kernel_size[0], layer.stride[0]).unfold(
        4, layer.kernel_size[1], layer.stride[1])  # (K, B, C, Ho, Wo, kh, kw)
    return view.permute(0, 1, 3, 4, 2, 5, 6).flatten(4)


def _conv(layer: nn.Conv2d, w: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """K convolutions, each on its own examples: h (K, B, C, H, W) -> (K, B, O, Ho, Wo).

    Also returns what the per-example weight gradients need: the input h (grouped) or its
    columns (patches, :func:`_columns`)."""
    k, b = h.shape[:2]
    o = w.shape[1]
    if _conv_impl(h.device) == "grouped":
        hb = h.transpose(0, 1).reshape(b, -1, *h.shape[3:])
        out = nn.functional.conv2d(hb, w.reshape(-1, *w.shape[2:]),
                                   None if bias is None else bias.reshape(-1), layer.stride,
                                   layer.padding, groups=k)
        return out.view(b, k, o, *out.shape[2:]).transpose(0, 1), h
    cols = _columns(layer, h)
    ho, wo = cols.shape[2:4]
    flat = cols.reshape(k, b * ho * wo, -1)
    out = (torch.bmm(flat, w.reshape(k, o, -1).transpose(1, 2)) if bias is None else
           torch.baddbmm(bias[:, None, :], flat, w.reshape(k, o, -1).transpose(1, 2)))
    # channels last in memory: (K, B, Ho, Wo, O) seen as (K, B, O, Ho, Wo), no copy
    return out.view(k, b, ho, wo, o).permute(0, 1, 4, 2, 3), cols


def _conv_weight_grads(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (K, B, O, C kh kw) from what :func:`_conv` kept and the
    output gradient g (K, B, O, Ho, Wo). Patches layout: dW_kb = g_kb (O x Ho Wo) times cols_kb
    (Ho Wo x C kh kw), one batched product over the K B examples; grouped layout: by
    :func:`_weight_grad_method`."""
    k, b, o = g.shape[:3]
    if _conv_impl(g.device) == "patches":  # a: columns (K, B, Ho, Wo, C kh kw)
        gt = g.permute(0, 1, 3, 4, 2).reshape(k * b, -1, o)  # (K B, Ho Wo, O)
        return torch.bmm(gt.transpose(1, 2), a.reshape(k * b, gt.shape[1], -1)).view(k, b, o, -1)
    method = _weight_grad_method(layer, g.shape[3] * g.shape[4])
    if method == "ghost":
        gw = ghost._conv_weight_grads(layer, a.flatten(0, 1), g.flatten(0, 1))
    else:
        gw = conv_weight_grads_backward(layer, a.flatten(0, 1), g.flatten(0, 1),
                                        channels_last=method == "backward_cl")
    return gw.reshape(k, b, o, -1)


def conv_weight_grads_backward(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor,
                               channels_last: bool) -> torch.Tensor:
    """Per-example weight gradients (N, O, C, kh, kw) from inputs a (N, C, H, W) and output
    gradients g (N, O, Ho, Wo): the weight gradient of one convolution whose N groups are the
    examples, by torch's convolution backward."""
    n, c = a.shape[:2]
    o = g.shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gw = torch.nn.grad.conv2d_weight(
        a.reshape(1, n * c, *a.shape[2:]).contiguous(memory_format=fmt),
        (n * o, c, *layer.kernel_size),
        g.reshape(1, n * o, *g.shape[2:]).contiguous(memory_format=fmt),
        layer.stride, layer.padding, layer.dilation, groups=n)
    return gw.view(n, o, c, *layer.kernel_size)


def _weight_grad_method(layer: nn.Conv2d, out_pixels: int) -> str:
    """How the grouped layout forms a layer's per-example weight gradients, by a fixed rule on
    its shape (not by timing, so runs repeat bit for bit).

    The weight gradient of a convolution with the K B examples as groups is each example's own
    (torch's convolution backward, oneDNN on the CPU): in channels-last memory for few channels
    and small maps (LeNet-5: 2x faster than :mod:`dpcert.learning.ghost`'s grouped convolution),
    in the default layout for 3x3 kernels from 16-32 to 32-64 channels (2-3x faster for
    digits_cnn and the CIFAR CNN; wider layers timed erratically, 5-19 ms against a steady 9);
    :mod:`dpcert.learning.ghost`'s rule elsewhere (``benchmarks/bench_conv_grads.py``)."""
    kh, kw = layer.kernel_size
    if layer.in_channels <= 8 and layer.out_channels * out_pixels <= 10_000:
        return "backward_cl"
    if layer.in_channels >= 16 and layer.in_channels * layer.out_channels <= 2048 \
            and kh * kw <= 9:
        return "backward"
    return "ghost"


def _pair(v: int | tuple[int, ...]) -> tuple[int, ...]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _TilingAvgPool(torch.autograd.Function):
    """Mean over non-overlapping kh x kw windows of (N, C, H, W), bottom/right remainder
    dropped: forward as kh kw strided adds, backward as kh kw strided writes."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        ctx.shape, ctx.kh, ctx.kw = h.shape, kh, kw
        ho, wo = h.shape[-2] // kh, h.shape[-1] // kw
        out = None
        for u in range(kh):
            for v in range(kw):
                part = h[..., u:ho * kh:kh, v:wo * kw:kw]
                out = part if out is None else out + part
        return out / (kh * kw)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        kh, kw, (hi, wi) = ctx.kh, ctx.kw, ctx.shape[-2:]
        n, c, ho, wo = g.shape
        whole = (ho * kh, wo * kw) == (hi, wi)
        gi = (torch.empty if whole else torch.zeros)(ctx.shape, dtype=g.dtype, device=g.device)
        windows = gi[:, :, :ho * kh, :wo * kw].unflatten(3, (wo, kw)).unflatten(2, (ho, kh))
        share = g / (kh * kw)
        for u in range(kh):  # kh kw strided writes: 3x faster than one broadcast copy
            for v in range(kw):
                windows[:, :, :, u, :, v] = share
        return gi, None, None


def _tiling_avg_pool(layer: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """``layer(h)`` for an AvgPool2d whose windows tile the input (kernel = stride, no padding,
    default divisor), by :class:`_TilingAvgPool`; None for any other layer.

    Same numbers, ~3x faster forward and backward on the CPU than torch's avg_pool2d for
    LeNet-5's small maps, whose kernels took a fifth of a step (0.25 ms each way per pool at
    batch 60, one thread)."""
    if not isinstance(layer, nn.AvgPool2d) or h.dim() != 4:
        return None
    kh, kw = _pair(layer.kernel_size)
    if (_pair(layer.stride or layer.kernel_size) != (kh, kw) or _pair(layer.padding) != (0, 0)
            or layer.ceil_mode or layer.divisor_override is not None):
        return None
    return _TilingAvgPool.apply(h, kh, kw)


def _forward(base: nn.Sequential, params: dict[str, torch.Tensor], x_kb: torch.Tensor,
             record: list | None = None) -> torch.Tensor:
    """Logits (K, B, L) of K instances on their own examples x_kb (K, B, *input shape).

    Conv layers run by :func:`_conv`, Linear layers as batched matrix products, the rest on
    the K B examples flattened into one batch. With ``record``, appends (name, layer, kept,
    output) for each layer with parameters: for Linear, the input (K, B, D) and the output
    (K, B, O); for Conv2d, what :func:`_conv` kept and the output (K, B, O, Ho, Wo)."""
    h = x_kb
    k, b = x_kb.shape[:2]
    for name, layer in base.named_children():
        w, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
        if isinstance(layer, nn.Conv2d):
            out, kept = _conv(layer, w, bias, h)
        elif isinstance(layer, nn.Linear):
            kept = h.reshape(k, b, -1)
            out = (torch.bmm(kept, w.transpose(1, 2)) if bias is None else
                   torch.baddbmm(bias[:, None, :], kept, w.transpose(1, 2)))
        else:
            flat = h.flatten(0, 1)
            pooled = _tiling_avg_pool(layer, flat)
            h = (layer(flat) if pooled is None else pooled).unflatten(0, (k, b))
            continue
        if record is not None:
            record.append((name, layer, kept, out))
        h = out
    return h.reshape(k, b, -1)


def _ghost_clipped_sum(st: Stacked, x_kb: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                       clip: float, copies: int = 1) -> dict[str, torch.Tensor]:
    """sum_i min(1, C / ||g_i||) g_i per instance: {name: (K, *param shape)}.

    x_kb (K, B M, ...) and y (K, B M): each example's M copies side by side; mask (K, B).
    g_i is the mean of example i's M copies' gradients. For a Linear layer that mean is
    (1/M) sum_m g_m a_m^T, whose squared norm is (1/M^2) sum_{m,m'} (g_m . g_m')(a_m . a_m')
    — two M x M Gram matrices per example, so still no per-example gradient is formed."""
    params = {k: v.detach().requires_grad_(True) for k, v in st.params.items()}
    record: list = []
    logits = _forward(st.base, params, x_kb, record)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    grads = torch.autograd.grad(loss, [r[3] for r in record])
    k, b = mask.shape
    m = copies
    sq = torch.zeros_like(mask, dtype=logits.dtype)
    parts = []
    for (name, layer, a, _), g in zip(record, grads, strict=True):
        a = a.detach()
        if isinstance(layer, nn.Linear):  # a (K, B M, D), g (K, B M, O)
            if m == 1:
                sq = sq + g.pow(2).sum(2) * a.pow(2).sum(2)
            else:
                gm, am = g.view(k, b, m, -1), a.view(k, b, m, -1)
                gram = (gm @ gm.transpose(2, 3)) * (am @ am.transpose(2, 3))
                sq = sq + gram.sum((2, 3)) / m**2
            gw, gb = None, g.view(k, b, m, -1).mean(2)
        else:  # g (K, B M, O, Ho, Wo); per-example dW (K, B, O, C kh kw), mean over copies
            gw = _conv_weight_grads(layer, a, g)
            if m > 1:
                gw = gw.view(k, b, m, *gw.shape[2:]).mean(2)
            gb = g.sum(dim=(3, 4)).view(k, b, m, -1).mean(2)
            sq = sq + gw.pow(2).sum((2, 3))
        if layer.bias is not None:
            sq = sq + gb.pow(2).sum(2)
        parts.append((name, layer, a, g, gw, gb))
    factor = torch.clamp(clip / sq.sqrt().clamp_min(1e-12), max=1.0) * mask
    per_copy = factor.repeat_interleave(m, dim=1) / m if m > 1 else factor
    out = {}
    for name, layer, a, g, gw, gb in parts:
        if gw is None:
            out[f"{name}.weight"] = torch.bmm((g * per_copy[..., None]).transpose(1, 2), a)
        else:
            out[f"{name}.weight"] = torch.bmm(factor[:, None, :], gw.flatten(2)).view(
                k, *layer.weight.shape)
        if layer.bias is not None:
            out[f"{name}.bias"] = torch.bmm(factor[:, None, :], gb).squeeze(1)
    return out


def _vmap_clipped_sum(st: Stacked, x_kb: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      clip: float, copies: int = 1) -> dict[str, torch.Tensor]:
    """The same sum for any model, by materialised per-example gradients (nested vmap): each
    example's gradient is that of the mean loss over its M copies."""

    def loss(p, xi, yi):  # one example's copies: xi (M, ...), yi (M,)
        return nn.functional.cross_entropy(functional_call(st.base, p, (xi,)), yi)

    k, b = mask.shape
    xg = x_kb.view(k, b, copies, *x_kb.shape[2:])
    per = vmap(vmap(grad(loss), in_dims=(None, 0, 0)))(st.params, xg, y.view(k, b, copies))
    sq = sum(v.flatten(2).pow(2).sum(2) for v in per.values())
    factor = torch.clamp(clip / sq.sqrt().clamp_min(1e-12), max=1.0) * mask
    return {k: torch.einsum("kb,kb...->k...", factor, v) for k, v in per.items()}


def clipped_gradient_sum(st: Stacked, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                         mask: torch.Tensor, clip: float, aug: Augmentation | None = None,
                         keys: tuple[torch.Tensor, torch.Tensor] | None = None, step: int = 0
                         ) -> dict[str, torch.Tensor]:
    """Clipped per-example gradient sums of K instances on rows ``index`` (K, W) of (x, y);
    ``mask`` (K, W) marks real examples (padding contributes nothing). With ``aug``, each
    example's gradient is the mean over its augmented copies (:func:`shifted_copies`, drawn
    from the instances' ``keys`` at ``step``) before clipping."""
    maskf = mask.to(x.dtype)
    xb, yb, m = x[index], y[index], 1
    if aug is not None:
        m = aug.copies
        xb = shifted_copies(xb, keys, step, aug)
        yb = yb.repeat_interleave(m, dim=1)
    if _stacked_forward_ok(st.base, x.device):
        return _ghost_clipped_sum(st, xb, yb, maskf, clip, m)
    return _vmap_clipped_sum(st, xb, yb, maskf, clip, m)


# -- training -----------------------------------------------------------------------------------


def _subset_rows(keys, n: int, m: int) -> torch.Tensor:
    """Each instance's uniformly random m-subset of [0, n), sorted: (K, m) row indices (a
    random permutation by sorting n counter-based uniforms per instance)."""
    u = philox.uniform(keys, 0, philox.SUBSET, (n + 1) // 2)[:, :n]
    return torch.sort(torch.argsort(u, dim=1)[:, :m], dim=1).values


def train_stacked(cfg: DpSgd, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *,
                  seed: int, instances: list[int],
                  progress: Callable[[int], None] | None = None) -> Stacked:
    """Train the given instances of ``model_fn()`` together on (x, y) (on their device).

    x (n, *input shape) float32, y (n,) int64. Instance i's result depends on (seed, i) only.
    ``progress(steps_done)`` is called after each step when given."""
    device = x.device
    st = init_stacked(model_fn, seed, instances, device)
    keys = philox.instance_keys(seed, instances, device)
    expected = philox.expected_batch(cfg.sample_rate, subset_size=cfg.subset_size,
                                     declared_size=cfg.declared_size)
    n = len(y)
    rows = None
    if cfg.subset_size is not None and cfg.subset_size < n:
        rows, n = _subset_rows(keys, n, cfg.subset_size), cfg.subset_size
    leaves = [v.requires_grad_(False) for v in st.params.values()]
    opt = (torch.optim.Adam(leaves, lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(leaves, lr=cfg.lr))
    sizes = [v[0].numel() for v in st.params.values()]
    std = cfg.noise_multiplier * cfg.clip_norm
    aug = Augmentation.of(cfg)
    for step in range(cfg.steps):
        index, mask = philox.poisson_positions(keys, step, n, cfg.sample_rate)
        if rows is not None:
            index = torch.gather(rows, 1, index)
        summed = clipped_gradient_sum(st, x, y, index, mask, cfg.clip_norm, aug, keys, step)
        noise = philox.normal(keys, step, philox.NOISE, sum(sizes), dtype=x.dtype) * std
        for (name, p), chunk in zip(st.params.items(), noise.split(sizes, dim=1), strict=True):
            p.grad = (summed[name] + chunk.view_as(p)) / expected
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1)
    return st


@torch.no_grad()
def predict_stacked(st: Stacked, x: torch.Tensor, batch: int | None = None) -> np.ndarray:
    """Softmax scores (K, N, L), float32 on the host, of every instance on x (N, ...).

    ``batch`` inputs at a time (default: 2^16 / K, at most 512: K instances x batch examples
    is what one training step of the paper's batches holds, so prediction needs no more
    memory than training)."""
    k = st.instances
    batch = batch or max(1, min(512, 2**16 // k))
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if _stacked_forward_ok(st.base, x.device):
            logits = _forward(st.base, st.params, xb[None].expand(k, *xb.shape))
        else:
            logits = vmap(lambda p, xx: functional_call(st.base, p, (xx,)),
                          in_dims=(0, None))(st.params, xb)
        out.append(torch.softmax(logits, dim=2).cpu())
    return torch.cat(out, dim=1).numpy().astype(np.float32)


class CudaMemory:
    """The CUDA allocator's counters that :func:`instances_that_fit` reads (a fake with the
    same three methods lets the CPU tests run its probe)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> int:
        """Reset the peak counter; bytes allocated now."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        """Most bytes allocated since :meth:`start`."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]


def instances_that_fit(cfg: DpSgd, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *,
                       probe: int = 8, share: float = 0.5, cap: int = 1000,
                       memory: CudaMemory | None = None) -> int:
    """How many instances to stack on x's device (``--batch-instances auto``).

    CPU: 1 — stacking does not make one core faster (docs/benchmarks.md), so runs use one
    process per core. CUDA: one probe step of ``probe`` instances at a batch six standard
    deviations above the expected size measures the memory an instance needs; K fills
    ``share`` of the free memory, at most ``cap``. ``memory`` (default: the CUDA allocator of
    x's device) is where the probe's bytes are read."""
    device = x.device
    if memory is None:
        if device.type != "cuda":
            return 1
        memory = CudaMemory(device)
    n = cfg.subset_size or len(y)
    width = min(n, philox.batch_ceiling(n, cfg.sample_rate))
    before = memory.start()
    st = init_stacked(model_fn, 0, list(range(probe)), device)
    index = torch.arange(width, device=device).expand(probe, width)
    mask = torch.ones(probe, width, dtype=torch.bool, device=device)
    keys = philox.instance_keys(0, list(range(probe)), device)
    summed = clipped_gradient_sum(st, x, y, index, mask, cfg.clip_norm, Augmentation.of(cfg),
                                  keys)
    noise = philox.normal(keys, 0, philox.NOISE, sum(v[0].numel() for v in st.params.values()))
    # optimizer state (Adam: two moments) and gradients: up to three more copies of the params
    extra = 3 * sum(v.numel() * v.element_size() for v in st.params.values())
    per = (memory.peak() - before + extra) / probe
    del st, summed, noise
    return int(max(1, min(cap, share * memory.free() // per)))


def train_ensemble(model_fn: ModelFn, x, y, x_eval, *, instances: int, sample_rate: float,
                   noise_multiplier: float, steps: int, clip_norm: float,
                   declared_size: int | None, lr: float = 0.1,
                   optimizer: str = "sgd", seed: int = 0, subset_size: int | None = None,
                   augment_shift: int = 0, augment_copies: int = 1,
                   batch_instances: int | str = "auto", device: str = "cpu",
                   progress: bool = False) -> tuple[np.ndarray, MechanismRecord]:
    """Train P DP-SGD instances of your own model and score ``x_eval`` with every one.

    The library entry point for your own PyTorch model and tensors (in the spirit of Opacus'
    ``make_private``): ``model_fn()`` builds one freshly initialised instance (an
    ``nn.Sequential`` of Linear / Conv2d / parameter-free layers takes the fast path, any
    other module the ``vmap`` path; no BatchNorm — it mixes examples; layers run in eval mode,
    so Dropout is off). x (n, ...) float
    inputs, y (n,) int labels, x_eval (N, ...). Returns softmax scores (P, N, L) and the
    :class:`~dpcert.MechanismRecord` of what ran, which :func:`dpcert.certify`
    consumes (votes: ``dpcert.certification.aggregation.tally_votes(scores)``). Instance i
    depends on (seed, i) only, whatever ``batch_instances`` and ``device``. ``augment_shift``
    > 0 trains on random translations of image inputs (N, C, H, W), ``augment_copies`` of them
    per example averaged before clipping (:class:`Augmentation`; the mechanism record is
    unchanged).

    ``declared_size``: the number of training examples you declare, which each noisy
    gradient sum is divided by (times q); pass a number fixed before seeing the data (e.g. the
    size of the clean training set you intend), never ``len(x)`` of data an attacker may have
    extended. None is allowed only with ``subset_size``. The label set is the one your
    ``model_fn`` declares by its output size.
    """
    if not (isinstance(instances, int) and instances >= 1):
        raise UserError(f"instances must be a positive integer, got {instances!r}")
    if optimizer not in ("sgd", "adam"):
        raise UserError(f"optimizer must be sgd or adam, got {optimizer!r}")
    if not (batch_instances == "auto" or (isinstance(batch_instances, int)
                                          and batch_instances >= 1)):
        raise UserError(f"batch_instances must be a positive integer or 'auto', got "
                        f"{batch_instances!r}")
    cfg = DpSgd(sample_rate, noise_multiplier, steps, clip_norm, lr, optimizer, subset_size,
                augment_shift, augment_copies,  # checks the augmentation options
                declared_size=declared_size)
    philox.expected_batch(sample_rate, subset_size=subset_size, declared_size=declared_size)
    with on_host():  # a throwaway instance
        probe = model_fn()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in probe.modules()):
        raise UserError("BatchNorm mixes the examples of a batch, so per-example clipping "
                        "does not bound one example's effect: use GroupNorm or none")
    check_device(device, asked=f"device {device!r} asked for")
    dev = torch.device(device)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(y), device=dev)
    xe = torch.as_tensor(np.asarray(x_eval, dtype=np.float32), device=dev)
    if (yt.ndim != 1 or len(yt) != len(xt) or xe.shape[1:] != xt.shape[1:]
            or yt.dtype.is_floating_point or len(yt) == 0 or int(yt.min()) < 0):
        raise UserError(f"need inputs x (n, ...), int labels y (n,) >= 0 and x_eval (N, ...) "
                        f"shaped like x; got {tuple(xt.shape)}, {tuple(yt.shape)} "
                        f"{yt.dtype}, {tuple(xe.shape)}")
    yt = yt.long()
    from dpcert.learning.data import check_finite_examples

    check_finite_examples(xt.cpu().numpy(), "training example")
    if augment_shift and xt.ndim != 4:
        raise UserError(f"augmentation translates images (n, C, H, W); x is {tuple(xt.shape)}")
    record = MechanismRecord.of(cfg, len(yt))  # what this training runs, as certified
    k = (instances_that_fit(cfg, model_fn, xt, yt) if batch_instances == "auto"
         else batch_instances)
    from tqdm import tqdm

    out = []
    with tqdm(total=instances * steps, desc="DP-SGD instance-steps", unit="step",
              disable=not progress) as bar:
        for start in range(0, instances, k):
            group = list(range(start, min(start + k, instances)))
            size = len(group)
            st = train_stacked(cfg, model_fn, xt, yt, seed=seed, instances=group,
                               progress=lambda _: bar.update(size))  # noqa: B023 - used now
            out.append(predict_stacked(st, xe))
    return np.concatenate(out), record
