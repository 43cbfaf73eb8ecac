"""A baseline defence's setting: the learner that fits each of its models and the values it
reads — what a baseline folder's ``settings.json`` records, what ``dpcert run --defence`` and
a compare config's sections give.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dpcert.certification.aggregation import (
    RUNOFF,
)
from dpcert.errors import UserError, unknown_keys_error

LEARNERS = ("minibatch", "full-batch", "scatter-cnn", "prototype", "prototype-cosine",
            "nearest-neighbour", "kernel-ridge")
#: The learners trained by gradient, and the training values each reads.
GRADIENT_LEARNERS = {
    "minibatch": ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "augment_shift"),
    "full-batch": ("steps", "lr", "optimizer", "weight_decay", "augment_shift"),
    "scatter-cnn": ("steps", "lr", "optimizer", "weight_decay", "augment_shift")}
#: The values every learner reads (those trained by gradient, and the closed-form ones).
LEARNER_VALUES = {**GRADIENT_LEARNERS, "kernel-ridge": ("gamma", "ridge")}
#: Nearest-class-mean learners and their metric.
PROTOTYPES = {"prototype": "euclidean", "prototype-cosine": "cosine"}
#: The learners fitted in closed form on feature vectors (no training steps), their models
#: scored in chunks.
FREE_LEARNERS = (*PROTOTYPES, "nearest-neighbour", "kernel-ridge")


@dataclass(frozen=True)
class BaselineConfig:
    """One setting of a baseline. ``models``: DPA/FA partitions k (FA trains k * spread
    models), Bagging bags N. ``learner``: how each model is fitted to its examples —
    ``minibatch`` (``epochs`` passes in batches of ``batch_size``), ``full-batch`` (``steps``
    optimiser steps on all of the model's examples at once: a budget in steps, whatever the
    part's size), ``scatter-cnn`` (the same full-batch training of a small CNN on the
    ScatterNet maps, :func:`dpcert.learning.models.scatter_cnn`; runs with ``features:
    scatter``), ``prototype`` (nearest class mean on the features; no training, linear
    model only), ``prototype-cosine`` (nearest class mean by angle) or
    ``nearest-neighbour`` (the label of the nearest example; the model keeps its examples)
    or ``kernel-ridge`` (kernel ridge regression of the one-hot labels, Gaussian kernel
    exp(-``gamma`` |a - b|^2), regularisation ``ridge``; the model keeps its examples and
    their coefficients).
    ``augment_shift`` S > 0 (learners trained by gradient): each model trains on every
    translation of its own examples' images by up to S pixels ((2 S + 1)^2 copies, the
    feature map applied to each), a function of its part alone like the model itself."""

    models: int = 50
    subsample: int = 200  # bagging: examples per bag
    spread: int = 1  # fa: d
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "adam"
    learner: str = "minibatch"
    steps: int = 300  # full-batch: optimiser steps
    weight_decay: float = 0.0
    augment_shift: int = 0
    gamma: float = 0.25  # kernel-ridge: kernel width, for unit-norm features (ScatterNet's)
    ridge: float = 0.001  # kernel-ridge: regularisation

    def __post_init__(self) -> None:
        for name in ("models", "subsample", "spread", "epochs", "batch_size", "steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise UserError(f"lr must be > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("gamma", "ridge"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a number > 0, got {value!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise UserError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.learner not in LEARNERS:
            raise UserError(f"learner must be one of {', '.join(LEARNERS)}, got "
                            f"{self.learner!r}")
        if not (isinstance(self.augment_shift, int) and not isinstance(self.augment_shift, bool)
                and self.augment_shift >= 0):
            raise UserError(f"augment_shift must be an integer >= 0, got "
                            f"{self.augment_shift!r}")
        if self.augment_shift and self.learner not in GRADIENT_LEARNERS:
            raise UserError(f"augment_shift is for the learners trained by gradient "
                            f"({', '.join(GRADIENT_LEARNERS)}), not {self.learner}")

    def training_changes(self) -> dict:
        """The training values that differ from the defaults and matter for the learner."""
        # the prototype and nearest-neighbour learners read no values
        used = LEARNER_VALUES.get(self.learner, ())
        default = BaselineConfig()
        return {k: getattr(self, k) for k in ("learner", *used)
                if getattr(self, k) != getattr(default, k)}

    def name(self, kind: str) -> str:
        what = {"dpa": f"k={self.models}", "fa": f"k={self.models}, d={self.spread}",
                "bagging": f"N={self.models}, k={self.subsample}"}[trained_as(kind)]
        extra = "".join(f", {k}={v}" for k, v in self.training_changes().items())
        return f"{kind} ({what}{extra})"

    def folder(self, kind: str) -> str:
        base = {"dpa": f"dpa_k{self.models}", "fa": f"fa_k{self.models}_d{self.spread}",
                "bagging": f"bagging_N{self.models}_k{self.subsample}"}[trained_as(kind)]
        # Settings that differ in training get their own folders (the defaults keep the
        # names folders had before training options were part of them).
        return base + "".join(f"_{k.replace('_', '-')}{v}"
                              for k, v in self.training_changes().items())

    def identity(self) -> dict:
        """What a setting's folder records: its values, without learner options at their
        defaults (folders written before those options existed stay valid)."""
        out = asdict(self)
        for k in ("learner", "steps", "weight_decay", "augment_shift", "gamma", "ridge"):
            if out[k] == getattr(BaselineConfig(), k):
                del out[k]
        return out

    def trained_models(self, kind: str) -> int:
        return self.models * self.spread if trained_as(kind) == "fa" else self.models


def trained_as(kind: str) -> str:
    """The defence whose models ``kind`` aggregates (itself, unless it is a run-off)."""
    return RUNOFF.get(kind, kind)


def parse_settings(kind: str, section) -> tuple[BaselineConfig, ...]:
    items = section if isinstance(section, list) else [section]
    if not items:
        raise UserError(f"the {kind} section lists no settings")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise UserError(f"each {kind} setting must be a mapping, got {item!r}")
        if trained_as(kind) != "fa" and "spread" in item:
            raise UserError(f"spread applies to fa and fa-roe only, not {kind}")
        if kind != "bagging" and "subsample" in item:
            raise UserError(f"subsample applies to bagging only, not {kind}")
        unknown = set(item) - set(BaselineConfig.__dataclass_fields__)
        if unknown:
            raise unknown_keys_error(unknown, BaselineConfig.__dataclass_fields__,
                                     f"keys in the {kind} section")
        out.append(BaselineConfig(**item))
    return tuple(out)
