"""The mechanism record: what a training run actually executed, as a small serialisable value.

Accounting and certification consume only this record (cf. dp-accounting's DpEvent): nothing
about the mechanism is re-entered by hand or guessed. Training writes it as ``mechanism.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from dpcert.errors import UserError

SAMPLING_SCHEMES = ("poisson",)


@dataclass(frozen=True)
class MechanismRecord:
    """One DP-SGD training run of a single model instance (Sampled Gaussian Mechanism).

    Attributes:
        sample_rate: Poisson sampling probability q of every example at every step, in (0, 1].
        noise_multiplier: sigma; the noise added to the clipped gradient sum is N(0, sigma^2 C^2).
        steps: number of DP-SGD steps T (each one SGM release).
        clip_norm: per-example clipping norm C (does not enter the accounting: it cancels).
        dataset_size: n, the size of the training set the instances were trained from.
        sampling: the sampling scheme; only "poisson" is described by our accounting.
        subset_size: m when every instance trains on its own uniformly random m-subset of the
            n examples (sub-dataset training), else None.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    clip_norm: float = 1.0
    dataset_size: int | None = None
    sampling: str = "poisson"
    subset_size: int | None = None

    def __post_init__(self) -> None:
        _check(
            _finite(self.sample_rate) and 0.0 < self.sample_rate <= 1.0,
            f"sample rate q must lie in (0, 1], got {self.sample_rate}",
        )
        _check(
            _finite(self.noise_multiplier) and self.noise_multiplier > 0.0,
            f"noise multiplier sigma must be > 0, got {self.noise_multiplier}",
        )
        _check(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
            f"steps T must be a positive integer, got {self.steps!r}",
        )
        _check(
            _finite(self.clip_norm) and self.clip_norm > 0.0,
            f"clip norm must be > 0, got {self.clip_norm}",
        )
        _check(
            self.sampling in SAMPLING_SCHEMES,
            f"sampling scheme {self.sampling!r} is not supported (only 'poisson' is accounted)",
        )
        if self.dataset_size is not None:
            _check(
                _is_pos_int(self.dataset_size),
                f"dataset size must be a positive integer, got {self.dataset_size!r}",
            )
        if self.subset_size is not None:
            _check(
                _is_pos_int(self.subset_size),
                f"subset size must be a positive integer, got {self.subset_size!r}",
            )
            _check(
                self.dataset_size is not None and self.subset_size <= self.dataset_size,
                "sub-dataset training needs dataset_size >= subset_size",
            )

    @classmethod
    def of(cls, training, dataset_size: int | None) -> MechanismRecord:
        """The record of what a DP-SGD training runs: its ``sample_rate``, ``noise_multiplier``,
        ``steps``, ``clip_norm`` and ``subset_size`` read off the training's own configuration
        (the engines' ``DpSgd``/``LinearDpSgd``, a run's ``RunConfig``), on ``dataset_size``
        examples, with Poisson sampling (the only scheme the engines implement). The one
        place a trainer's settings become the record that is certified: what is certified is
        what is trained, never a second construction from the same numbers."""
        return cls(sample_rate=training.sample_rate, noise_multiplier=training.noise_multiplier,
                   steps=training.steps, clip_norm=training.clip_norm,
                   dataset_size=dataset_size, sampling="poisson",
                   subset_size=training.subset_size)

    @property
    def uses_subsets(self) -> bool:
        return self.subset_size is not None and self.subset_size < (self.dataset_size or 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MechanismRecord:
        unknown = set(data) - set(cls.__dataclass_fields__)
        _check(not unknown, f"unknown keys in mechanism record: {sorted(unknown)}")
        missing = {"sample_rate", "noise_multiplier", "steps"} - set(data)
        _check(not missing, f"mechanism record lacks required keys: {sorted(missing)}")
        try:
            return cls(**data)
        except TypeError as err:  # wrong value types that dataclass construction trips on
            raise UserError(f"invalid mechanism record: {err}") from None

    def save(self, path: str | Path) -> None:
        from dpcert.store import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MechanismRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"mechanism record not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"mechanism record {path} is not valid JSON: {err}") from None
        _check(isinstance(data, dict), f"mechanism record {path} must be a JSON object")
        return cls.from_dict(data)

    def accounting_key(self) -> str:
        """Stable hash of the fields that determine every privacy number we compute."""
        fields = {k: v for k, v in self.to_dict().items() if k != "clip_norm"}
        blob = json.dumps(fields, sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_pos_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
