"""Trained instances as plain arrays, and scoring inputs with them.

A trained instance is kept as a dict of float32 numpy arrays (its parameters), so that any
storage format can hold it and nothing torch-specific (no pickle) is ever loaded. This module
turns the engines' stacked tensors into such dicts and back: :func:`instance_params` after
training, :func:`score_instances` to run K stored instances on inputs as one stacked
computation — the same prediction functions the engines use at the end of training, so a
stored instance scores exactly as it did then.

Parameter names: the linear model has ``weight`` (D, L) and ``bias`` (L,), the bias already
scaled by the bias feature (b = s beta); image models have their ``named_parameters`` names.
"""

from __future__ import annotations

import numpy as np
import torch

from dpcert.errors import UserError


def instance_params(stacked: dict[str, torch.Tensor]) -> list[dict[str, np.ndarray]]:
    """Split stacked parameters {name: (K, ...)} into K per-instance float32 dicts."""
    host = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in stacked.items()}
    k = next(iter(host.values())).shape[0]
    return [{name: np.ascontiguousarray(a[i]) for name, a in host.items()} for i in range(k)]


def module_params(model: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    """One trained ``nn.Module`` of family ``model`` as a parameter dict in the layout
    :func:`score_instances` reads (the linear family's ``nn.Linear`` weight is transposed to
    the engine's (D, L))."""
    params = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in
              module.named_parameters()}
    if model == "linear":
        return {"weight": np.ascontiguousarray(params["weight"].T), "bias": params["bias"]}
    return params


def constant_params(model: str, in_channels: int, num_classes: int, *, label: int,
                    logit: float = 30.0) -> dict[str, np.ndarray]:
    """Parameters of a model that answers ``label`` on every input: all zero but the last
    layer's bias, ``logit`` at ``label`` (a partition defence's model of an empty part, which
    by convention votes for label 0). Its softmax is one-hot up to e^-logit."""
    shapes = expected_shapes(model, in_channels, num_classes,
                             feature_dim=in_channels if model == "linear" else None)
    params = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    last = list(params)[-1]
    if params[last].shape != (num_classes,):
        raise UserError(f"model {model!r} does not end in a bias of {num_classes} labels")
    params[last][label] = logit
    return params


#: Models the example-row families (nearest neighbour, kernel ridge) are scored together,
#: in blocks aligned to model 0, 50, 100, ...: the batched products round each model's scores
#: the same way only in the same company, so training, resuming and loading all use these
#: blocks and a kept ensemble reproduces its run's votes bit for bit.
ROW_MODELS_PER_CALL = 50
#: Parameters holding one row per training example (the nearest-neighbour and kernel-ridge
#: families), and the value of a padding row: it never matches (label -1) or adds an exact
#: zero (coefficient 0), so scores do not depend on how many rows a stack is padded to.
ROW_PADDING = {"examples": 0.0, "labels": -1.0, "coef": 0.0}


def stack_params(params: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """K per-instance dicts with the same names and shapes -> {name: (K, ...)}.

    Models that keep their examples' rows (:data:`ROW_PADDING`) are each kept with their own
    number of rows — a function of their own part, which an example inserted elsewhere
    cannot change — and padded here to the largest of the K."""
    names = sorted(params[0])
    rows = [n for n in names if n in ROW_PADDING]

    def shape(p: dict[str, np.ndarray], n: str) -> tuple[int, ...]:
        return p[n].shape[1:] if n in rows else p[n].shape

    for p in params:
        if (sorted(p) != names or any(shape(p, n) != shape(params[0], n) for n in names)
                or any(p[n].ndim == 0 for n in rows)):
            raise UserError("stored instances have different parameter names or shapes")
        if len({p[n].shape[0] for n in rows}) > 1:
            raise UserError("a stored model's example rows disagree in number")
    top = max((p[n].shape[0] for p in params for n in rows), default=0)
    return {n: np.stack([_padded(p[n], top, ROW_PADDING[n]) if n in rows else p[n]
                         for p in params]) for n in names}


def _padded(a: np.ndarray, rows: int, value: float) -> np.ndarray:
    """``a`` (n, ...) with rows of ``value`` appended up to ``rows``."""
    if len(a) == rows:
        return a
    pad = np.full((rows - len(a), *a.shape[1:]), value, a.dtype)
    return np.concatenate([a, pad])


def expected_shapes(model: str, in_channels: int, num_classes: int,
                    feature_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one instance of ``model`` (the linear model needs ``feature_dim``)."""
    if model == "linear":
        if feature_dim is None:
            raise UserError("the linear model's parameter shapes need the feature dimension")
        return {"weight": (feature_dim, num_classes), "bias": (num_classes,)}
    from dpcert.learning.models import build_model
    from dpcert.learning.stacked import on_host

    with on_host(0):
        base = build_model(model, in_channels, num_classes)
    return {k: tuple(v.shape) for k, v in base.named_parameters()}


def prepare(model: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked parameters laid out once for repeated scoring (a server's resident blocks).

    The linear model's weights (K, D, L) become one (D, K L) matrix, so that scoring K
    instances is a single matrix product. ``torch.einsum("nd,kdl->knl")``, which the engine's
    :func:`~dpcert.learning.linear.predict_linear` uses, computes that same product but copies
    the weights into this layout on every call (83 ms for 422 ScatterNet instances, against
    4 ms for the product itself, on one input)."""
    if model != "linear" or "weight_flat" in params:
        return params
    w = params["weight"]
    k, d, n_labels = w.shape
    return {**params, "weight_flat": w.permute(1, 0, 2).reshape(d, k * n_labels).contiguous()}


#: The nearest-neighbour family: a model is its examples (``examples`` (n, D), ``labels``
#: (n,) as floats, -1 for padding rows) and a softness ``scale`` (1,).
NEAREST = "nearest-neighbour"
#: Largest models x inputs x labels block one nearest-neighbour call holds.
_NEAREST_BLOCK = 1 << 24


def _squared_distances(em: torch.Tensor, xb: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """|x - e|^2 (K, N) from every model's example row em (K, D) to inputs xb (N, D) whose
    squared norms are x2 (N,), clamped at 0 (the expansion can round below it)."""
    return (x2[None, :] - 2 * (em @ xb.T) + (em * em).sum(-1)[:, None]).clamp_min(0)


def _score_nearest(params: dict[str, torch.Tensor], x: torch.Tensor, num_classes: int
                   ) -> np.ndarray:
    """Softmax scores (K, N, L) of K nearest-neighbour models on features x (N, D): the logit
    of label c is -scale * (squared distance to the model's nearest example of label c);
    labels without examples get probability 0, and a model with no examples answers label 0
    (a partition defence's empty part).

    One example row of every model at a time, and blocks of inputs whose size depends on K
    and L only: the arithmetic that scores a model's example never depends on how many rows
    the stack is padded to — a number set by the largest model scored with it, which
    poisoning another part can change, and which must not move even a rounding of this
    model's votes."""
    e, lab, scale = params["examples"], params["labels"], params["scale"]
    k, n = lab.shape
    models = torch.arange(k, device=x.device)
    step = max(1, _NEAREST_BLOCK // max(1, k * num_classes))
    out = []
    for i in range(0, len(x), step):
        xb = x[i:i + step]
        x2 = (xb * xb).sum(-1)
        best = torch.full((k, len(xb), num_classes), torch.inf, dtype=x.dtype, device=x.device)
        for m in range(n):
            em, lm = e[:, m, :], lab[:, m].long()
            d2 = _squared_distances(em, xb, x2)
            cls = lm.clamp_min(0)
            cur = best[models, :, cls]
            best[models, :, cls] = torch.where((lm >= 0)[:, None], torch.minimum(cur, d2), cur)
        logits = -best * scale[:, None, :]
        empty = torch.isinf(best).all(-1)
        logits[..., 0] = torch.where(empty, torch.zeros_like(logits[..., 0]), logits[..., 0])
        out.append(torch.softmax(logits, dim=-1))
    return torch.cat(out, dim=1).cpu().numpy().astype(np.float32)


#: The kernel-ridge family (:func:`dpcert.learning.reference.kernel_ridge_params`): a model is
#: its examples (``examples`` (n, D)), their coefficients (``coef`` (n, L), zero on padding
#: rows), ``gamma`` (1,), ``scale`` (1,) and ``bias`` (L,).
KERNEL = "kernel-ridge"


def _score_kernel(params: dict[str, torch.Tensor], x: torch.Tensor, num_classes: int
                  ) -> np.ndarray:
    """Softmax scores (K, N, L) of K kernel-ridge models on features x (N, D): logits
    scale * (sum_m coef_m exp(-gamma |x - e_m|^2) + bias).

    As for the nearest-neighbour models, one example row of every model at a time, summed in
    row order, in input blocks set by K and L: a padding row (zero coefficients) adds an exact
    zero, so a model's scores do not depend on how many rows the stack is padded to."""
    e, coef = params["examples"], params["coef"]
    gamma, scale, bias = params["gamma"], params["scale"], params["bias"]
    k, n = coef.shape[:2]
    step = max(1, _NEAREST_BLOCK // max(1, k * num_classes))
    out = []
    for i in range(0, len(x), step):
        xb = x[i:i + step]
        x2 = (xb * xb).sum(-1)
        acc = torch.zeros((k, len(xb), num_classes), dtype=x.dtype, device=x.device)
        for m in range(n):
            d2 = _squared_distances(e[:, m, :], xb, x2)
            acc += torch.exp(-gamma * d2)[:, :, None] * coef[:, m, None, :]
        out.append(torch.softmax(scale[:, :, None] * (acc + bias[:, None, :]), dim=-1))
    return torch.cat(out, dim=1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def score_instances(model: str, params: dict[str, torch.Tensor], x: torch.Tensor, *,
                    in_channels: int, num_classes: int, batch: int = 4096) -> np.ndarray:
    """Softmax scores (K, N, L), float32 on the host, of K stored instances on inputs x.

    ``params`` are stacked (K, ...) tensors on x's device, optionally :func:`prepare`-d; x is
    (N, D) features for the linear, nearest-neighbour and kernel-ridge models, (N, C, H, W)
    images otherwise."""
    if model == NEAREST:
        return _score_nearest(params, x, num_classes)
    if model == KERNEL:
        return _score_kernel(params, x, num_classes)
    if model == "linear":
        params = prepare(model, params)
        w, bias = params["weight_flat"], params["bias"]
        k, n_labels = bias.shape
        out = [torch.softmax((x[i:i + batch] @ w).view(-1, k, n_labels) + bias, dim=2)
               for i in range(0, len(x), batch)]
        return torch.cat(out).transpose(0, 1).cpu().numpy().astype(np.float32)
    from dpcert.learning.models import build_model
    from dpcert.learning.stacked import Stacked, on_host, predict_stacked

    with on_host(0):
        base = build_model(model, in_channels, num_classes)
    return predict_stacked(Stacked(base.to(x.device).eval(), params), x)
