"""`dpcert compare`: DP instances vs DPA vs Bagging on the same data and model, one report.

Every method is trained with the same architecture on the same training set and certified
for the same threat (radius = inserted + deleted training examples; a modification counts 2):

* dp: this project's run (:mod:`dpcert.run`), default certificate (PLD, sound, votes);
* dpa: k models, one per part of a hash partition of the examples' content
  (Levine & Feizi 2021) — the part of an example does not depend on the rest of the data;
* bagging: N models, each on k examples drawn with replacement (Jia, Cao, Gong 2021);
* baseline-DP: the statistical certified-accuracy lower bound of Ma, Zhu, Hsu (2019) for one
  of the DP instances (a curve, not a per-point certificate).

Each trained model's test scores are written atomically as a unit file and reused on rerun.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpcert import baselines
from dpcert.certify import Certificates
from dpcert.errors import UserError
from dpcert.run import RunConfig, read_unit, run, write_unit
from dpcert.store import atomic_write_text


@dataclass(frozen=True)
class BaselineConfig:
    models: int = 50
    subsample: int = 200  # bagging: examples per bag
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "adam"


@dataclass(frozen=True)
class CompareConfig:
    dp: dict = field(default_factory=dict)  # RunConfig fields
    dpa: dict = field(default_factory=dict)  # BaselineConfig fields (models = partitions)
    bagging: dict = field(default_factory=dict)  # BaselineConfig fields
    methods: tuple[str, ...] = ("dp", "dpa", "bagging")

    @classmethod
    def from_mapping(cls, data: dict) -> CompareConfig:
        unknown = set(data) - {"dp", "dpa", "bagging", "methods"}
        if unknown:
            raise UserError(f"unknown compare config keys: {sorted(unknown)}")
        methods = tuple(data.get("methods", cls.methods))
        bad = set(methods) - {"dp", "dpa", "bagging"}
        if bad:
            raise UserError(f"unknown methods {sorted(bad)} (dp, dpa, bagging)")
        for key in ("dpa", "bagging"):
            try:
                BaselineConfig(**data.get(key, {}))
            except TypeError as err:
                raise UserError(f"invalid {key} config: {err}") from None
        RunConfig.from_mapping(data.get("dp", {}))
        return cls(dict(data.get("dp", {})), dict(data.get("dpa", {})),
                   dict(data.get("bagging", {})), methods)


def hash_partition(x: np.ndarray, parts: int) -> np.ndarray:
    """Part of every example from a hash of its own content (shape (n,), values 0..parts-1)."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    return np.array([int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "big") % parts
                     for row in flat], dtype=np.int64)


def _train_models(kind: str, cfg: BaselineConfig, run_cfg: RunConfig, folder: Path,
                  progress: bool) -> np.ndarray:
    """Votes (N, L) of the baseline's models, training only those not yet on disk."""
    import torch
    from tqdm import tqdm

    from dpcert.data import load_dataset
    from dpcert.train import instance_generator, predict_scores, train_plain

    data = load_dataset(run_cfg.dataset, Path(run_cfg.data_dir) if run_cfg.data_dir else None)
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    x_test = torch.tensor(data.x_test)
    parts = hash_partition(data.x_train, cfg.models) if kind == "dpa" else None
    folder.mkdir(parents=True, exist_ok=True)
    votes = np.zeros((len(data.y_test), data.num_classes), dtype=np.int64)
    for i in tqdm(range(cfg.models), desc=f"training {kind}", disable=not progress):
        path = folder / f"model_{i:06d}.npz"
        scores = read_unit(path)
        if scores is None:
            gen = instance_generator(run_cfg.seed + 7919, i)
            if kind == "dpa":
                idx = torch.tensor(np.flatnonzero(parts == i))
            else:
                idx = torch.randint(0, len(y), (cfg.subsample,), generator=gen)
            if len(idx) == 0:  # an empty part predicts nothing: it votes for label 0
                scores = np.zeros((len(x_test), data.num_classes), np.float32)
                scores[:, 0] = 1.0
            else:
                model = train_plain(run_cfg.model, x[idx], y[idx], data.num_classes,
                                    epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    optimizer=cfg.optimizer, gen=gen)
                scores = predict_scores(model, x_test)
            write_unit(path, scores)
        votes[np.arange(len(votes)), scores.argmax(axis=1)] += 1
    return votes


def compare(cfg: CompareConfig, out: Path, progress: bool = True) -> str:
    run_cfg = RunConfig.from_mapping(cfg.dp)
    labels = None
    results: dict[str, Certificates] = {}
    curves: dict[str, object] = {}
    if "dp" in cfg.methods:
        run(run_cfg, out / "dp", progress)
        votes = np.load(out / "dp" / "votes.npy")
        labels = np.load(out / "dp" / "labels.npy")
        cert_rows = np.loadtxt(out / "dp" / "certificates.csv", delimiter=",", skiprows=1,
                               dtype=np.int64, ndmin=2)
        results["dp (pld, sound)"] = _cert(cert_rows[:, 1], cert_rows[:, 2])
        curves["baseline-DP (Ma et al., CA lower bound)"] = _ma_curve(out / "dp", run_cfg.eta)
    from dpcert.data import load_dataset

    data = load_dataset(run_cfg.dataset, Path(run_cfg.data_dir) if run_cfg.data_dir else None)
    labels = data.y_test if labels is None else labels
    n_train = len(data.y_train)
    if "dpa" in cfg.methods:
        bc = BaselineConfig(**cfg.dpa)
        votes = _train_models("dpa", bc, run_cfg, out / "dpa", progress)
        pred, radius = baselines.dpa_radius(votes)
        results[f"dpa (k={bc.models})"] = _cert(pred, radius)
    if "bagging" in cfg.methods:
        bc = BaselineConfig(**cfg.bagging)
        votes = _train_models("bagging", bc, run_cfg, out / "bagging", progress)
        pred, radius = baselines.bagging_radius(votes, train_size=n_train,
                                                subsample_size=bc.subsample, eta=run_cfg.eta,
                                                max_radius=run_cfg.max_radius)
        results[f"bagging (N={bc.models}, k={bc.subsample})"] = _cert(pred, radius)
    return _report(results, labels, out, run_cfg, curves)


def _cert(pred: np.ndarray, radius: np.ndarray) -> Certificates:
    nan = np.full(len(pred), np.nan)
    return Certificates(np.asarray(pred), np.asarray(radius), nan, nan)


def _ma_curve(run_dir: Path, eta: float, delta: float = 1e-5):
    """Ma, Zhu, Hsu (2019): CA_r lower bound of one DP model from the run's own instances.

    (eps, delta) is the exact single-example profile at delta = 1e-5; the expected accuracy of
    one instance is lower-bounded by Hoeffding over the P independent instances at level eta.
    """
    from dpcert.accounting import EPS_GRID
    from dpcert.mechanism import MechanismRecord
    from dpcert.pld import group_privacy_profile

    rec = MechanismRecord.load(run_dir / "mechanism.json")
    prof = group_privacy_profile(rec.sample_rate, rec.noise_multiplier, 1, rec.steps, EPS_GRID)
    ok = np.flatnonzero(prof <= delta)
    eps = float(EPS_GRID[ok[0]]) if ok.size else np.inf
    scores = np.load(run_dir / "scores.npy")
    labels = np.load(run_dir / "labels.npy")
    per_instance = (scores.argmax(axis=2) == labels[None, :]).mean(axis=1)
    acc_lo = max(0.0, float(per_instance.mean()) - np.sqrt(np.log(1 / eta) / (2 * len(scores))))
    if not np.isfinite(eps):
        return lambda radii: np.zeros(np.shape(radii))
    return lambda radii: baselines.dp_baseline_accuracy(radii, eps, delta, acc_lo)


def _report(results: dict[str, Certificates], labels: np.ndarray, out: Path,
            cfg: RunConfig, curves: dict[str, object]) -> str:
    from dpcert.report import ca_table, plot_curves

    lines = [f"# dpcert compare: {cfg.dataset}, model {cfg.model}", "",
             "Radius = inserted + deleted training examples (a modification counts 2), the same "
             "convention for every method. CA@r = fraction of test points predicted correctly "
             "and certified at radius >= r. The baseline-DP row is a statistical lower bound on "
             "certified accuracy (no per-point certificate).", "",
             *ca_table(results, labels, curves)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "compare.md", text)
    plot_curves(results, labels, out / "compare.png", f"{cfg.dataset}: defences compared",
                curves)
    return text
