"""`dpcert attack-check`: mount real poisoning attacks on a finished run and count flips.

A certificate at radius r promises that no training set within r insertions + deletions of
the clean one moves the certified label off the top (with probability >= 1 - eta over the
training randomness). This module tries to break that promise on chosen test points:

* ``flip``: relabel the floor(r / 2) training examples of the predicted class nearest to the
  target (Euclidean, in input space) as the runner-up label — a modification counts as one
  deletion plus one insertion, so floor(r / 2) flips are r changes;
* ``insert``: add r copies of the target input labelled with the runner-up label.

For each (target, attack) the whole ensemble (P instances, the run's configuration and seeds)
is retrained on the poisoned data and the target re-predicted. Targets come in two groups:
points certified at radius >= r (expected flips: 0, up to the 1 - eta confidence of the
certificates and the finite-P vote of the retrained ensemble) and correctly predicted points
certified below r (the control group: they may flip, and some do when the attack is real).
Every (target, attack) result is a checksummed unit file written atomically and reused on
rerun.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from dpcert.errors import UserError, check_device
from dpcert.learning.data import Dataset
from dpcert.store import atomic_write_text
from dpcert.workflows.dispatch import worker_pool
from dpcert.workflows.run import stored_config
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit, write_unit

ATTACKS = ("flip", "insert")


@dataclass(frozen=True)
class Outcome:
    index: int  # test point
    group: str  # "certified" (radius >= r) or "control" (radius < r)
    attack: str
    label: int  # the run's (certified) prediction
    target_label: int  # the label the attack pushes
    poisoned_prediction: int

    @property
    def flipped(self) -> bool:
        return self.poisoned_prediction != self.label


def runner_up(votes: np.ndarray, scores: np.ndarray, index: int, label: int) -> int:
    """The attack's label: most voted other label, ties broken by the mean softmax score."""
    key = votes[index].astype(float) + 1e-3 * scores[:, index].mean(axis=0)
    key[label] = -np.inf
    return int(np.argmax(key))


def poison(data: Dataset, attack: str, index: int, label: int, target_label: int,
           radius: int) -> Dataset:
    """The training set after ``attack`` on test point ``index`` with budget ``radius``."""
    x_target = data.x_test[index]
    if attack == "flip":
        same = np.flatnonzero(data.y_train == label)
        dist = ((data.x_train[same] - x_target) ** 2).reshape(len(same), -1).sum(axis=1)
        chosen = same[np.argsort(dist, kind="stable")[: radius // 2]]
        y = data.y_train.copy()
        y[chosen] = target_label
        return replace(data, y_train=y)
    if attack == "insert":
        copies = np.repeat(x_target[None], radius, axis=0)
        return replace(data, x_train=np.concatenate([data.x_train, copies]),
                       y_train=np.concatenate([data.y_train,
                                               np.full(radius, target_label, np.int64)]))
    raise UserError(f"unknown attack {attack!r} ({', '.join(ATTACKS)})")


@dataclass(frozen=True)
class Job:
    """One attack on one test point."""

    group: str
    index: int
    attack: str
    label: int
    target_label: int
    radius: int


_POISONED: dict = {}


def _instance_on_target(cfg_dict: dict, job: Job, instance: int) -> np.ndarray:
    """Scores (L,) at the target of one instance trained on the job's poisoned data.

    Runs in a worker that holds the clean dataset; the poisoned copy of the last job is kept,
    since a worker trains several instances of the same job in a row."""
    from dpcert.workflows.dispatch import train_group

    cfg = RunConfig(**cfg_dict)
    if _POISONED.get("job") != job:
        clean = load_run_data(cfg)
        _POISONED.update(job=job, data=poison(clean, job.attack, job.index, job.label,
                                              job.target_label, job.radius))
    data = _POISONED["data"]
    one = replace(data, x_test=data.x_test[job.index: job.index + 1],
                  y_test=data.y_test[job.index: job.index + 1])
    return train_group(cfg, [instance], one)[0][0]


def retrain_jobs(cfg: RunConfig, jobs: list[Job], workers: int, done,
                 instance_file=None, on_instance=None) -> None:
    """Retrain the ensemble for every job; ``done(job, scores (P, L))`` as each completes.

    With ``instance_file(job, i) -> Path``, each retrained instance's scores are written
    there atomically as soon as it finishes, and instances whose file is already there are
    not retrained: an interrupted retrain resumes from its finished instances.
    ``on_instance()`` is called for each instance trained or found."""
    cfg_dict = asdict(cfg)

    def cached(job: Job, i: int) -> np.ndarray | None:
        return None if instance_file is None else read_unit(instance_file(job, i))

    def keep(job: Job, i: int, scores: np.ndarray, fresh: bool = True) -> np.ndarray:
        if instance_file is not None and fresh:
            write_unit(instance_file(job, i), scores)
        if on_instance is not None:
            on_instance()
        return scores

    if workers == 1:
        for job in jobs:
            out = []
            for i in range(cfg.instances):
                got = cached(job, i)
                out.append(keep(job, i, _instance_on_target(cfg_dict, job, i))
                           if got is None else keep(job, i, got, fresh=False))
            done(job, np.stack(out))
        return
    with worker_pool(workers) as pool:
        pending = []
        for job in jobs:
            slots = []
            for i in range(cfg.instances):
                got = cached(job, i)
                slots.append(got if got is not None
                             else pool.submit(_instance_on_target, cfg_dict, job, i))
            pending.append((job, slots))
        for job, slots in pending:
            out = []
            for i, slot in enumerate(slots):
                out.append(keep(job, i, slot, fresh=False) if isinstance(slot, np.ndarray)
                           else keep(job, i, slot.result()))
            done(job, np.stack(out))


def choose_targets(radius_of: np.ndarray, prediction: np.ndarray, labels: np.ndarray, r: int,
                   count: int, controls: int, seed: int) -> dict[str, np.ndarray]:
    """Up to ``count`` correct points certified at >= r and ``controls`` correct ones below r,
    chosen at random."""
    rng = np.random.default_rng(seed)
    correct = prediction == labels
    groups = {"certified": (np.flatnonzero(correct & (radius_of >= r)), count),
              "control": (np.flatnonzero(correct & (radius_of < r)), controls)}
    return {g: np.sort(rng.permutation(idx)[:k]) for g, (idx, k) in groups.items()}


def attack_check(run_dir: Path, radius: int, *, targets: int = 5, controls: int | None = None,
                 attacks: tuple[str, ...] = ATTACKS, seed: int = 0, workers: int = 0,
                 device: str | None = None, progress: bool = True, log=None
                 ) -> tuple[str, list[Outcome]]:
    """Attack up to ``targets`` certified and ``controls`` (default: ``targets``) control
    points; returns the report (markdown) and every outcome. Writes
    ``RUN_DIR/attack_check_r{radius}/``. ``device`` overrides the run's (retraining only).
    ``log(line)`` receives the plan (retrains, instance trainings, an estimate) first."""
    from tqdm import tqdm

    if not (isinstance(radius, int) and radius >= 1):
        raise UserError(f"--radius must be a positive integer, got {radius!r}")
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise UserError(f"unknown attacks {bad} (choose from {', '.join(ATTACKS)})")
    cfg, votes, scores, labels, certs = _load_run(run_dir)
    if device is not None:
        cfg = replace(cfg, device=device)
    check_device(cfg.device, asked=f"{run_dir} was trained on cuda",
                 advice=": pass --device cpu to retrain on the CPU")
    data = load_run_data(cfg)
    if len(data.y_test) != len(labels) or not np.array_equal(data.y_test, labels):
        raise UserError(f"the dataset no longer matches the run in {run_dir}")
    controls = targets if controls is None else controls
    chosen = choose_targets(certs[:, 2], certs[:, 1], labels, radius, targets, controls, seed)
    out = run_dir / f"attack_check_r{radius}"
    out.mkdir(exist_ok=True)
    workers = workers or max(1, min(os.cpu_count() or 1, cfg.instances))
    if cfg.device == "cuda":
        workers = 1  # one process drives the GPU
    jobs, outcomes = [], []
    for group, idx in chosen.items():
        for index in idx.tolist():
            label = int(certs[index, 1])
            target_label = runner_up(votes, scores, index, label)
            jobs += [Job(group, index, a, label, target_label, radius) for a in attacks]

    def unit(job: Job) -> Path:
        return out / f"{job.attack}_{job.index:06d}.npz"

    def instance_file(job: Job, i: int) -> Path:
        return out / f"{job.attack}_{job.index:06d}" / f"inst_{i:06d}.npz"

    todo = [job for job in jobs if read_unit(unit(job)) is None]
    if log is not None:
        log(_plan(jobs, todo, cfg, run_dir, workers))
    bar = tqdm(total=len(jobs) * cfg.instances, initial=(len(jobs) - len(todo)) * cfg.instances,
               desc=f"attacks at r={radius} (instances retrained)", unit="inst",
               disable=not progress)

    def finish(job: Job, poisoned: np.ndarray) -> None:
        write_unit(unit(job), poisoned)

    retrain_jobs(cfg, todo, workers, finish, instance_file, bar.update)
    bar.close()
    for job in jobs:
        poisoned = read_unit(unit(job))
        counts = np.bincount(poisoned.argmax(axis=1), minlength=poisoned.shape[1])
        outcomes.append(Outcome(job.index, job.group, job.attack, job.label, job.target_label,
                                int(np.argmax(counts))))
    text = _report(outcomes, radius, cfg)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "outcomes.json", json.dumps(
        [asdict(o) | {"flipped": o.flipped} for o in outcomes], indent=1) + "\n")
    return text, outcomes


def _plan(jobs: list[Job], todo: list[Job], cfg: RunConfig, run_dir: Path,
          workers: int) -> str:
    """What attack-check is about to do, and roughly how long it takes: the run's own
    training time per instance (from its unit files' times) times the instances to train."""
    units = sorted((Path(run_dir) / "instances").glob("inst_*.npz"),
                   key=lambda f: f.stat().st_mtime)
    per = None
    if len(units) >= 4:
        span = units[-1].stat().st_mtime - units[0].stat().st_mtime
        per = span / (len(units) - 1)  # wall seconds per instance, at the run's parallelism
    total = len(todo) * cfg.instances
    line = (f"attack-check plan: {len(jobs)} attacks ({len(todo)} to do) x {cfg.instances} "
            f"instances = {total} instance trainings on {workers} worker(s)")
    if per is not None and total:
        line += f"; about {total * per / 60:.0f} min, judging by the run's own training"
    return line + ". Interrupted? Rerun the same command: finished instances are kept."


def _load_run(run_dir: Path):
    from dpcert.store import load_array

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "certificates.csv").is_file():
        raise UserError(f"{run_dir} is not a finished dpcert run (config.json and "
                        "certificates.csv expected)")
    cfg = RunConfig.from_mapping(stored_config(run_dir))
    try:
        certs = np.loadtxt(run_dir / "certificates.csv", delimiter=",", skiprows=1,
                           dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise UserError(f"{run_dir}: damaged run files: {err}") from None
    votes = load_array(run_dir / "votes.npy", "votes")
    scores = load_array(run_dir / "scores.npy", "scores", mmap=True)
    labels = load_array(run_dir / "labels.npy", "labels")
    if (certs.shape[1] < 3 or len(certs) != len(labels) or len(votes) != len(labels)
            or scores.ndim != 3 or scores.shape[1] != len(labels)):
        raise UserError(f"{run_dir}: certificates, votes, scores and labels disagree in length")
    return cfg, votes, scores, labels, certs


def _report(outcomes: list[Outcome], radius: int, cfg: RunConfig) -> str:
    lines = [f"# dpcert attack-check at radius {radius}", "",
             f"Run: {cfg.dataset}, {cfg.instances} x {cfg.model}, sigma {cfg.noise_multiplier}, "
             f"eta {cfg.eta}. Attacks within the radius: flip = relabel the {radius // 2} "
             f"nearest training examples of the predicted class as the runner-up label "
             f"(a modification counts 2); insert = add {radius} copies of the test point "
             "labelled as the runner-up. Each attack retrains the whole ensemble with the run's "
             "seeds.", "",
             "| group | attack | attacked | prediction changed |", "|---|---|---|---|"]
    for group in ("certified", "control"):
        for attack in ATTACKS:
            sel = [o for o in outcomes if o.group == group and o.attack == attack]
            if sel:
                lines.append(f"| {group} (radius {'>=' if group == 'certified' else '<'} "
                             f"{radius}) | {attack} | {len(sel)} | "
                             f"{sum(o.flipped for o in sel)} |")
    broken = [o for o in outcomes if o.group == "certified" and o.flipped]
    lines += ["", "Certified predictions changed: "
              + (", ".join(f"point {o.index} ({o.attack})" for o in broken) if broken
                 else "none") + ". (A valid certificate may still see a flip with probability "
              "about eta, or through the finite vote of the retrained ensemble; two attacks "
              "are evidence, not proof.)"]
    return "\n".join(lines) + "\n"
