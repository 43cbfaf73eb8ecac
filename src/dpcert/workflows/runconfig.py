"""A run's options (:class:`RunConfig`), its data, and its unit files.

The bottom of the workflow layer: what ``dpcert run`` trains and how each finished instance is
stored (``instances/inst_NNNNNN.npz``: scores and their checksum, written atomically).
Imports no torch, so validating a config stays cheap.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError, unknown_keys_error
from dpcert.learning.features import FEATURES as FEATURE_NAMES
from dpcert.store import atomic_save_unit

#: Datasets and models a run can name (models.MODELS holds the builders; a test keeps the two
#: in step, so that validating a config does not import torch).
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "npz", "folder")
MODEL_NAMES = ("digits_cnn", "lenet5", "cifar_cnn", "resnet18_gn", "linear")
#: Iterate averaging of the linear engine (dpcert.learning.linear.AVERAGING, which needs torch).
AVERAGING_NAMES = ("tail",)


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_real(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's results (plus how to execute it)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "digits_cnn"
    instances: int = 100
    sample_rate: float = 0.05
    noise_multiplier: float = 3.0
    steps: int = 300
    clip_norm: float = 1.0
    lr: float = 0.01
    optimizer: str = "adam"
    subset_size: int | None = None
    features: str | None = None  # a fixed feature map applied to every image first
    averaging: str | None = None  # "tail": Polyak average of the second half (linear model)
    bias_feature: float = 1.0  # linear model: the constant input feature carrying the bias
    augment_shift: int = 0  # image models: random translations by up to this many pixels
    augment_copies: int = 1  # ... this many per example, averaged before clipping
    seed: int = 0
    validation: int = 0  # > 0: train on all but the last N training examples, evaluate on them
    #: the declared number of training examples DP-SGD scales its steps by (q times it);
    #: None: the dataset's own declaration (never a count of the examples present)
    train_size: int | None = None
    # certification and execution (do not change trained instances)
    eta: float = 1e-3
    max_radius: int = 1000
    workers: int = 0
    batch_instances: int | str = 1  # or "auto" (resolve_batch_instances)
    device: str = "cpu"
    backend: str = "local"  # local processes, or ray tasks
    ray_address: str | None = None  # None: a private local Ray cluster
    gpu_fraction: float = 0.25  # GPU share of one ray task when device is cuda

    #: fields that change what the instances are; a run directory refuses other values
    TRAINING_FIELDS = ("dataset", "model", "instances", "sample_rate", "noise_multiplier",
                       "steps", "clip_norm", "lr", "optimizer", "subset_size", "features",
                       "averaging", "bias_feature", "augment_shift", "augment_copies",
                       "seed", "validation", "train_size")

    def __post_init__(self) -> None:
        for name, choices in (("dataset", DATASETS), ("model", MODEL_NAMES),
                              ("optimizer", ("sgd", "adam")), ("device", ("cpu", "cuda")),
                              ("backend", ("local", "ray"))):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, name)!r}")
        if self.train_size is not None and not _is_int(self.train_size, 1):
            raise UserError(f"train_size must be an integer >= 1, got {self.train_size!r}")
        checks = [("instances", 2), ("seed", 0), ("validation", 0), ("max_radius", 1),
                  ("workers", 0),
                  ("augment_shift", 0), ("augment_copies", 1)]
        if self.batch_instances != "auto":
            checks.append(("batch_instances", 1))
        for name, low in checks:
            if not _is_int(getattr(self, name), low):
                what = " or auto" if name == "batch_instances" else ""
                raise UserError(f"{name} must be an integer >= {low}{what}, got "
                                f"{getattr(self, name)!r}")
        for name in ("data_dir", "ray_address"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"{name} must be a path or address string, got "
                                f"{getattr(self, name)!r}")
        for name, choices in (("features", FEATURE_NAMES), ("averaging", AVERAGING_NAMES)):
            if getattr(self, name) is not None and getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)} or absent, got "
                                f"{getattr(self, name)!r}")
        if self.features is not None and self.model != "linear":
            raise UserError("features feed the linear model: set model: linear together "
                            "with features: scatter (conv models train on images)")
        if self.model == "linear" and self.features is None and self.dataset != "npz":
            raise UserError("the linear model trains on feature vectors: set features: "
                            "scatter, or give dataset: npz holding your own (n, D) features")
        if self.model == "linear" and self.optimizer != "sgd":
            raise UserError("the linear model trains with optimizer: sgd")
        if self.averaging is not None and self.model != "linear":
            raise UserError("averaging is available for the linear model only")
        if not (_is_real(self.bias_feature) and self.bias_feature >= 0):
            raise UserError(f"bias_feature must be a finite number >= 0, got {self.bias_feature!r}")
        if self.bias_feature != 1.0 and self.model != "linear":
            raise UserError("bias_feature is an option of the linear model")
        if self.augment_copies > 1 and self.augment_shift == 0:
            raise UserError("augment_copies > 1 needs augment_shift > 0 (copies of what?)")
        if self.augment_shift > 0 and self.model == "linear":
            raise UserError("augmentation is for image models; the linear model trains on "
                            "fixed features")
        if not (_is_real(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a number > 0, got {self.lr!r}")
        if not (_is_real(self.eta) and 0 < self.eta < 1):
            raise UserError(f"eta must lie in (0, 1), got {self.eta!r}")
        if not (_is_real(self.gpu_fraction) and 0 < self.gpu_fraction <= 1):
            raise UserError(f"gpu_fraction must lie in (0, 1], got {self.gpu_fraction!r}")
        # the mechanism checks q, sigma, T, C and the subset size
        MechanismRecord.of(self, None if self.subset_size is None else 2**62)

    @classmethod
    def from_mapping(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise unknown_keys_error(unknown, known, "config keys")
        try:
            return cls(**data)
        except TypeError as err:
            raise UserError(f"invalid config: {err}") from None

    def training(self) -> dict:
        return {k: getattr(self, k) for k in self.TRAINING_FIELDS}


def load_run_data(cfg: RunConfig):
    """The run's dataset (:class:`dpcert.learning.data.Dataset`), as features when the run uses
    them; loaded once per process."""
    return _load(cfg, cfg.features)


def load_run_images(cfg: RunConfig):
    """The run's dataset as images even when the run trains on features (the baselines'
    augmentation translates images, then applies the feature map): the same examples in the
    same order as :func:`load_run_data`."""
    return _load(cfg, None)


def _load(cfg: RunConfig, features: str | None):
    from dpcert.learning.data import load_dataset_cached

    data = load_dataset_cached(cfg.dataset, cfg.data_dir, features)
    if cfg.train_size is not None:
        import dataclasses

        data = dataclasses.replace(data, declared_size=cfg.train_size)
    return validation_split(data, cfg.validation) if cfg.validation else data


def validation_split(data, holdout: int):
    """The training set split in two: the last ``holdout`` examples become the evaluation set
    (in place of the test set, which is then never read), the rest the training set."""
    import dataclasses

    n = len(data.y_train)
    if not 0 < holdout < n:
        raise UserError(f"validation must hold out between 1 and {n - 1} of the {n} training "
                        f"examples, got {holdout}")
    # the declared size shrinks by the declared hold-out: both are configuration, not counts
    size = None if data.declared_size is None else data.declared_size - holdout
    if size is not None and size < 1:
        raise UserError(f"validation holds out {holdout} of the {data.declared_size} declared "
                        "training examples")
    return dataclasses.replace(data, name=f"{data.name} (validation split)",
                               x_train=data.x_train[:n - holdout],
                               y_train=data.y_train[:n - holdout],
                               x_test=data.x_train[n - holdout:],
                               y_test=data.y_train[n - holdout:], declared_size=size)


def load_config_file(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    return data


def _digest(scores: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(scores).tobytes()).hexdigest()


def write_unit(path: Path, scores: np.ndarray) -> None:
    """One trained model's test scores (N, L) with their checksum, written atomically."""
    atomic_save_unit(path, scores=scores, sha256=np.array(_digest(scores)))


def read_unit(path: Path) -> np.ndarray | None:
    """An instance's scores, or None when the file is missing, truncated or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            scores, digest = z["scores"], str(z["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return scores if _digest(scores) == digest else None


