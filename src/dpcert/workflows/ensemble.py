"""A kept, certified ensemble: load it, run it on any input, certify each prediction.

A run keeps every trained instance (``instances/inst_NNNNNN.safetensors``: float32
parameters and their checksum, written atomically beside the unit's scores) and describes the
whole ensemble in ``ensemble.json``: model family, number of labels, the input specification
(:class:`~dpcert.learning.inputs.InputSpec`: image shape, raw pixel range, feature map), and
the training settings; ``mechanism.json`` holds the mechanism record. That is everything
needed to rebuild and run the instances without the training data.

:func:`load_ensemble` opens a run directory or a file written by :func:`export_ensemble`
(one safetensors file: every parameter stacked over instances, the description and the
per-instance checksums in its header). :class:`Ensemble` streams the instances in blocks, so
P = 10,000 fits in memory, verifies each instance's checksum as it reads it (a damaged or
altered model is refused, never used), and certifies with the same functions as ``dpcert
certify`` — so certifying a run's own test set through a loaded ensemble reproduces the run's
``certificates.csv``.

What loading checks: every model's checksum, its slot and that it lies inside the directory,
its weights against the model's parameter names, shapes and dtype (finite float32), the
description against the settings the directory was trained with and against the ranges its
numbers may take, and the claimed number of models against the files present before reading
any. That catches damage and edits of one file. Whoever can write every file can forge a
consistent record; to know that a file is the one you trained, compare its sha256 (printed by
``dpcert export``) with the one you recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpcert.certification.accounting import AccountingSpec, GroupBounds, default_cache_dir
from dpcert.certification.aggregation import (
    RUNOFF,
    baseline_certificate,
    check_threat,
    dp_label_flips,
    tally_votes,
)
from dpcert.certification.certify import (
    Certificates,
    certified_accuracy,
    confidence_bounds,
    search_radius,
)
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError
from dpcert.learning.inputs import InputSpec
from dpcert.store import atomic_write_text, load_tensors, tensors_digest
from dpcert.workflows import rundir, white_box

ENSEMBLE_FILE = rundir.ENSEMBLE
#: A baseline folder's certification settings (eta, max_radius), beside its description.
CERTIFICATION_FILE = rundir.CERTIFICATION
#: What kept models can be certified as: the DP ensemble, or a baseline defence's models
#: (roe and fa-roe: Run-off Election over DPA's or FA's models, as their default certificate).
DEFENCES = ("dp", "dpa", "fa", "bagging", "roe", "fa-roe")
FORMAT, VERSION = "dpcert-ensemble", 1
#: Model families that take vectors (N, D): trained on images, they see them flattened.
VECTOR_FAMILIES = ("linear", "nearest-neighbour", "kernel-ridge")
#: Radii at which the test-set certified accuracy curve is kept in an ensemble's description.
CURVE_POINTS = 64
#: Parameters read per block when streaming instances (bytes of float32).
BLOCK_BYTES = 1 << 26


def model_path(run_dir: Path, instance: int) -> Path:
    return Path(run_dir) / "instances" / f"inst_{instance:06d}.safetensors"


def keeps_models(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` keeps its trained models (runs written by dpcert 0.1 did
    not: they hold only each instance's test-set scores)."""
    return (Path(run_dir) / ENSEMBLE_FILE).exists()


def model_ok(run_dir: Path, instance: int) -> bool:
    return load_tensors(model_path(run_dir, instance)) is not None


@dataclass(frozen=True)
class EnsembleInfo:
    """What an ensemble is: enough to rebuild, run and certify it (a JSON object on disk)."""

    dataset: str
    model: str
    num_classes: int
    instances: int
    input: InputSpec
    #: the DP-SGD mechanism of every instance (None for the non-private baselines)
    mechanism: MechanismRecord | None
    eta: float
    max_radius: int
    training: dict = field(default_factory=dict)
    #: certified accuracy of the run's own test set: {"radii": [...], "ca": [...], ...}
    test_curve: dict | None = None
    #: which certificate the models take: "dp", or a baseline ("dpa", "fa", "bagging")
    defence: str = "dp"
    #: what a baseline's certificate needs besides the votes (spread, subsample, train_size)
    defence_params: dict = field(default_factory=dict)
    #: trained from a dataset whose input scale, label set and size were declared, never
    #: read off the training examples (every run since dpcert 0.3; absent before)
    declared_inputs: bool = True
    #: sha256 of the training split the models were trained on, and the dpcert that
    #: trained them (both recorded since 0.3)
    data_sha256: str | None = None
    dpcert_version: str | None = None
    #: a partition defence's models: sha256 of each model's examples and labels as a set
    #: (:func:`~dpcert.learning.data.part_fingerprints`; recorded since 0.3)
    part_sha256: list[str] | None = None

    def __post_init__(self) -> None:
        def bad(what: str) -> UserError:
            return UserError(f"the ensemble description is damaged or altered: {what}")

        if not (_is_int(self.num_classes) and 2 <= self.num_classes <= MAX_CLASSES):
            raise bad(f"num_classes {self.num_classes!r}")
        if not (_is_int(self.instances) and 1 <= self.instances <= MAX_INSTANCES):
            raise bad(f"instances {self.instances!r}")
        if not (isinstance(self.eta, float) and 0 < self.eta < 1):
            raise bad(f"eta {self.eta!r} (must lie in (0, 1))")
        if not (_is_int(self.max_radius) and 1 <= self.max_radius <= MAX_RADIUS):
            raise bad(f"max_radius {self.max_radius!r}")
        from dpcert.learning.data import RAW_MAX

        if self.dataset in RAW_MAX and self.input.shape is not None and \
                self.input.raw_max != RAW_MAX[self.dataset]:
            raise bad(f"raw_max {self.input.raw_max} for {self.dataset}, whose reader divides "
                      f"by {RAW_MAX[self.dataset]}")
        check_declared_inputs(self.dataset, self.num_classes, self.declared_inputs,
                              self.mechanism, int(self.training.get("validation") or 0))
        if self.defence not in DEFENCES:
            raise UserError(f"unknown defence {self.defence!r} ({', '.join(DEFENCES)})")
        if (self.mechanism is None) != (self.defence != "dp"):
            raise UserError("a DP ensemble needs its mechanism record, a baseline has none")
        if self.mechanism is not None:
            # what was trained (training) and what is certified (mechanism) must agree
            for key in ("sample_rate", "noise_multiplier", "steps", "clip_norm",
                        "subset_size"):
                if key in self.training and self.training[key] != getattr(self.mechanism, key):
                    raise bad(f"the mechanism's {key} {getattr(self.mechanism, key)!r} is not "
                              f"the training's {self.training[key]!r}")
            if self.training.get("instances", self.instances) != self.instances:
                raise bad(f"{self.instances} instances, but {self.training['instances']} "
                          "were trained")
        if self.part_sha256 is not None and not (
                isinstance(self.part_sha256, list) and len(self.part_sha256) == self.instances
                and all(isinstance(h, str) and len(h) == 64 for h in self.part_sha256)):
            raise bad(f"part_sha256 must list one sha256 per model ({self.instances})")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dataset": self.dataset,
                "model": self.model, "num_classes": self.num_classes,
                "instances": self.instances, "input": self.input.to_dict(),
                "mechanism": None if self.mechanism is None else self.mechanism.to_dict(),
                "eta": self.eta, "max_radius": self.max_radius, "training": self.training,
                "test_curve": self.test_curve, "defence": self.defence,
                "defence_params": self.defence_params,
                "declared_inputs": self.declared_inputs, "data_sha256": self.data_sha256,
                "dpcert_version": self.dpcert_version,
                **({} if self.part_sha256 is None else {"part_sha256": self.part_sha256})}

    @classmethod
    def from_dict(cls, d: object, where: str) -> EnsembleInfo:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{where} does not describe a dpcert ensemble")
        if d.get("version") != VERSION:
            raise UserError(f"{where} is ensemble format version {d.get('version')!r}; this "
                            f"dpcert reads version {VERSION}")
        try:
            mech = d["mechanism"]
            return cls(dataset=str(d["dataset"]), model=str(d["model"]),
                       num_classes=int(d["num_classes"]), instances=int(d["instances"]),
                       input=InputSpec.from_dict(d["input"]),
                       mechanism=None if mech is None else MechanismRecord.from_dict(mech),
                       eta=float(d["eta"]), max_radius=int(d["max_radius"]),
                       training=dict(d.get("training") or {}), test_curve=d.get("test_curve"),
                       defence=str(d.get("defence", "dp")),
                       defence_params=dict(d.get("defence_params") or {}),
                       declared_inputs=d.get("declared_inputs") is True,
                       data_sha256=_optional_str(d.get("data_sha256")),
                       dpcert_version=_optional_str(d.get("dpcert_version")),
                       part_sha256=d.get("part_sha256"))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where} is damaged: {err}") from None


#: Bounds on an ensemble description's numbers, checked before any work they would size.
MAX_CLASSES, MAX_INSTANCES, MAX_RADIUS = 100_000, 1_000_000, 1_000_000


def _optional_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def check_same_data(run_dir: Path, info: EnsembleInfo) -> None:
    """Refuse to resume a directory whose models were trained on other data (another file of
    the same dataset kind, another order, a changed example): the new models would join
    models of another training set."""
    path = Path(run_dir) / ENSEMBLE_FILE
    if not path.exists():
        return
    try:  # the record alone: the settings beside it may be mid-update by the same rerun
        old = json.loads(path.read_text()).get("data_sha256")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{path} is damaged ({err})") from None
    if old is not None and info.data_sha256 is not None and old != info.data_sha256:
        raise UserError(f"{run_dir} holds models trained on other data (training-set sha256 "
                        f"{old[:12]}..., now {info.data_sha256[:12]}...); use another "
                        "--output directory")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_declared_inputs(dataset: str, num_classes: int, declared: bool,
                          mechanism: MechanismRecord | None = None, validation: int = 0
                          ) -> None:
    """Refuse an ensemble trained before dpcert 0.3 on a path that read statistics of the
    training set: the .npz reader then rescaled every image when one lay outside [0, 1] and
    took the label set from the training data, and every DP run scaled its steps by the
    number of examples present — so one poisoned example could change every model, which no
    certificate covers. Runs on the fixed-scale readers with their 10 classes (and, for DP
    runs, trained on exactly the standard split's size, or on sub-datasets) are unaffected
    and load as before."""
    from dpcert.learning.data import DECLARED_SIZES

    if declared:
        return
    if dataset in DECLARED_SIZES and num_classes == 10:
        if mechanism is None or mechanism.subset_size is not None:
            return
        if mechanism.dataset_size == DECLARED_SIZES[dataset] - validation:
            return
    raise UserError(f"this {dataset} ensemble was trained by dpcert < 0.3, which took the image "
                    "scale, the label set or the DP step size from the training data itself; "
                    "no certificate covers that, so it is refused: retrain it")


def write_info(run_dir: Path, info: EnsembleInfo) -> None:
    atomic_write_text(Path(run_dir) / ENSEMBLE_FILE,
                      json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n")


def read_info(run_dir: Path, *, check_settings: bool = True) -> EnsembleInfo:
    path = Path(run_dir) / ENSEMBLE_FILE
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is damaged ({err})") from None
    info = EnsembleInfo.from_dict(d, str(path))
    if info.defence == "dp":
        # The mechanism that certifies is the run's record, not a copy that could drift.
        mech = MechanismRecord.load(Path(run_dir) / rundir.MECHANISM)
        if mech != info.mechanism:
            raise UserError(f"{path} and mechanism.json disagree; the run directory is "
                            "damaged")
    if check_settings:  # a rerun rewrites the settings, then this record: not mid-way
        _agrees_with_settings(Path(run_dir), info)
    return info


def _agrees_with_settings(run_dir: Path, info: EnsembleInfo) -> None:
    """The description against the settings the directory was trained with (config.json of
    a run, settings.json of a baseline's folder): an edit of one file alone is refused."""
    name = rundir.CONFIG if (run_dir / rundir.CONFIG).exists() else rundir.SETTINGS
    try:
        stored = json.loads((run_dir / name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{run_dir / name} is damaged ({err})") from None
    if not isinstance(stored, dict):
        raise UserError(f"{run_dir / name} is damaged (not a JSON object)")
    if name == rundir.CONFIG:
        checks = {k: getattr(info, k) for k in ("dataset", "instances", "eta", "max_radius")}
        checks.update({k: v for k, v in info.training.items()})
    else:
        k, d = stored.get("models"), stored.get("spread", 1)
        models = k * d if stored.get("kind") == "fa" and _is_int(d) else k
        if not (_is_int(k) and models == info.instances):
            raise UserError(f"{run_dir}: ensemble.json describes {info.instances} models, "
                            f"settings.json {models!r}; the folder is damaged or altered")
        checks = dict(info.training)
        cert_path = run_dir / CERTIFICATION_FILE
        if cert_path.exists():
            try:
                stored = {**stored, **json.loads(cert_path.read_text())}
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
                raise UserError(f"{cert_path} is damaged ({err})") from None
            checks.update(eta=info.eta, max_radius=info.max_radius)
    for key, value in checks.items():
        if key in stored and stored[key] != value:
            if name == rundir.SETTINGS and key in ("eta", "max_radius"):
                name = CERTIFICATION_FILE
            raise UserError(f"{run_dir}: ensemble.json says {key} = {value!r}, {name} "
                            f"{stored[key]!r}; the directory is damaged or altered")


def test_curve(run_dir: Path, max_radius: int) -> dict | None:
    """Certified accuracy of a run's test set from its certificates.csv and labels.npy."""
    csv, labels = Path(run_dir) / rundir.CERTIFICATES, Path(run_dir) / rundir.LABELS
    if not (csv.exists() and labels.exists()):
        return None
    rows = rundir.read_certificates(csv)
    try:
        y = np.load(labels, allow_pickle=False)
        if rows.shape[1:] != (4,) or y.shape != (len(rows),) or len(rows) == 0:
            raise ValueError("shapes do not match")
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{run_dir}: certificates.csv or labels.npy is damaged ({err}); "
                        "rerun the command that wrote them") from None
    cert = Certificates(rows[:, 1], rows[:, 2], np.zeros(len(rows)), np.zeros(len(rows)))
    top = int(max(1, rows[:, 2].max()))
    radii = np.unique(np.linspace(0, min(top, max_radius), CURVE_POINTS).round().astype(int))
    ca = certified_accuracy(cert, y, radii)
    return {"radii": radii.tolist(), "ca": [round(float(c), 6) for c in ca],
            "method": "pld, sound, votes", "test_points": len(rows)}


# -- where the instances come from -------------------------------------------------------------


class _RunDirSource:
    """Instances of a run directory (or a baseline setting's folder), one safetensors file
    each."""

    def __init__(self, run_dir: Path, paths: list[Path]) -> None:
        self.run_dir, self.paths = Path(run_dir), paths

    def _inside(self, i: int) -> Path:
        """Model i's file, refused when it is a link or lies outside the directory."""
        path = self.paths[i]
        if path.is_symlink() or not path.resolve().is_relative_to(self.run_dir.resolve()):
            raise UserError(f"model of instance {i} ({path}) is a link or lies outside "
                            f"{self.run_dir}; refusing to use it")
        return path

    def read_each(self, start: int, stop: int) -> list[dict[str, np.ndarray]]:
        """Models start..stop-1 as kept (each its own shapes), every one checked: inside the
        directory, its checksum, its slot."""
        params = []
        for i in range(start, stop):
            path = self._inside(i)
            got = load_tensors(path)
            if got is None:
                raise UserError(f"model of instance {i} in {self.run_dir} is missing, damaged or "
                                "fails its checksum; refusing to use it (rerun the command "
                                "that trained it on the same directory to retrain it)")
            slot = path.stem.removeprefix("inst_")
            if got[1].get("instance") != slot:
                raise UserError(f"{path} holds the model of slot {got[1].get('instance')!r}, not "
                                f"{slot!r}: moved or copied; refusing to use it")
            params.append(got[0])
        return params

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        from dpcert.learning.inference import stack_params

        return stack_params(self.read_each(start, stop))

    def digests(self) -> list[str]:
        """Every model's checksum, in slot order, from the files' headers (their contents are
        verified against these as they are read)."""
        from safetensors import SafetensorError, safe_open

        out = []
        for i in range(len(self.paths)):
            path = self._inside(i)
            try:
                with safe_open(str(path), framework="numpy") as f:
                    meta = dict(f.metadata() or {})
            except (OSError, SafetensorError, ValueError) as err:
                raise UserError(f"model of instance {i} in {self.run_dir} is missing or "
                                f"damaged ({err})") from None
            if not isinstance(meta.get("sha256"), str):
                raise UserError(f"model of instance {i} in {self.run_dir} has no checksum")
            out.append(meta["sha256"])
        return out


class _ExportSource:
    """Instances of an exported file: parameters stacked (P, ...), read a slice at a time."""

    def __init__(self, path: Path, digests: list[str], names: list[str],
                 rows: list[int] | None = None) -> None:
        self.path, self.digests_, self.names, self.rows = Path(path), digests, names, rows

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="numpy") as f:
                block = {n: f.get_slice(n)[start:stop] for n in self.names}
        except (OSError, SafetensorError, ValueError) as err:
            raise UserError(f"cannot read models from {self.path}: {err}") from None
        for j, i in enumerate(range(start, stop)):
            rows = None if self.rows is None else self.rows[start:stop]
            if tensors_digest(_instance(block, j, rows)) != self.digests_[i]:
                raise UserError(f"model of instance {i} in {self.path} fails its checksum; "
                                "the file is damaged or altered, refusing to use it")
        return block

    def read_each(self, start: int, stop: int) -> list[dict[str, np.ndarray]]:
        """Models start..stop-1, each without the padding rows its stack added."""
        block = self.read(start, stop)
        rows = None if self.rows is None else self.rows[start:stop]
        return [_instance(block, j, rows) for j in range(stop - start)]

    def digests(self) -> list[str]:
        return list(self.digests_)


def _open_export(path: Path) -> tuple[EnsembleInfo, _ExportSource]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as err:
        raise UserError(f"{path} is not a readable dpcert ensemble file: {err}") from None
    try:
        header = meta["dpcert"]
        digests = json.loads(meta["instance_sha256"])
        rows = None
        if isinstance(digests, dict) and set(digests) == {"sha256", "rows"}:
            digests, rows = digests["sha256"], digests["rows"]
            if not (isinstance(rows, list) and all(_is_int(r) and r >= 0 for r in rows)):
                raise UserError(f"{path}: the models' row counts are damaged")
        if _header_digest(header, meta["instance_sha256"]) != meta["header_sha256"]:
            raise UserError(f"{path}: the ensemble description fails its checksum; refusing")
        info = EnsembleInfo.from_dict(json.loads(header), str(path))
    except (KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a dpcert ensemble file (header: {err})") from None
    if not (isinstance(digests, list) and all(isinstance(d, str) for d in digests)):
        raise UserError(f"{path}: the models' checksums are damaged (not a list of strings)")
    if len(digests) != info.instances or any(not s or s[0] != info.instances
                                             for s in shapes.values()):
        raise UserError(f"{path}: the number of instances does not match its description")
    if rows is not None and (len(rows) != info.instances or any(
            r > shapes.get("examples", (0, 0))[1] for r in rows)):
        raise UserError(f"{path}: the models' row counts do not match the file")
    return info, _ExportSource(path, digests, sorted(shapes), rows)


# -- the ensemble --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """Votes (N, L) int64 — instance i votes for the argmax of its float32 scores — and mean
    softmax scores (N, L); ``scores`` (P, N, L) float32 when asked for."""

    votes: np.ndarray
    mean_scores: np.ndarray
    scores: np.ndarray | None = None


class Ensemble:
    """P kept instances, their input specification and mechanism record (see module docs).

    Use :func:`load_ensemble` to get one. ``device``: where the instances run ("cpu" or
    "cuda"). Thread-safe: a server may call :meth:`certify` from several threads."""

    def __init__(self, info: EnsembleInfo, source, *, device: str = "cpu",
                 origin: str = "") -> None:
        self.info, self._source, self.device, self.origin = info, source, device, origin
        self._resident: list[dict] | None = None
        self._per_instance: int | None = None
        self._bounds: dict[AccountingSpec, GroupBounds] = {}
        self._kernel_parts: list | int | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"Ensemble({self.info.instances} x {self.info.model} on {self.info.dataset}, "
                f"{self.info.input.describe()}, from {self.origin})")

    @property
    def mechanism(self) -> MechanismRecord:
        if self.info.mechanism is None:
            raise UserError(f"a {self.info.defence} ensemble has no DP mechanism")
        return self.info.mechanism

    def _block_size(self) -> int:
        """Instances per block: as many as fit in BLOCK_BYTES (instance 0 read once to size
        them); the example-row families in the aligned blocks they were trained and scored
        in, so that the kept models vote exactly as the run's own did."""
        from dpcert.learning.inference import KERNEL, NEAREST, ROW_MODELS_PER_CALL

        if self.info.model in (NEAREST, KERNEL):
            return min(self.info.instances, ROW_MODELS_PER_CALL)
        if self._per_instance is None:
            first = self._source.read(0, 1)
            self._per_instance = sum(a[0].nbytes for a in first.values())
        return max(1, min(self.info.instances, BLOCK_BYTES // max(1, self._per_instance)))

    def _blocks(self) -> Iterator[dict]:
        import torch

        from dpcert.learning.inference import prepare

        if self._resident is not None:
            yield from self._resident
            return
        k, p = self._block_size(), self.info.instances
        for start in range(0, p, k):
            block = self._source.read(start, min(p, start + k))
            self._check_weights(block, start)
            yield prepare(self.info.model,
                          {n: torch.from_numpy(a).to(self.device) for n, a in block.items()})

    def digest(self) -> str:
        """The ensemble's digest: sha256 of its canonical manifest — the description
        (defence, mechanism, training settings, input, declared-inputs mark; not the test-set
        curve, which is derived) and every model's checksum in slot order. The same for a run
        directory and its export; any change to what is certified changes it."""
        info = {k: v for k, v in self.info.to_dict().items() if k != "test_curve"}
        manifest = {"format": "dpcert-manifest", "version": 1, "ensemble": info,
                    "models": self._source.digests()}
        blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def verify(self, *, progress: bool = False) -> str:
        """Read and check every model (checksum, slot, weights) without keeping them;
        returns :meth:`digest`."""
        bar = _bar(progress, self.info.instances)
        for block in self._blocks():
            if bar is not None:
                bar.update(len(next(iter(block.values()))))
        if bar is not None:
            bar.close()
        return self.digest()

    def _check_weights(self, block: dict[str, np.ndarray], start: int) -> None:
        """Refuse weights that are not what this ensemble's model holds: float32, finite,
        the family's parameter names and shapes (example-row families: any number of rows
        of the right width)."""
        from dpcert.learning.inference import KERNEL, NEAREST, ROW_PADDING, expected_shapes

        stop = start + len(next(iter(block.values())))
        where = f"the models of instances {start}..{stop - 1} in {self.origin}"
        for name, a in block.items():
            if a.dtype != np.float32:
                raise UserError(f"{where}: {name} is {a.dtype}, not float32; damaged or altered")
            if not np.isfinite(a).all():
                raise UserError(f"{where}: {name} holds non-finite weights; damaged or altered")
        labels, d = self.info.num_classes, self._in_channels()
        if self.info.model in (NEAREST, KERNEL):
            want = {"examples": (d,), "scale": (1,)}
            want.update({"labels": ()} if self.info.model == NEAREST else
                        {"coef": (labels,), "gamma": (1,), "bias": (labels,)})
            got = {n: a.shape[2:] if n in ROW_PADDING else a.shape[1:] for n, a in block.items()}
        else:
            want = expected_shapes(self.info.model, d, labels,
                                   feature_dim=d if self.info.model == "linear" else None)
            got = {n: a.shape[1:] for n, a in block.items()}
        if got != want:
            name = next(n for n in sorted({*got, *want}) if got.get(n) != want.get(n))
            raise UserError(f"{where}: parameter {name!r} of shape {got.get(name)} is not that "
                            f"of a {self.info.model} model ({want.get(name)}); their "
                            "parameters are not those of the model: damaged or altered")

    def load(self) -> Ensemble:
        """Read and verify every instance once and keep them on the device (a server does
        this at start: each request then runs on resident weights). Returns self."""
        self._resident = None
        self._resident = list(self._blocks())
        return self

    def _in_channels(self) -> int:
        """What the model factories take: the feature dimension for models on feature
        vectors (images flattened for the vector families), the image channels otherwise."""
        spec = self.info.input
        if spec.shape is None or spec.features is not None:
            return int(spec.feature_dim or 0)
        if self.info.model in VECTOR_FAMILIES:
            return int(np.prod(spec.shape))
        return spec.shape[0]

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """``x`` in any accepted form (:class:`~dpcert.learning.inputs.InputSpec`) -> what the
        instances take (images, features, or images flattened for the models that take
        vectors: a partition defence's closed-form learners trained on raw images)."""
        x = self.info.input.to_model_input(np.asarray(x))
        if self.info.model in VECTOR_FAMILIES and x.ndim > 2:
            x = np.ascontiguousarray(x.reshape(len(x), -1))
        return x

    def predict(self, x: np.ndarray, *, keep_scores: bool = False,
                progress: bool = False) -> Prediction:
        """Run every instance on inputs ``x``: votes and mean scores per input."""
        import torch

        from dpcert.learning.inference import score_instances

        xin = torch.from_numpy(self.model_input(x)).to(self.device)
        n, labels = len(xin), self.info.num_classes
        votes = np.zeros((n, labels), np.int64)
        total = np.zeros((n, labels), np.float64)
        kept = []
        bar = _bar(progress, self.info.instances)
        for block in self._blocks():
            s = score_instances(self.info.model, block, xin,
                                in_channels=self._in_channels(), num_classes=labels)
            if s.shape[1:] != (n, labels):
                raise UserError(f"the stored models give {s.shape[2]} labels, the ensemble "
                                f"describes {labels}")
            votes += tally_votes(s)  # from float32 scores, as the run counted them
            total += s.sum(axis=0, dtype=np.float64)
            if keep_scores:
                kept.append(s)
            if bar is not None:
                bar.update(len(s))
        if bar is not None:
            bar.close()
        return Prediction(votes, total / self.info.instances,
                          np.concatenate(kept) if keep_scores else None)

    def group_bounds(self, spec: AccountingSpec) -> GroupBounds:
        """The group tables of this mechanism under ``spec``, built once and kept."""
        with self._lock:
            if spec not in self._bounds:
                self._bounds[spec] = GroupBounds(self.mechanism, spec,
                                                 cache_dir=default_cache_dir())
            return self._bounds[spec]

    def certify(self, x: np.ndarray, *, eta: float | None = None, accounting: str = "pld",
                group: str = "sound", inference: str = "multinomial", bound: str | None = None,
                max_radius: int | None = None, progress: bool = False,
                threat: str = "poisoning") -> Certificates:
        """Prediction and certified radius per input (radius -1: abstain), as
        :func:`dpcert.certify` gives them for this ensemble's outputs on ``x``. Defaults:
        the run's eta and largest radius, PLD accounting, sound group privacy, votes.
        ``threat="label-flip"``: the radius counts flipped training labels instead of
        inserted and deleted examples (:mod:`dpcert.certification.aggregation`)."""
        return self.certify_with_votes(x, eta=eta, accounting=accounting, group=group,
                                       inference=inference, bound=bound,
                                       max_radius=max_radius, progress=progress,
                                       threat=threat)[0]

    def certify_with_votes(self, x: np.ndarray, *, eta: float | None = None,
                           accounting: str = "pld", group: str = "sound",
                           inference: str = "multinomial", bound: str | None = None,
                           max_radius: int | None = None, progress: bool = False,
                           threat: str = "poisoning") -> tuple[Certificates, Prediction]:
        """:meth:`certify`, also returning the :class:`Prediction` it rests on."""
        check_threat(threat)
        if self.info.defence != "dp":
            if (accounting, group, inference, bound) != ("pld", "sound", "multinomial", None):
                raise UserError(f"a {self.info.defence} ensemble takes its own certificate; "
                                "accounting, group, inference and bound are for DP ensembles")
            return self._certify_baseline(x, eta, max_radius, progress, threat=threat)
        spec = AccountingSpec(accounting=accounting, group=group,
                              max_radius=self.info.max_radius if max_radius is None
                              else max_radius)
        eta = self.info.eta if eta is None else eta
        pred = self.predict(x, keep_scores=inference == "scores", progress=progress)
        outputs = pred.votes if inference == "multinomial" else pred.scores
        conf = confidence_bounds(outputs, inference=inference, eta=eta, bound=bound)
        bounds = self.group_bounds(spec)
        with self._lock:  # the tables grow in place as larger radii are probed
            radius = search_radius(conf, bounds, max_radius=spec.max_radius)
        cert = Certificates(conf.prediction, radius, conf.p_lower, conf.p_upper)
        return (dp_label_flips(cert) if threat == "label-flip" else cert), pred


    def _certify_baseline(self, x: np.ndarray, eta: float | None, max_radius: int | None,
                          progress: bool, method: str | None = None,
                          threat: str = "poisoning") -> tuple[Certificates, Prediction]:

        pred = self.predict(x, keep_scores=True, progress=progress)
        return self.certify_prediction(pred, eta=eta, max_radius=max_radius, method=method,
                                       threat=threat, inputs=x, progress=progress), pred

    def certify_prediction(self, pred: Prediction, *, eta: float | None = None,
                           max_radius: int | None = None, method: str | None = None,
                           threat: str = "poisoning", inputs: np.ndarray | None = None,
                           progress: bool = False) -> Certificates:
        """A baseline defence's certificate from a :class:`Prediction` that kept its scores
        (another threat or aggregation of the same outputs, without running the models
        again). ``inputs``: the inputs the prediction was made on; with them, DPA over kernel
        ridge certifies label flips white-box (:mod:`dpcert.workflows.white_box`), without
        them by counting votes (sound, and smaller)."""
        if pred.scores is None:
            raise UserError("this prediction kept no scores (predict(..., keep_scores=True))")
        if (threat == "label-flip" and inputs is not None and method is None
                and white_box.applies(self.info.defence, self.info.model)):
            return self._white_box_flips(pred, inputs, max_radius, progress)
        params = self.info.defence_params
        return baseline_certificate(method or self.info.defence, pred.scores,
                                    spread=int(params.get("spread", 1)),
                                    train_size=int(params.get("train_size", 1)),
                                    subsample=int(params.get("subsample", 1)),
                                    eta=self.info.eta if eta is None else eta,
                                    max_radius=self.info.max_radius if max_radius is None
                                    else max_radius, threat=threat)

    def _white_box_flips(self, pred: Prediction, inputs: np.ndarray, max_radius: int | None,
                         progress: bool) -> Certificates:
        gamma, ridge = self._kernel_setting()
        parts = self.kernel_parts()
        if isinstance(parts, int):
            import warnings

            from dpcert.errors import InputWarning

            warnings.warn(f"model {parts} of {self.origin}: its labels cannot be recovered "
                          f"from its coefficients at ridge {ridge:g} (float32 hides them at a "
                          "ridge this small); label flips certified by counting votes",
                          InputWarning, stacklevel=3)
            return self.certify_prediction(pred, max_radius=max_radius, method="dpa",
                                           threat="label-flip")
        return white_box.certificate(parts, self.model_input(inputs),
                                     pred.scores, gamma=gamma, ridge=ridge,
                                     max_radius=self.info.max_radius if max_radius is None
                                     else max_radius, progress=progress)

    def _kernel_setting(self) -> tuple[float, float]:
        """The kernel width and ridge the record says the kernel-ridge parts were fitted
        with."""
        training = self.info.training or {}
        gamma, ridge = training.get("gamma"), training.get("ridge")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
                   for v in (gamma, ridge)):
            raise UserError(f"{self.origin}: the record names no kernel width and ridge of its "
                            "kernel-ridge models; damaged or altered")
        return float(gamma), float(ridge)

    def kernel_parts(self) -> list | int:
        """Every kernel-ridge part's system, from its kept model (its labels recovered from
        its coefficients), built once: what the white-box label-flip certificate reads; or
        the index of the first model whose labels cannot be recovered."""
        gamma, ridge = self._kernel_setting()
        with self._lock:
            if self._kernel_parts is None:
                self._kernel_parts = white_box.parts_from_models(self._each_model(gamma),
                                                                 gamma=gamma, ridge=ridge)
            return self._kernel_parts

    def _each_model(self, gamma: float) -> Iterator[dict[str, np.ndarray]]:
        """Every model's parameters with its own rows, checked like a block of them, and
        fitted at the record's kernel width."""
        from dpcert.learning.inference import stack_params

        k, p = self._block_size(), self.info.instances
        for start in range(0, p, k):
            models = self._source.read_each(start, min(p, start + k))
            self._check_weights(stack_params(models), start)
            for j, params in enumerate(models):
                if params["gamma"][0] != np.float32(gamma):
                    raise UserError(f"{self.origin}: model {start + j} has kernel width "
                                    f"{params['gamma'][0]:g}, the record {gamma:g}; damaged "
                                    "or altered")
                yield params

    def certify_roe(self, x: np.ndarray, *, max_radius: int | None = None) -> Certificates:
        """Run-off Election over a DPA or Finite Aggregation ensemble's models (the same
        models, another aggregation and certificate: ROE, or FA + ROE)."""

        runoff = {base: kind for kind, base in RUNOFF.items()}.get(self.info.defence)
        if self.info.defence in RUNOFF:
            runoff = self.info.defence
        if runoff is None:
            raise UserError("Run-off Election aggregates the models of a DPA or Finite "
                            f"Aggregation ensemble, not of a {self.info.defence} ensemble")
        return self._certify_baseline(x, None, max_radius, False, method=runoff)[0]


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="running instances", unit="inst", leave=False)


def load_ensemble(path: str | Path, *, device: str = "cpu", digest: str | None = None
                  ) -> Ensemble:
    """A kept ensemble from a run directory, a baseline setting's folder of ``dpcert
    compare`` (e.g. ``dpa_k50``), or an exported file (``dpcert export``).

    ``digest``: refuse any ensemble whose :meth:`Ensemble.digest` is not this one (pin the
    digest that ``dpcert run``, ``export`` or ``verify`` printed when you trained it).

    Raises :class:`~dpcert.errors.UserError` for anything that is not a complete, intact
    ensemble — including runs made before models were kept, which can still certify their
    own test set (``dpcert certify``) but cannot predict new inputs."""
    ens = _load_ensemble(Path(path), device)
    if digest is not None:
        got = ens.digest()
        if got != digest.strip().lower():
            raise UserError(f"{path} has digest {got}, not the pinned {digest.strip()}; "
                            "refusing it")
    return ens


def _load_ensemble(path: Path, device: str) -> Ensemble:
    from dpcert.errors import check_device

    check_device(device)
    if path.is_dir():
        is_run = (path / rundir.CONFIG).exists()
        if not is_run and not (path / rundir.SETTINGS).exists():
            raise UserError(f"{path} is neither a dpcert run directory (no config.json) nor "
                            "a baseline folder of dpcert compare (no settings.json)")
        if not keeps_models(path):
            raise UserError(f"{path} was trained by a dpcert that kept no models: it can "
                            "certify its own test set (dpcert certify) but not predict new "
                            "inputs; retrain into a new directory to get models")
        info = read_info(path)
        folder = path / "instances" if is_run else path
        # before any work the claimed number would size: are there that many model files?
        present = sum(1 for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
        if present < info.instances:
            raise UserError(f"{path} describes {info.instances} models but holds {present} "
                            "model files; it is incomplete, damaged or altered")
        if is_run:
            paths = [model_path(path, i) for i in range(info.instances)]
            curve = test_curve(path, info.max_radius)
            if curve is not None:
                info = dataclasses.replace(info, test_curve=curve)
        else:
            paths = [path / f"model_{i:06d}.safetensors" for i in range(info.instances)]
        return Ensemble(info, _RunDirSource(path, paths), device=device, origin=str(path))
    if not path.exists():
        raise UserError(f"no ensemble at {path} (neither a run directory nor a file)")
    info, source = _open_export(path)
    return Ensemble(info, source, device=device, origin=str(path))


def export_ensemble(run_dir: str | Path, out: str | Path, *, progress: bool = False) -> str:
    """Write a run's ensemble into one portable safetensors file; returns the file's sha256.

    Every parameter is stacked over instances (P, ...), float32; the header holds the
    description (model, input specification, mechanism, training settings, test-set curve),
    each instance's checksum and a checksum of the header. Each instance is verified as it is
    read. The file is written atomically."""
    from dpcert.learning.inference import ROW_PADDING, stack_params

    ens = load_ensemble(run_dir)
    if not isinstance(ens._source, _RunDirSource):
        raise UserError(f"{run_dir} is already an exported file; copy it instead")
    p = ens.info.instances
    k = ens._block_size()
    bar = _bar(progress, p)
    params: list[dict[str, np.ndarray]] = []
    for start in range(0, p, k):
        each = ens._source.read_each(start, min(p, start + k))  # each as kept: its own rows
        ens._check_weights(stack_params(each), start)
        params += each
        if bar is not None:
            bar.update(min(p, start + k) - start)
    if bar is not None:
        bar.close()
    digests = [tensors_digest(a) for a in params]
    rows = [next((len(a[n]) for n in ROW_PADDING if n in a), None) for a in params]
    stacked = stack_params(params)
    del params
    return write_export(out, stacked, ens.info, digests=digests,
                        rows=None if rows[0] is None else rows)


def _instance(stacked: dict[str, np.ndarray], j: int, rows: list[int] | None
              ) -> dict[str, np.ndarray]:
    """Instance j of stacked parameters, without the padding rows its stack added."""
    from dpcert.learning.inference import ROW_PADDING

    return {n: a[j][:rows[j]] if rows is not None and n in ROW_PADDING else a[j]
            for n, a in stacked.items()}


def _header_digest(header: str, digest_json: str) -> str:
    return hashlib.sha256((header + digest_json).encode()).hexdigest()


def write_export(out: str | Path, stacked: dict[str, np.ndarray], info: EnsembleInfo, *,
                 digests: list[str] | None = None, rows: list[int] | None = None) -> str:
    """Write parameters stacked over instances {name: (P, ...)} and ``info`` as an exported
    ensemble file (atomically); returns the file's sha256. ``rows``: each example-row
    model's own number of rows (the stack pads them); its checksum in ``digests`` is of the
    model as kept, so that a run and its export have one digest."""
    from safetensors.numpy import save

    from dpcert.store import atomic_write

    p = info.instances
    if digests is None:
        digests = [tensors_digest(_instance(stacked, i, rows)) for i in range(p)]
    header = json.dumps(info.to_dict(), sort_keys=True)
    digest_json = json.dumps(digests)
    if rows is not None:  # the row counts are covered by the header checksum too
        digest_json = json.dumps({"sha256": digests, "rows": rows})
    meta = {"dpcert": header, "instance_sha256": digest_json,
            "header_sha256": _header_digest(header, digest_json)}
    blob = save(stacked, metadata=meta)
    atomic_write(Path(out), lambda h: h.write(blob))
    return hashlib.sha256(blob).hexdigest()
