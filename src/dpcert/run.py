"""The main job: train P DP-SGD instances -> predict -> certify -> report, in a resumable run store.

Run directory layout (a public contract other tools read):

    config.json          the training configuration (a rerun with other values is refused)
    mechanism.json       the mechanism record (sample_rate, noise_multiplier, steps, ...)
    instances/inst_NNNNNN.npz   softmax scores (N, L) of one instance + checksum, atomic
    votes.npy            int64 (N, L) vote counts       scores.npy  float32 (P, N, L)
    labels.npy           int64 (N,) test labels
    certificates.csv     index,prediction,radius,label for the default method (pld, sound, votes)
    certificates_<method>.csv   the same for every other method
    report.md            certified-accuracy table        certified_accuracy.png  CA_r curves

Each instance is written atomically as soon as it finishes; a rerun skips the finished ones
(after verifying their checksums), so a crash loses at most the instances in flight, and the
final result equals an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from dpcert.accounting import AccountingSpec
from dpcert.certify import Certificates, certify
from dpcert.errors import UserError
from dpcert.features import FEATURES as FEATURE_NAMES
from dpcert.mechanism import MechanismRecord
from dpcert.store import (
    atomic_save_npy,
    atomic_save_unit,
    atomic_write_text,
    remove_stale_temp_files,
)

#: Datasets and models a run can name (models.MODELS holds the builders; a test keeps the two
#: in step, so that validating a config does not import torch).
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "npz")
MODEL_NAMES = ("digits_cnn", "lenet5", "cifar_cnn", "resnet18_gn", "linear")
#: Iterate averaging of the linear engine (dpcert.engine.AVERAGING, which needs torch).
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
    seed: int = 0
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
                       "averaging", "seed")

    def __post_init__(self) -> None:
        for name, choices in (("dataset", DATASETS), ("model", MODEL_NAMES),
                              ("optimizer", ("sgd", "adam")), ("device", ("cpu", "cuda")),
                              ("backend", ("local", "ray"))):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, name)!r}")
        checks = [("instances", 2), ("seed", 0), ("max_radius", 1), ("workers", 0)]
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
        if (self.model == "linear") != (self.features is not None):
            raise UserError("the linear model trains on fixed features and conv models on "
                            "images: set model: linear together with features: scatter")
        if self.model == "linear" and self.optimizer != "sgd":
            raise UserError("the linear model trains with optimizer: sgd")
        if self.averaging is not None and self.model != "linear":
            raise UserError("averaging is available for the linear model only")
        if not (_is_real(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a number > 0, got {self.lr!r}")
        if not (_is_real(self.eta) and 0 < self.eta < 1):
            raise UserError(f"eta must lie in (0, 1), got {self.eta!r}")
        if not (_is_real(self.gpu_fraction) and 0 < self.gpu_fraction <= 1):
            raise UserError(f"gpu_fraction must lie in (0, 1], got {self.gpu_fraction!r}")
        # the mechanism checks q, sigma, T, C and the subset size
        MechanismRecord(sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier,
                        steps=self.steps, clip_norm=self.clip_norm,
                        dataset_size=None if self.subset_size is None else 2**62,
                        subset_size=self.subset_size)

    @classmethod
    def from_mapping(cls, data: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown config keys: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise UserError(f"invalid config: {err}") from None

    def training(self) -> dict:
        return {k: getattr(self, k) for k in self.TRAINING_FIELDS}


#: (label, accounting, group, inference, confidence bound); the first is the default method.
METHODS = (
    ("pld", "pld", "sound", "multinomial", None),
    ("pld_scores", "pld", "sound", "scores", None),
    ("rdp", "rdp", "sound", "multinomial", None),
    ("rdp_scores", "rdp", "sound", "scores", None),
    ("adp", "adp", "sound", "multinomial", None),
    ("adp_scores", "adp", "sound", "scores", None),
    ("paper_rdp", "rdp", "paper", "multinomial", "paper"),
    ("paper_rdp_scores", "rdp", "paper", "scores", "paper"),
    ("paper_adp", "adp", "paper", "multinomial", "paper"),
    ("paper_adp_scores", "adp", "paper", "scores", "paper"),
)


def load_run_data(cfg: RunConfig):
    """The run's dataset (:class:`dpcert.data.Dataset`), as features when the run uses them;
    loaded once per process."""
    from dpcert.data import load_dataset_cached

    return load_dataset_cached(cfg.dataset, cfg.data_dir, cfg.features)


def load_config_file(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    return data


# -- instance units -----------------------------------------------------------------------------


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


def train_group(cfg: RunConfig, instances: list[int], data,
                on_step: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Test scores (N, L) of the given instances, trained as one stacked computation on the
    run's device (:mod:`dpcert.stacked`; the linear model: :mod:`dpcert.engine`).

    Pure: no files. ``data`` is a :class:`dpcert.data.Dataset`; ``on_step(t)`` reports
    progress (image models)."""
    import torch

    device = torch.device(cfg.device)
    x = torch.tensor(data.x_train, device=device)
    y = torch.tensor(data.y_train, device=device)
    if cfg.model == "linear":
        from dpcert.engine import LinearDpSgd, predict_linear, train_linear

        lcfg = LinearDpSgd(cfg.sample_rate, cfg.noise_multiplier, cfg.steps, cfg.clip_norm,
                           cfg.lr, cfg.subset_size, cfg.averaging)
        weight, bias = train_linear(lcfg, x, y, data.num_classes, seed=cfg.seed,
                                    instances=instances)
        return list(predict_linear(weight, bias, torch.tensor(data.x_test, device=device)))
    from dpcert.models import build_model
    from dpcert.stacked import DpSgd, predict_stacked, train_stacked

    dcfg = DpSgd(cfg.sample_rate, cfg.noise_multiplier, cfg.steps, cfg.clip_norm, cfg.lr,
                 cfg.optimizer, cfg.subset_size)
    in_channels = data.x_train.shape[1]
    st = train_stacked(dcfg, lambda: build_model(cfg.model, in_channels, data.num_classes),
                       x, y, seed=cfg.seed, instances=instances, progress=on_step)
    return list(predict_stacked(st, torch.tensor(data.x_test, device=device)))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned training processes with one torch thread each: on CPUs one worker process per
    core beats intra-op threads (docs/benchmarks.md). Shared by run, compare, attack-check."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=_one_thread)


def _train_units(cfg_dict: dict, instances: list[int], outs: list[str],
                 on_step: Callable[[int], None] | None = None) -> list[int]:
    """Local backend: train a group of instances and write each unit file as it is ready."""
    cfg = RunConfig(**cfg_dict)
    data = load_run_data(cfg)
    for scores, out in zip(train_group(cfg, instances, data, on_step), outs, strict=True):
        write_unit(Path(out), scores)
    return instances


def _ray_group(cfg_dict: dict, instances: list[int], data) -> list[np.ndarray]:
    """Ray task body: one worker thread (like a local worker process), scores returned."""
    _one_thread()
    return train_group(RunConfig(**cfg_dict), instances, data)


def _train_ray(cfg: RunConfig, groups: list[list[int]], outs, bar) -> None:
    """Ray backend: one task per group, the dataset shipped once through the object store.

    The driver writes each unit atomically as its task returns, so workers need no shared
    filesystem; a crashed driver loses only the tasks in flight (rerun resumes), and Ray
    retries tasks whose worker died (``max_retries``)."""
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'dpcert[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, logging_level="WARNING")
            else:  # a private local cluster, reachable on loopback only
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                         logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot start or reach the Ray cluster: {err}") from None
    try:
        gpus = cfg.gpu_fraction if cfg.device == "cuda" else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(_ray_group)
        data_ref = ray.put(load_run_data(cfg))
        cfg_dict = asdict(cfg)
        pending = {task.remote(cfg_dict, g, data_ref): g for g in groups}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(done[0])
            for scores, out in zip(ray.get(done[0]), outs(group), strict=True):
                write_unit(Path(out), scores)
            bar.update(len(group))
    finally:
        if started:
            ray.shutdown()


def resolve_batch_instances(cfg: RunConfig, todo: int) -> int:
    """``batch_instances``, with ``auto`` resolved: the linear model 100 (measured on CPU,
    docs/benchmarks.md), image models :func:`dpcert.stacked.instances_that_fit` on the run's
    device (1 on CPU, where one process per core is faster)."""
    if cfg.batch_instances != "auto":
        return cfg.batch_instances
    if cfg.model == "linear":
        return min(todo, 100)
    if cfg.device != "cuda":
        return 1
    import torch

    from dpcert.models import build_model
    from dpcert.stacked import DpSgd, instances_that_fit

    data = load_run_data(cfg)
    device = torch.device(cfg.device)
    dcfg = DpSgd(cfg.sample_rate, cfg.noise_multiplier, cfg.steps, cfg.clip_norm, cfg.lr,
                 cfg.optimizer, cfg.subset_size)
    fit = instances_that_fit(
        dcfg, lambda: build_model(cfg.model, data.x_train.shape[1], data.num_classes),
        torch.tensor(data.x_train, device=device), torch.tensor(data.y_train, device=device))
    return min(todo, fit)


def train_all(cfg: RunConfig, run_dir: Path, progress: bool = True) -> None:
    """Train every instance whose unit file is missing or damaged; others are kept."""
    units = run_dir / "instances"
    units.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(units)
    todo = []
    for i in range(cfg.instances):
        path = units / f"inst_{i:06d}.npz"
        if read_unit(path) is None:
            path.unlink(missing_ok=True)
            todo.append(i)
    if not todo:
        return
    workers = cfg.workers or max(1, min(os.cpu_count() or 1, len(todo)))
    if cfg.device == "cuda":
        workers = 1  # one process drives the GPU; batch_instances fills it
    k = resolve_batch_instances(cfg, len(todo))
    from tqdm import tqdm

    bar = tqdm(total=cfg.instances, initial=cfg.instances - len(todo), desc="training instances",
               unit="inst", disable=not progress)
    cfg_dict = asdict(cfg)
    groups = [todo[i: i + k] for i in range(0, len(todo), k)]

    def outs(group: list[int]) -> list[str]:
        return [str(units / f"inst_{i:06d}.npz") for i in group]

    if cfg.backend == "ray":
        _train_ray(cfg, groups, outs, bar)
    elif workers == 1:
        for group in groups:
            with tqdm(total=cfg.steps, desc=f"DP-SGD steps of {len(group)} instances",
                      unit="step", leave=False, disable=not progress) as steps:
                _train_units(cfg_dict, group, outs(group), lambda _: steps.update())
            bar.update(len(group))
    else:
        with worker_pool(workers) as pool:
            futures = [pool.submit(_train_units, cfg_dict, g, outs(g)) for g in groups]
            for fut in as_completed(futures):
                bar.update(len(fut.result()))
    bar.close()


def aggregate(cfg: RunConfig, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Assemble scores (P, N, L) and votes (N, L) from the unit files; write both."""
    scores = []
    for i in range(cfg.instances):
        s = read_unit(run_dir / "instances" / f"inst_{i:06d}.npz")
        if s is None:
            raise UserError(f"instance {i} is missing or damaged; rerun to retrain it")
        scores.append(s)
    stacked = np.stack(scores).astype(np.float32)
    votes = tally_votes(stacked)
    atomic_save_npy(run_dir / "scores.npy", stacked)
    atomic_save_npy(run_dir / "votes.npy", votes)
    return votes, stacked


def tally_votes(scores: np.ndarray) -> np.ndarray:
    """Vote counts (N, L) from per-model scores (P, N, L): each model votes for its argmax."""
    p, n, n_labels = scores.shape
    votes = np.zeros((n, n_labels), dtype=np.int64)
    np.add.at(votes, (np.tile(np.arange(n), p), scores.argmax(axis=2).ravel()), 1)
    return votes


# -- the whole job ---------------------------------------------------------------------------


def stored_config(run_dir: Path) -> dict:
    """The run options stored in ``run_dir/config.json`` (RunConfig's fields only)."""
    path = Path(run_dir) / "config.json"
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a dpcert run (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as err:
        raise UserError(f"{path} is damaged ({err}); remove the run directory to start "
                        "over") from None
    if not isinstance(stored, dict):
        raise UserError(f"{path} is not a run configuration")
    return {k: v for k, v in stored.items() if k in RunConfig.__dataclass_fields__}


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> MechanismRecord:
    data = load_run_data(cfg)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = stored_config(run_dir)
        changed = {k: (old.get(k), v) for k, v in cfg.training().items() if old.get(k) != v}
        if changed:
            desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise UserError(f"{run_dir} holds a run with other training settings ({desc}); "
                            "use another --output directory")
    if cfg.subset_size is not None and cfg.subset_size > len(data.y_train):
        raise UserError(f"subset size {cfg.subset_size} exceeds the {len(data.y_train)} "
                        "training examples")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    record = MechanismRecord(sample_rate=cfg.sample_rate, noise_multiplier=cfg.noise_multiplier,
                             steps=cfg.steps, clip_norm=cfg.clip_norm,
                             dataset_size=len(data.y_train), sampling="poisson",
                             subset_size=cfg.subset_size)
    record.save(run_dir / "mechanism.json")
    atomic_save_npy(run_dir / "labels.npy", data.y_test)
    return record


def certify_all(cfg: RunConfig, run_dir: Path, record: MechanismRecord, votes: np.ndarray,
                scores: np.ndarray, labels: np.ndarray, methods=METHODS
                ) -> dict[str, Certificates]:
    from dpcert.certify import certificates_csv

    results = {}
    for name, acc, group, inference, bound in methods:
        if record.uses_subsets and group == "paper" and acc == "rdp":
            continue  # the paper's RDP sub-dataset heuristic is not reproduced
        spec = AccountingSpec(accounting=acc, group=group, max_radius=cfg.max_radius)
        outputs = votes if inference == "multinomial" else scores
        cert = certify(outputs, record, inference=inference, eta=cfg.eta, bound=bound, spec=spec)
        fname = "certificates.csv" if name == methods[0][0] else f"certificates_{name}.csv"
        atomic_write_text(run_dir / fname, certificates_csv(cert, labels))
        results[name] = cert
    return results


def report(results: dict[str, Certificates], labels: np.ndarray, run_dir: Path,
           cfg: RunConfig) -> str:
    """Markdown table of CA_r, median and max radius per method; writes report.md and PNG."""
    from dpcert.report import ca_table, plot_curves

    lines = [f"# dpcert run: {cfg.dataset}, {cfg.instances} instances of {cfg.model}",
             "",
             f"DP-SGD q = {cfg.sample_rate}, sigma = {cfg.noise_multiplier}, T = {cfg.steps}, "
             f"C = {cfg.clip_norm}; eta = {cfg.eta}. Radius = inserted + deleted training "
             "examples (a modification counts 2); median/max over all test points, with -1 for "
             "wrong or abstained ones. Methods marked (paper) reproduce the published, UNSOUND "
             "formulas and are shown for comparison only.",
             "", *ca_table(results, labels)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "report.md", text)
    plot_curves(results, labels, run_dir / "certified_accuracy.png",
                f"{cfg.dataset}: {cfg.instances} x {cfg.model}, q={cfg.sample_rate}, "
                f"sigma={cfg.noise_multiplier}, T={cfg.steps}")
    return text


def run(cfg: RunConfig, run_dir: Path, progress: bool = True) -> str:
    record = prepare_run_dir(cfg, run_dir)
    train_all(cfg, run_dir, progress)
    votes, scores = aggregate(cfg, run_dir)
    labels = np.load(run_dir / "labels.npy")
    results = certify_all(cfg, run_dir, record, votes, scores, labels)
    return report(results, labels, run_dir, cfg)
