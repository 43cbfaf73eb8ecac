"""`dpcert compare`: DP instances vs DPA vs Finite Aggregation vs Bagging, one report.

Every method is trained with the same architecture on the same training set and certified
for the same threat (radius = inserted + deleted training examples; a modification counts 2):

* dp: this project's run (:mod:`dpcert.workflows.run`), default certificate (PLD, sound, votes);
* dpa: k models, one per part of a hash partition of the examples' content
  (Levine & Feizi 2021) — the part of an example does not depend on the rest of the data;
* fa: Finite Aggregation (Wang, Levine, Feizi 2022), k d models; every example hashed into one
  of k d buckets, bucket h training the d models (h + s) mod kd; full per-model certificate;
* bagging: N models, each on k examples drawn with replacement (Jia, Cao, Gong 2021);
* roe: Run-off Election (Rezaei et al. 2023) over DPA's k partition models — the same trained
  models as a dpa setting with the same values (they share its folder), a second aggregation;
* fa-roe: Run-off Election over Finite Aggregation's k d models (FA + ROE, Rezaei et al.
  2023), likewise sharing the folder of the fa setting with the same values;
* baseline-DP: the statistical certified-accuracy lower bound of Ma, Zhu, Hsu (2019) for one
  of the DP instances (a curve, not a per-point certificate).

A baseline section may list several settings. With ``calibrate: true`` each baseline keeps the
setting whose clean accuracy is closest to the DP ensemble's (as in the paper's comparison);
otherwise every setting is reported. Each trained model's test scores are a checksummed unit
file, written atomically, reused on rerun, and its parameters are kept beside it
(``model_NNNNNN.safetensors``; the folder's ``ensemble.json`` says which certificate they
take), so ``dpcert.load_ensemble(folder)`` certifies new inputs with the defence's own
certificate. A setting's folder refuses other training values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import dpcert
from dpcert.certification import baselines
from dpcert.certification.aggregation import (
    BASELINES,
    RUNOFF,
    baseline_certificate,
    check_threat,
    deterministic_certificates,
)
from dpcert.certification.certify import Certificates
from dpcert.errors import UserError, unknown_keys_error
from dpcert.store import atomic_write_text, instance_blocks, load_array, load_tensors
from dpcert.workflows import rundir, white_box
from dpcert.workflows.dispatch import Trained, ray_map, worker_pool, write_trained
from dpcert.workflows.ensemble import (
    CERTIFICATION_FILE,
    EnsembleInfo,
    check_declared_inputs,
    check_same_data,
    keeps_models,
    read_info,
    write_info,
)
from dpcert.workflows.run import METHODS, run, stored_config
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit

#: Offset of the baselines' master seed, so that their streams differ from the DP instances'.
_SEED_OFFSET = 7919


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


_KEYS = {"dp", "dp_grid", *BASELINES, "methods", "calibrate", "dp_run", "validation",
         "tune_radius", "threat"}


@dataclass(frozen=True)
class CompareConfig:
    """What ``dpcert compare`` runs. ``dp``: the run options (dataset, model, features, ... —
    the baselines train on the same data and model); ``dp_grid``: DP settings to try, each a
    mapping of run options over ``dp``; ``settings``: the baseline settings per defence.
    ``validation`` > 0 turns on the tuning protocol (:func:`compare_tuned`): every setting is
    evaluated on the last ``validation`` training examples, the choice is made there for
    radii 0..``tune_radius``, and only the chosen settings are trained on the full training
    set and certified on the test set."""

    dp: dict = field(default_factory=dict)  # RunConfig fields
    settings: dict[str, tuple[BaselineConfig, ...]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    calibrate: bool = False
    dp_run: str | None = None  # an existing run directory to reuse (resumed, not retrained)
    dp_grid: tuple[dict, ...] = ()
    validation: int = 0
    tune_radius: int | None = None
    threat: str = "poisoning"  # what the radii count: THREATS

    @classmethod
    def from_mapping(cls, data: dict) -> CompareConfig:
        if not isinstance(data, dict):
            raise UserError("a compare config must be a mapping")
        unknown = set(data) - _KEYS
        if unknown:
            raise unknown_keys_error(unknown, _KEYS, "compare config keys")
        if "methods" not in data:
            found = ", ".join(sorted(data)) or "none"
            raise UserError(f"a compare config must say what it compares: add methods: "
                            f"[...] from {', '.join(('dp', *BASELINES))} (sections found: "
                            f"{found})")
        methods = data["methods"]
        if not isinstance(methods, list | tuple) or not methods:
            raise UserError(f"methods must be a non-empty list ({', '.join(('dp', *BASELINES))})")
        bad = [m for m in methods if not isinstance(m, str) or m not in ("dp", *BASELINES)]
        if bad:
            raise UserError(f"unknown methods {bad} ({', '.join(('dp', *BASELINES))})")
        methods = tuple(dict.fromkeys(methods))
        calibrate = data.get("calibrate", False)
        if not isinstance(calibrate, bool):
            raise UserError(f"calibrate must be true or false, got {calibrate!r}")
        if calibrate and "dp" not in methods:
            raise UserError("calibrate needs the dp method (its clean accuracy is the target)")
        # every section given is validated now, before any training, used or not
        given = {k: parse_settings(k, data[k]) for k in BASELINES if k in data}
        settings = {k: given.get(k) or parse_settings(k, {}) for k in BASELINES if k in methods}
        if not isinstance(data.get("dp", {}), dict):
            raise UserError("the dp section must be a mapping of run options")
        dp_run = data.get("dp_run")
        if dp_run is not None and not isinstance(dp_run, str):
            raise UserError(f"dp_run must be a run directory path, got {dp_run!r}")
        dp = {**(stored_config(Path(dp_run)) if dp_run else {}), **data.get("dp", {})}
        RunConfig.from_mapping(dp)
        grid = data.get("dp_grid", [])
        if not isinstance(grid, list) or not all(isinstance(g, dict) and g for g in grid):
            raise UserError("dp_grid must be a list of mappings of run options, e.g. "
                            "[{noise_multiplier: 3}, {noise_multiplier: 6}]")
        for g in grid:
            RunConfig.from_mapping({**dp, **g})
        if dp_run is not None and grid:
            raise UserError("dp_run reuses one run; give dp_grid without it")
        validation = data.get("validation", 0)
        if not (isinstance(validation, int) and not isinstance(validation, bool)
                and validation >= 0):
            raise UserError(f"validation must be a number of training examples >= 0, got "
                            f"{validation!r}")
        tune_radius = data.get("tune_radius")
        if tune_radius is not None and not (isinstance(tune_radius, int) and tune_radius >= 0):
            raise UserError(f"tune_radius must be an integer >= 0, got {tune_radius!r}")
        if tune_radius is not None and not validation:
            raise UserError("tune_radius belongs to the tuning protocol: set validation too")
        if calibrate and grid:
            raise UserError("calibrate matches one DP ensemble's accuracy: drop dp_grid")
        if validation and (calibrate or dp_run is not None):
            raise UserError("the tuning protocol (validation) chooses settings itself: drop "
                            "calibrate and dp_run")
        threat = data.get("threat", "poisoning")
        check_threat(threat)
        return cls(dp, settings, methods, calibrate, dp_run, tuple(grid), validation,
                   tune_radius, threat)

    def dp_settings(self) -> list[tuple[str, str, dict]]:
        """(name, folder, run options) of every DP setting: ``dp`` alone, or ``dp`` under each
        ``dp_grid`` entry."""
        if not self.dp_grid:
            return [("dp (pld, sound)", "dp", dict(self.dp))]
        out = []
        for g in self.dp_grid:
            desc = ", ".join(f"{k}={v}" for k, v in g.items())
            folder = "dp_" + "_".join(f"{k.replace('_', '-')}{v}" for k, v in g.items())
            out.append((f"dp ({desc})", folder, {**self.dp, **g}))
        return out


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


def hash_partition(x: np.ndarray, parts: int) -> np.ndarray:
    """Part of every example from a hash of its own content (shape (n,), values 0..parts-1)."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return np.array([int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "big") % parts
                     for row in flat], dtype=np.int64)


def training_indices(kind: str, bc: BaselineConfig, x_train: np.ndarray) -> list | None:
    """Training-example indices of every model (dpa, fa), or None (bagging draws in the worker).

    FA: example with bucket h trains models (h + s) mod kd, so model j sees the buckets
    (j - s) mod kd."""
    if kind == "bagging":
        return None
    kd = bc.trained_models(kind)
    buckets = hash_partition(x_train, kd)
    shifts = (baselines.fa_shifts(kd, bc.spread) if trained_as(kind) == "fa"
              else np.zeros(1, np.int64))
    return [np.flatnonzero(np.isin(buckets, (j - shifts) % kd)) for j in range(kd)]




def _train_units(run_cfg: dict, bc: dict, kind: str,
                 jobs: list[tuple[int, np.ndarray | None, str]], keep_model: bool = True
                 ) -> list[int]:
    """Train baseline models ``jobs`` = [(i, example indices or None, unit path)] and write
    their files (a local worker process)."""
    for (_, _, out), trained in zip(jobs, _fit_units(run_cfg, bc, kind, jobs), strict=True):
        write_trained(Path(out), trained, keep_model)
    return [i for i, _, _ in jobs]


def model_examples(cfg: RunConfig, setting: BaselineConfig, i: int, idx: np.ndarray | None,
                   n_train: int):
    """(training-example indices, generator) of baseline model ``i``: its part ``idx``, or
    (bagging, ``idx`` None) its bag of ``setting.subsample`` draws from ``n_train`` examples,
    drawn from the model's generator, which then drives its training."""
    import torch

    from dpcert.learning.reference import instance_generator

    gen = instance_generator(cfg.seed + _SEED_OFFSET, i)
    if idx is None:
        idx = torch.randint(0, n_train, (setting.subsample,), generator=gen,
                            device=gen.device).numpy()
    return idx, gen


def _fit_units(run_cfg: dict, bc: dict, kind: str,
               jobs: list[tuple[int, np.ndarray | None, str]], data=None) -> list[Trained]:
    """(test scores, parameters) of baseline models ``jobs`` = [(i, example indices or None,
    unit path)]; pure, no files (a local worker or a Ray task). The learners fitted in closed
    form score all their models in one stacked call (the test features are read once, not
    once per model); each model is kept with exactly its own examples' rows, so that its
    file is a function of its part alone (the stacked call pads them, which changes no
    score: :func:`dpcert.learning.inference.stack_params`). ``data``: the dataset to train
    and score on [default: the run's] (``dpcert attack-check`` passes a poisoned one)."""
    import torch

    from dpcert.learning.inference import score_instances, stack_params

    cfg, setting = RunConfig(**run_cfg), BaselineConfig(**bc)
    data = load_run_data(cfg) if data is None else data
    parts, gens = [], []
    for i, idx, _ in jobs:
        idx, gen = model_examples(cfg, setting, i, idx, len(data.y_train))
        parts.append(idx)
        gens.append(gen)
    if setting.learner not in FREE_LEARNERS:
        return [_train_one(cfg, setting, data, idx, gen)
                for idx, gen in zip(parts, gens, strict=True)]
    x_train, x_test = vectors(data.x_train), vectors(data.x_test)
    params = [_fit_free(setting, x_train, data.y_train, data.num_classes, idx) for idx in parts]
    family = learner_model(setting, "linear")
    stacked = {k: torch.from_numpy(v) for k, v in stack_params(params).items()}
    # scored by the same routine that scores the kept models later (same rounding)
    scores = score_instances(family, stacked, torch.from_numpy(x_test),
                             in_channels=x_train.shape[1], num_classes=data.num_classes)
    for j, idx in enumerate(parts):
        if len(idx) == 0 and family == "linear":  # an empty part votes for label 0
            scores[j] = 0.0
            scores[j, :, 0] = 1.0
    return [(scores[j], params[j]) for j in range(len(parts))]


def _fit_units_ray(run_cfg: dict, bc: dict, kind: str,
                   jobs: list[tuple[int, np.ndarray | None, str]]) -> list[Trained]:
    """Ray task body: one worker thread, as a local worker process has."""
    import torch

    torch.set_num_threads(1)
    return _fit_units(run_cfg, bc, kind, jobs)


def vectors(x: np.ndarray) -> np.ndarray:
    """Inputs as the vectors (n, D) the closed-form learners take: feature vectors as they
    are, images flattened (each on its own: a function of the example alone)."""
    return x if x.ndim == 2 else np.ascontiguousarray(x.reshape(len(x), -1))


def _fit_free(setting: BaselineConfig, x: np.ndarray, y: np.ndarray, num_classes: int,
              idx: np.ndarray) -> dict[str, np.ndarray]:
    """Parameters of a learner fitted in closed form on the vectors ``x[idx]``: the nearest
    example, a class mean, or kernel ridge regression."""
    from dpcert.learning.inference import KERNEL, NEAREST, constant_params
    from dpcert.learning.reference import (
        kernel_ridge_params,
        nearest_neighbour_params,
        prototype_params,
    )

    # an empty part's nearest-neighbour or kernel-ridge model has no examples: it answers 0
    if setting.learner == NEAREST:
        return nearest_neighbour_params(x[idx], y[idx], len(idx))
    if setting.learner == KERNEL:
        return kernel_ridge_params(x[idx], y[idx], num_classes, len(idx), gamma=setting.gamma,
                                   ridge=setting.ridge)
    if len(idx) == 0:
        return constant_params("linear", x.shape[1], num_classes, label=0)
    return prototype_params(x[idx], y[idx], num_classes, metric=PROTOTYPES[setting.learner])


def learner_model(setting: BaselineConfig, run_model: str) -> str:
    """The model family a setting's learner trains (its kept models' family)."""
    return {"scatter-cnn": "scatter_cnn", "nearest-neighbour": "nearest-neighbour",
            "kernel-ridge": "kernel-ridge", "prototype": "linear",
            "prototype-cosine": "linear"}.get(setting.learner, run_model)


def _training_examples(cfg: RunConfig, setting: BaselineConfig, data, idx: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) a gradient-trained model learns from: its examples, or every
    translation of their images (then the run's feature map) with ``augment_shift``."""
    s = setting.augment_shift
    if not s:
        return data.x_train[idx], data.y_train[idx]
    from dpcert.learning.features import compute
    from dpcert.learning.reference import translations
    from dpcert.workflows.runconfig import load_run_images

    moved = translations(load_run_images(cfg).x_train[idx], s)
    x = compute(moved, cfg.features) if cfg.features else moved
    return x, np.tile(data.y_train[idx], (2 * s + 1) ** 2)


def _train_one(cfg: RunConfig, setting: BaselineConfig, data, idx: np.ndarray, gen):
    """(scores on the evaluation set, parameters) of a baseline model trained by gradient on
    examples ``idx``, all randomness from ``gen``."""
    import torch

    from dpcert.learning.inference import constant_params, module_params
    from dpcert.learning.reference import predict_scores, repeatable_kernels, train_plain

    model_name = learner_model(setting, cfg.model)
    if len(idx) == 0:  # an empty part predicts nothing: it votes for label 0
        scores = np.zeros((len(data.y_test), data.num_classes), np.float32)
        scores[:, 0] = 1.0
        return scores, constant_params(model_name, data.x_train.shape[1], data.num_classes,
                                       label=0)
    device = torch.device(cfg.device)
    x_np, y_np = _training_examples(cfg, setting, data, idx)
    x = torch.tensor(x_np, device=device)
    y = torch.tensor(y_np, device=device)
    full = setting.learner != "minibatch"
    model = train_plain(model_name, x, y, data.num_classes,
                        epochs=setting.steps if full else setting.epochs,
                        batch_size=len(y) if full else setting.batch_size,
                        lr=setting.lr, optimizer=setting.optimizer, gen=gen,
                        weight_decay=setting.weight_decay)
    with repeatable_kernels():  # its votes, like its weights, a function of its part
        scores = predict_scores(model, torch.tensor(data.x_test, device=device))
    return scores, module_params(model_name, model)


def _guard_folder(folder: Path, identity: dict) -> None:
    """Refuse a folder trained with other settings; record ours in a fresh one."""
    path = folder / rundir.SETTINGS
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is damaged; remove {folder} to retrain") from None
        if old != identity:
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            raise UserError(f"{folder} holds models trained with other settings ({changed}); "
                            "remove it or use another --output directory")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def train_models(kind: str, bc: BaselineConfig, run_cfg: RunConfig, x_train: np.ndarray,
                 folder: Path, progress: bool, *, defence: str | None = None) -> np.ndarray:
    """Scores (M, N, L) of a baseline's models, training (in parallel) those not yet on disk.
    ``defence``: the certificate the folder's kept ensemble takes by default (the defence
    whose models these are, unless a run directory of a run-off says otherwise)."""
    from tqdm import tqdm

    # ROE aggregates DPA's (or FA's) models: same training, same folder, same identity.
    if bc.learner == "scatter-cnn" and run_cfg.features != "scatter":
        raise UserError("the scatter-cnn learner trains on ScatterNet maps: model: linear "
                        "with features: scatter")
    if bc.augment_shift and run_cfg.dataset == "npz" and run_cfg.features is None:
        raise UserError("augment_shift translates images; an npz of feature vectors has none")
    identity = {"kind": trained_as(kind), **bc.identity(),
                **{k: getattr(run_cfg, k) for k in ("dataset", "model", "seed")},
                **({"validation": run_cfg.validation} if run_cfg.validation else {})}
    # A new folder keeps its models; one trained before models were kept resumes as it was.
    keep = not (folder / rundir.SETTINGS).exists() or keeps_models(folder)
    if not keep:  # models of dpcert 0.1: no record of how their inputs were read
        check_declared_inputs(run_cfg.dataset, load_run_data(run_cfg).num_classes, False)
    _guard_folder(folder, identity)
    m = bc.trained_models(kind)
    if keep:
        info = baseline_info(kind, bc, run_cfg, m, defence=defence)
        if keeps_models(folder):
            # refuses models trained before the inputs were declared
            read_info(folder, check_settings=False)
            check_same_data(folder, info)
        # the certification settings, a second record of them beside the description
        atomic_write_text(folder / CERTIFICATION_FILE,
                          json.dumps({"eta": run_cfg.eta, "max_radius": run_cfg.max_radius},
                                     sort_keys=True) + "\n")
        write_info(folder, info)
    paths = [folder / f"model_{i:06d}.npz" for i in range(m)]
    found = _finished_models(paths, keep, bc.name(kind), progress)
    todo = [i for i in range(m) if i not in found]
    if todo:
        indices = training_indices(kind, bc, x_train)
        from dpcert.learning.inference import ROW_MODELS_PER_CALL

        # learners without training score an aligned block of models per call (a block with
        # any model missing is fitted again whole: the company a model is scored in sets
        # its rounding); the others one model each
        per = ROW_MODELS_PER_CALL if bc.learner in FREE_LEARNERS else 1
        blocks = sorted({i // per for i in todo})
        redo = [i for b in blocks for i in range(b * per, min(m, (b + 1) * per))]
        for i in redo:
            found.pop(i, None)
        workers = run_cfg.workers or max(1, min(os.cpu_count() or 1, len(redo)))
        if run_cfg.device == "cuda":
            workers = 1  # one process drives the GPU
        bar = tqdm(total=m, initial=m - len(redo), desc=f"training {bc.name(kind)}",
                   unit="model", disable=not progress)
        units = [(i, None if indices is None else indices[i], str(paths[i])) for i in redo]
        jobs = [(asdict(run_cfg), asdict(bc), kind, units[j:j + per], keep)
                for j in range(0, len(units), per)]
        if run_cfg.backend == "ray":
            def written(job: tuple, trained: list[Trained]) -> None:
                for (_, _, out), one in zip(job[3], trained, strict=True):
                    write_trained(Path(out), one, keep)
                bar.update(len(trained))

            ray_map(run_cfg, _fit_units_ray, [job[:4] for job in jobs], written)
        elif workers == 1:
            for job in jobs:
                bar.update(len(_train_units(*job)))
        else:
            with worker_pool(workers) as pool:
                for fut in as_completed([pool.submit(_train_units, *j) for j in jobs]):
                    bar.update(len(fut.result()))
        bar.close()
    return _gather_scores(paths, found, folder)


def _finished_models(paths: list[Path], keep: bool, name: str, progress: bool
                     ) -> dict[int, np.ndarray]:
    """Scores of the models already on disk whose files pass their checksums (and whose kept
    parameters do, when the folder keeps them), by model index; read once per invocation."""
    from tqdm import tqdm

    found = {}
    # thousands of kept models take minutes to verify: show it
    for i, path in enumerate(tqdm(paths, desc=f"checking {name}", unit="model", leave=False,
                                  disable=not progress or not paths[0].exists())):
        scores = read_unit(path)
        if scores is not None and (
                not keep or load_tensors(path.with_suffix(".safetensors")) is not None):
            found[i] = scores
    return found


def _gather_scores(paths: list[Path], found: dict[int, np.ndarray], folder: Path
                   ) -> np.ndarray:
    """Scores (M, N, L) of every model: those in ``found`` (consumed) and the rest read
    from disk. Filled into one array: a list then np.stack would hold them twice (FA's k d
    models on 10,000 points are GBs)."""
    out = None
    for i, path in enumerate(paths):
        scores = found.pop(i) if i in found else read_unit(path)
        if scores is None:
            raise UserError(f"a model file in {folder} is damaged; rerun to retrain it")
        if out is None:
            out = np.empty((len(paths), *scores.shape), scores.dtype)
        out[i] = scores
    return out


def baseline_info(kind: str, bc: BaselineConfig, run_cfg: RunConfig, models: int, *,
                  defence: str | None = None) -> EnsembleInfo:
    """The description of a baseline setting's kept models (``ensemble.json`` in its folder):
    which certificate they take and everything it needs."""
    from dpcert.learning.data import part_fingerprints
    from dpcert.workflows.run import input_spec

    data = load_run_data(run_cfg)
    model = learner_model(bc, run_cfg.model)
    indices = training_indices(kind, bc, data.x_train)  # None for Bagging's drawn bags
    return EnsembleInfo(dataset=run_cfg.dataset, model=model,
                        num_classes=data.num_classes, instances=models,
                        input=input_spec(run_cfg, data), mechanism=None, eta=run_cfg.eta,
                        max_radius=run_cfg.max_radius, training={**asdict(bc)},
                        defence=defence or trained_as(kind),
                        defence_params={"spread": bc.spread, "subsample": bc.subsample,
                                        "train_size": len(data.y_train)},
                        data_sha256=data.fingerprint(), dpcert_version=dpcert.__version__,
                        part_sha256=None if indices is None else
                        part_fingerprints(data.x_train, data.y_train, indices))


def certify_baseline(kind: str, bc: BaselineConfig, scores: np.ndarray, n_train: int,
                     run_cfg: RunConfig, threat: str = "poisoning") -> Certificates:
    return baseline_certificate(kind, scores, spread=bc.spread, train_size=n_train,
                                subsample=bc.subsample, eta=run_cfg.eta,
                                max_radius=run_cfg.max_radius, threat=threat)


def certify_setting(kind: str, bc: BaselineConfig, scores: np.ndarray, data, run_cfg: RunConfig,
                    *, threat: str = "poisoning", progress: bool = False) -> Certificates:
    """A baseline setting's certificates against ``threat`` from its models' scores (M, N, L)
    on ``data``'s evaluation set: against label flips, DPA over kernel ridge prices each part
    by its own labels (:mod:`dpcert.workflows.white_box`), the rest count votes."""
    if threat == "label-flip" and white_box.applies(kind, learner_model(bc, run_cfg.model)):
        parts = white_box.parts_from_training(vectors(data.x_train), data.y_train,
                                              training_indices(kind, bc, data.x_train),
                                              gamma=bc.gamma, ridge=bc.ridge)
        return white_box.certificate(parts, vectors(data.x_test), scores, gamma=bc.gamma,
                                     ridge=bc.ridge, max_radius=run_cfg.max_radius,
                                     progress=progress)
    return certify_baseline(kind, bc, scores, len(data.y_train), run_cfg, threat=threat)


def compare(cfg: CompareConfig, out: Path, progress: bool = True) -> str:
    if cfg.validation:
        return compare_tuned(cfg, out, progress)
    run_cfg = RunConfig.from_mapping(cfg.dp)
    labels = load_run_data(run_cfg).y_test  # run() reuses the loaded data
    results: dict[str, Certificates] = {}
    curves: dict[str, object] = {}
    if "dp" in cfg.methods:
        for name, folder, options in cfg.dp_settings():
            dp_dir = Path(cfg.dp_run) if cfg.dp_run else out / folder
            results[name] = _dp_certificates(RunConfig.from_mapping(options), dp_dir, progress,
                                             cfg.threat)
            if not cfg.dp_grid and cfg.threat == "poisoning":
                curves["baseline-DP (Ma et al., CA lower bound)"] = _ma_curve(dp_dir,
                                                                              run_cfg.eta)
    per_kind: dict[str, dict[str, Certificates]] = {}
    last: dict = {}
    cands = setting_candidates(cfg)
    for kind, name, folder, bc in cands:
        if kind != "dp":
            per_kind.setdefault(kind, {})[name] = evaluate_setting(
                kind, bc, run_cfg, out / folder, progress, last, threat=cfg.threat)
    last.clear()
    calibration: list[tuple[str, float, bool]] = []
    for kind in BASELINES:
        if kind not in per_kind:
            continue
        certs = per_kind[kind]
        if cfg.calibrate:
            target = _clean(results["dp (pld, sound)"], labels)
            best = min(certs, key=lambda k: abs(_clean(certs[k], labels) - target))
            calibration += [(k, _clean(c, labels), k == best) for k, c in certs.items()]
            certs = {best: certs[best]}
        results.update(certs)
    used = {folder for _, _, folder, _ in cands}
    return _report(results, labels, out, run_cfg, curves, calibration,
                   unused=unused_folders(out, used), threat=cfg.threat)


def _dp_certificates(run_cfg: RunConfig, run_dir: Path, progress: bool,
                     threat: str = "poisoning") -> Certificates:
    """The DP ensemble's default certificates (PLD, sound, votes) against ``threat``,
    training what is missing (a finished run is only re-certified). Only that certificate is
    computed: the paper's modes at large radii take minutes, and ``dpcert run`` on the folder
    adds every method."""
    run(run_cfg, run_dir, progress, methods=METHODS[:1])
    rows = rundir.read_certificates(run_dir / rundir.certificates_name(threat=threat))
    return deterministic_certificates(rows[:, 1], rows[:, 2])


def setting_candidates(cfg: CompareConfig) -> list[tuple[str, str, str, object]]:
    """(defence, setting name, folder, setting) of every setting the config lists, those that
    share a folder (a run-off and the models it aggregates) next to each other, so that one
    reading of the folder's models serves them all."""
    out = [("dp", name, folder, options) for name, folder, options in cfg.dp_settings()
           if "dp" in cfg.methods]
    baselines_ = [(kind, bc.name(kind), bc.folder(kind), bc) for kind in BASELINES
                  if kind in cfg.methods for bc in cfg.settings[kind]]
    first = {}
    for i, (_, _, folder, _) in enumerate(baselines_):
        first.setdefault(folder, i)
    return out + sorted(baselines_, key=lambda c: first[c[2]])


def evaluate_setting(kind: str, setting, run_cfg: RunConfig, folder: Path, progress: bool,
                     last: dict | None = None, *, threat: str = "poisoning") -> Certificates:
    """Certificates of one setting of one defence on ``run_cfg``'s evaluation set (the test
    set, or the held-out training examples when ``run_cfg.validation`` is set). ``last``
    keeps the scores of the folder read last, reused when the next setting shares it (a
    run-off after the models it aggregates), dropped before another folder is read."""
    if kind == "dp":
        return _dp_certificates(RunConfig.from_mapping({**asdict(run_cfg), **setting,
                                                        "validation": run_cfg.validation}),
                                folder, progress, threat)
    data = load_run_data(run_cfg)
    if last is not None and last.get("folder") == folder:
        scores = last["scores"]
    else:
        if last is not None:
            last.clear()  # FA's scores are GBs: never two folders' at once
        scores = train_models(kind, setting, run_cfg, data.x_train, folder, progress)
        if last is not None:
            last.update(folder=folder, scores=scores)
    cert = certify_setting(kind, setting, scores, data, run_cfg, threat=threat,
                           progress=progress)
    name = rundir.certificates_name(kind if kind in RUNOFF else None, threat)
    from dpcert.certification.certify import certificates_csv

    atomic_write_text(folder / name, certificates_csv(cert, data.y_test))
    return cert


@dataclass(frozen=True)
class Choice:
    """What the validation split chose for one defence: the setting with the best mean
    certified accuracy over radii 0..R, and the best setting at every radius (shape (R+1,))."""

    best: str
    per_radius: np.ndarray


def choose(val_curves: dict[str, np.ndarray]) -> Choice:
    """Choose among settings by their validation CA curves {name: CA at r = 0..R}; ties go
    to the setting listed first, and radii where every setting certifies nothing keep the
    best setting (validation says nothing there)."""
    names = list(val_curves)
    table = np.stack([val_curves[n] for n in names])
    best = int(np.argmax(table.mean(axis=1)))
    per_radius = np.where(table.max(axis=0) > 0, np.argmax(table, axis=0), best)
    return Choice(names[best], np.array(names, dtype=object)[per_radius])


def envelope(choice_per_radius: np.ndarray, test_curves: dict[str, np.ndarray]):
    """Test CA at every radius of the setting chosen (on validation) for that radius, as a
    function of an array of radii (radii beyond the tuned range keep the last choice; beyond
    a test curve's last radius, the certificates' cap, nothing is certified: 0)."""
    top = len(choice_per_radius) - 1

    def curve(radii):
        radii = np.asarray(radii, dtype=np.int64)
        picks = choice_per_radius[np.minimum(radii, top)]
        return np.array([test_curves[p][r] if r < len(test_curves[p]) else 0.0
                         for p, r in zip(picks, radii, strict=True)])

    return curve


def compare_tuned(cfg: CompareConfig, out: Path, progress: bool = True) -> str:
    """The tuning protocol: choose every defence's setting on a validation split carved from
    the training set, then train the chosen settings on the full training set and certify
    them on the test set (read only then). Writes ``tuning.md`` (every setting on validation,
    what was chosen) and ``compare.md``/``compare.png`` (the chosen settings on test, and
    per-radius envelopes: at each radius the setting, or the defence, that validation chose
    for that radius)."""
    from dpcert.certification.certify import certified_accuracy

    base = RunConfig.from_mapping(cfg.dp)
    val_cfg = RunConfig.from_mapping({**cfg.dp, "validation": cfg.validation})
    top = base.max_radius if cfg.tune_radius is None else cfg.tune_radius
    radii = np.arange(top + 1)
    cands = setting_candidates(cfg)
    if not cands:
        raise UserError("nothing to compare: list at least one method")
    val_data = load_run_data(val_cfg)
    val_labels = val_data.y_test
    val: dict[str, dict[str, np.ndarray]] = {}
    val_certs: dict[str, Certificates] = {}
    last: dict = {}
    for kind, name, folder, setting in cands:
        cert = evaluate_setting(kind, setting, val_cfg, out / "validation" / folder, progress,
                                last, threat=cfg.threat)
        val_certs[name] = cert
        val.setdefault(kind, {})[name] = certified_accuracy(cert, val_labels, radii)
    last.clear()
    val = {kind: val[kind] for kind in ("dp", *BASELINES) if kind in val}  # report order
    choices = {kind: choose(curves) for kind, curves in val.items()}
    overall = choose({name: c for curves in val.values() for name, c in curves.items()})
    needed = set(overall.per_radius).union(
        *({c.best, *c.per_radius} for c in choices.values()))
    labels = load_run_data(base).y_test
    results: dict[str, Certificates] = {}
    test_curves: dict[str, np.ndarray] = {}
    for kind, name, folder, setting in cands:
        if name not in needed:
            continue
        cert = evaluate_setting(kind, setting, base, out / folder, progress, last,
                                threat=cfg.threat)
        test_curves[name] = certified_accuracy(cert, labels, np.arange(base.max_radius + 1))
        if name == choices[kind].best:
            results[name] = cert
    last.clear()
    order = {name: list(val).index(kind) for kind, name, _, _ in cands}
    results = dict(sorted(results.items(), key=lambda item: order[item[0]]))
    curves = {f"{kind} envelope": envelope(c.per_radius, test_curves)
              for kind, c in choices.items() if len(val[kind]) > 1}
    if len(choices) > 1:
        curves["envelope of all defences"] = envelope(overall.per_radius, test_curves)
    tuning = _tuning_report(cfg, val, val_certs, val_labels, choices, overall, top)
    atomic_write_text(out / _threat_name("tuning.md", cfg.threat), tuning)
    protocol = [
        f"Protocol: every setting was trained on the first {len(val_data.y_train)}"
        f" training examples and certified on the last {cfg.validation} (validation); each "
        f"defence's row is its setting with the best mean validation CA over radii "
        f"0..{top}, trained again on the full training set and certified on the test set, "
        "which nothing else reads. An envelope row picks at every radius the setting (or the "
        "defence) with the best validation CA at that radius and reports its test CA there. "
        f"Every setting's validation scores: {_threat_name('tuning.md', cfg.threat)}.", ""]
    used = {f for _, name, f, _ in cands if name in needed} | {
        f"validation/{f}" for _, _, f, _ in cands}
    return _report(results, labels, out, base, curves, [], preamble=protocol,
                   unused=unused_folders(out, used), threat=cfg.threat)


def _tuning_report(cfg: CompareConfig, val: dict[str, dict[str, np.ndarray]],
                   certs: dict[str, Certificates], labels: np.ndarray,
                   choices: dict[str, Choice], overall: Choice, top: int) -> str:
    from dpcert.workflows.report import TABLE_RADII

    shown = [r for r in TABLE_RADII if r <= top]
    lines = [f"# Tuning on the validation split (last {cfg.validation} training examples)", "",
             f"Mean CA = mean certified accuracy over radii 0..{top}; each defence keeps its "
             "setting with the highest (marked best); 'wins at' lists the radii (of the table"
             "'s) where a setting has the best validation CA of its defence.", "",
             "| defence | setting | clean acc | mean CA | " + " | ".join(f"CA@{r}" for r in shown)
             + " | chosen | wins at |",
             "|" + "---|" * (len(shown) + 6)]
    for kind, curves in val.items():
        for name, curve in curves.items():
            clean = float(np.mean(certs[name].prediction == labels))
            wins = [r for r in shown if choices[kind].per_radius[r] == name and curve[r] > 0]
            lines.append(f"| {kind} | {name} | {clean:.3f} | {curve.mean():.3f} | "
                         + " | ".join(f"{curve[r]:.3f}" for r in shown)
                         + f" | {'best' if name == choices[kind].best else ''} | "
                         + ", ".join(map(str, wins)) + " |")
    picks = ", ".join(f"r={r}: {overall.per_radius[r]}" for r in shown)
    lines += ["", f"Across defences, validation chose at each radius: {picks}."]
    return "\n".join(lines) + "\n"


def _clean(cert: Certificates, labels: np.ndarray) -> float:
    return float(np.mean(cert.prediction == labels))


def instance_accuracies(scores: np.ndarray, labels: np.ndarray, values: int = 2**24
                        ) -> np.ndarray:
    """Test accuracy (P,) of each instance from its scores (P, N, L), read a block of about
    ``values`` scores at a time (:func:`~dpcert.store.instance_blocks`)."""
    return np.concatenate([(block.argmax(axis=2) == labels).mean(axis=1)
                           for block in instance_blocks(scores, values)])


def _ma_curve(run_dir: Path, eta: float, delta: float = 1e-5):
    """Ma, Zhu, Hsu (2019): CA_r lower bound of one DP model from the run's own instances.

    (eps, delta) is the exact single-example profile at delta = 1e-5; the expected accuracy of
    one instance is lower-bounded by Hoeffding over the P independent instances at level eta.
    """
    from dpcert.certification.accounting import EPS_GRID
    from dpcert.certification.mechanism import MechanismRecord
    from dpcert.certification.pld import group_privacy_profile

    rec = MechanismRecord.load(run_dir / rundir.MECHANISM)
    prof = group_privacy_profile(rec.sample_rate, rec.noise_multiplier, 1, rec.steps, EPS_GRID)
    ok = np.flatnonzero(prof <= delta)
    eps = float(EPS_GRID[ok[0]]) if ok.size else np.inf
    scores = load_array(run_dir / rundir.SCORES, "scores", mmap=True)
    labels = load_array(run_dir / rundir.LABELS, "labels")
    if scores.ndim != 3 or scores.shape[1] != len(labels):
        raise UserError(f"{run_dir}: scores {scores.shape} do not match {len(labels)} labels")
    per_instance = instance_accuracies(scores, labels)
    acc_lo = max(0.0, float(per_instance.mean()) - np.sqrt(np.log(1 / eta) / (2 * len(scores))))
    if not np.isfinite(eps):
        return lambda radii: np.zeros(np.shape(radii))
    return lambda radii: baselines.dp_baseline_accuracy(radii, eps, delta, acc_lo)


#: Files that mark a folder of trained models: a baseline setting's, a DP run's.
MODEL_FOLDER_MARKERS = rundir.MODEL_FOLDER_MARKERS


def unused_folders(out: Path, used: set[str]) -> list[tuple[str, int]]:
    """(path relative to ``out``, size in bytes) of every folder of trained models in ``out``
    and ``out/validation`` whose path is not in ``used``: models of settings the config no
    longer lists, or that validation no longer chose, left by earlier runs. Only reported,
    never removed: they cost nothing to keep but disk, and retraining them can take hours."""
    found = []
    for parent in (out, out / "validation"):
        if not parent.is_dir():
            continue
        for folder in sorted(p for p in parent.iterdir() if p.is_dir()):
            rel = folder.relative_to(out).as_posix()
            if rel not in used and any((folder / m).is_file() for m in MODEL_FOLDER_MARKERS):
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                found.append((rel, size))
    return found


def _size_text(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _unused_lines(unused: list[tuple[str, int]]) -> list[str]:
    if not unused:
        return []
    total = _size_text(sum(size for _, size in unused))
    listed = ", ".join(f"`{rel}` ({_size_text(size)})" for rel, size in unused)
    return ["", "Not read by this comparison (models of settings the config no longer lists, "
            f"or that validation no longer chose; removing them frees {total}): {listed}."]


def _report(results: dict[str, Certificates], labels: np.ndarray, out: Path,
            cfg: RunConfig, curves: dict[str, object],
            calibration: list[tuple[str, float, bool]], preamble: list[str] = (),
            unused: list[tuple[str, int]] = (), threat: str = "poisoning") -> str:
    from dpcert.workflows.report import ca_table, plot_curves

    if threat == "poisoning":
        radius = ("Radius = inserted + deleted training examples (a modification counts 2), "
                  "the same convention for every method.")
        bound = (" The baseline-DP row is a statistical lower bound on certified accuracy (no "
                 "per-point certificate).")
    else:
        radius = ("Radius = flipped training labels (inputs untouched), for every method: the "
                  "DP ensemble's certificate at 2r changed examples, the partitions' counted "
                  "flip for flip (a flip reaches one part), DPA over kernel ridge priced part by "
                  "part (white-box), Bagging's bags drawn by position.")
        bound = ""
    lines = [f"# dpcert compare: {cfg.dataset}, model {cfg.model}"
             + ("" if threat == "poisoning" else ", against label flips"), "",
             radius + " CA@r = fraction of test points predicted correctly and certified at "
             "radius >= r." + bound, "", *preamble, *ca_table(results, labels, curves)]
    if calibration:
        target = _clean(results["dp (pld, sound)"], labels)
        lines += ["", f"Calibration: each baseline keeps the setting whose clean accuracy is "
                  f"closest to the DP ensemble's ({target:.3f}).", "",
                  "| setting | clean acc | kept |", "|---|---|---|",
                  *(f"| {name} | {acc:.3f} | {'yes' if kept else ''} |"
                    for name, acc, kept in calibration)]
    lines += _unused_lines(list(unused))
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / _threat_name("compare.md", threat), text)
    plot_curves(results, labels, out / _threat_name("compare.png", threat),
                f"{cfg.dataset}: defences compared"
                + ("" if threat == "poisoning" else " against label flips"), curves,
                xlabel=None if threat == "poisoning" else "radius r (flipped training labels)")
    return text


def _threat_name(name: str, threat: str) -> str:
    """A report file's name for ``threat``: compare.md, compare_label_flip.md, ..."""
    if threat == "poisoning":
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}_{threat.replace('-', '_')}.{suffix}"
