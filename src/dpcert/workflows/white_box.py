"""White-box label-flip certificates for DPA over kernel ridge, from a run's training data or
from a kept ensemble's models (:mod:`dpcert.certification.kernel_flips` has the math).

A DPA ensemble of kernel-ridge parts certifies label flips by what each part's model does
with its labels, not only by counting votes: one part of twenty well-separated examples can
need several flips to turn. Every other defence and learner keeps the counting certificate.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dpcert.certification.certify import Certificates
from dpcert.certification.kernel_flips import (
    KernelPart,
    dpa_kernel_radius,
    kernel_part,
    labels_from_coef,
)
from dpcert.errors import UserError

#: The model family whose parts take the white-box certificate.
KERNEL = "kernel-ridge"


def applies(defence: str, family: str) -> bool:
    """Whether a defence over a model family takes the white-box label-flip certificate."""
    return defence == "dpa" and family == KERNEL


def parts_from_training(x_train: np.ndarray, y_train: np.ndarray,
                        indices: list[np.ndarray], *, gamma: float, ridge: float
                        ) -> list[KernelPart]:
    """Each part's system from the training vectors (n, D) float32, labels and the parts'
    example indices, as the training fitted them."""
    x = np.asarray(x_train, np.float32)
    return [kernel_part(x[idx], y_train[idx], gamma=gamma, ridge=ridge) for idx in indices]


def parts_from_models(models: Iterable[dict[str, np.ndarray]], *, gamma: float, ridge: float
                      ) -> list[KernelPart] | int:
    """Each part's system from its kept model (``examples`` and ``coef``, its own rows): the
    labels it was fitted to are recovered from its coefficients. Where they cannot be (a
    model that is not kernel ridge of its examples at the run's ridge, or one whose
    coefficients at a tiny ridge are so large that float32 hides its labels), the index of
    the first such model instead: its ensemble then certifies label flips by counting."""
    parts = []
    for i, params in enumerate(models):
        labels = labels_from_coef(params["examples"], params["coef"], gamma=gamma, ridge=ridge)
        if labels is None:
            return i
        parts.append(kernel_part(params["examples"], labels, gamma=gamma, ridge=ridge))
    return parts


def certificate(parts: list[KernelPart], x: np.ndarray, scores: np.ndarray, *, gamma: float,
                ridge: float, max_radius: int, progress: bool = False) -> Certificates:
    """DPA's label-flip certificate over kernel-ridge parts on model inputs x (N, D): each
    part votes the argmax of its kept float32 scores (P, N, L); the models' kernel uses
    gamma as they store it (float32)."""
    from tqdm import tqdm

    p, n, labels = scores.shape
    if len(parts) != p:
        raise UserError(f"{len(parts)} parts for the scores of {p} models")
    blocks = -(-n // 2000) if n else 0
    with tqdm(total=p * blocks, desc="white-box label-flip certificates", unit="part",
              disable=not progress, leave=False) as bar:
        pred, radius = dpa_kernel_radius(np.asarray(x, np.float32), parts,
                                         scores.argmax(axis=2), num_classes=labels,
                                         gamma=float(np.float32(gamma)), ridge=ridge,
                                         max_radius=max_radius, block=2000, tick=bar.update)
    nan = np.full(n, np.nan)
    return Certificates(pred, radius, nan, nan)
