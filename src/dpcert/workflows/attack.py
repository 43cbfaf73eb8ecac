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

A partition defence or Bagging (``dpcert run --defence``) is attacked the same way, without
retraining what the poison cannot reach: the parts hash each example's input alone, so an
inserted copy lands in the part of its hash and a flipped label stays in its example's part;
only the models whose examples changed are retrained (with the run's own trainer and seeds),
the others keep their scores, and the defence's own aggregation recounts the vote. Bagging's
bags are positions drawn from the training set's size: a flip reaches the bags that drew it,
an insertion redraws every bag. The partition certificates are deterministic — a certified
prediction that changes is a soundness bug; Bagging's hold with probability >= 1 - eta.

With ``threat="label-flip"`` the budget r counts flipped labels (inputs untouched): the
``flip`` attack relabels the r nearest examples, against ``certificates_label_flip.csv``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from dpcert.certification.aggregation import THREATS, tally_votes
from dpcert.errors import UserError, check_device
from dpcert.learning.data import Dataset
from dpcert.store import atomic_write_text
from dpcert.workflows import rundir
from dpcert.workflows.dispatch import worker_pool
from dpcert.workflows.run import stored_config
from dpcert.workflows.runconfig import RunConfig, load_run_data, read_unit, write_unit

ATTACKS = ("flip", "insert")
#: The attacks each threat allows: a label-flip budget cannot insert.
THREAT_ATTACKS = {"poisoning": ATTACKS, "label-flip": ("flip",)}


@dataclass(frozen=True)
class Outcome:
    index: int  # test point
    group: str  # "certified" (radius >= r) or "control" (radius < r)
    attack: str
    label: int  # the run's (certified) prediction
    target_label: int  # the label the attack pushes
    poisoned_prediction: int
    retrained: int | None = None  # partition defences and Bagging: models retrained

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


def out_dir(run_dir: Path, radius: int, threat: str = "poisoning") -> Path:
    """Where attack-check writes: ``attack_check_r{r}`` (``attack_check_label_flip_r{r}``)."""
    return Path(run_dir) / (f"attack_check_r{radius}" if threat == "poisoning"
                            else f"attack_check_label_flip_r{radius}")


def attack_check(run_dir: Path, radius: int, *, targets: int = 5, controls: int | None = None,
                 attacks: tuple[str, ...] | None = None, seed: int = 0, workers: int = 0,
                 device: str | None = None, progress: bool = True, log=None,
                 threat: str = "poisoning", data_dir: str | None = None
                 ) -> tuple[str, list[Outcome]]:
    """Attack up to ``targets`` certified and ``controls`` (default: ``targets``) control
    points; returns the report (markdown) and every outcome. Writes
    :func:`out_dir`. ``device`` overrides the run's (retraining only).
    ``log(line)`` receives the plan (retrains, instance trainings, an estimate) first.
    ``threat``: poisoning (radius = insertions + deletions) or label-flip (radius = flipped
    labels; the flip attack only). ``data_dir``: a partition or Bagging run's dataset folder
    or file (such a run records its data's fingerprint, not its path)."""
    from tqdm import tqdm

    if not (isinstance(radius, int) and not isinstance(radius, bool) and radius >= 1):
        raise UserError(f"--radius must be a positive integer, got {radius!r}")
    if threat not in THREATS:
        raise UserError(f"--threat must be one of {', '.join(THREATS)}, got {threat!r}")
    allowed = THREAT_ATTACKS[threat]
    attacks = allowed if attacks is None else tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise UserError(f"unknown attacks {unknown} (choose from {', '.join(allowed)})")
    excluded = [a for a in attacks if a not in allowed]
    if excluded:
        raise UserError(f"the label-flip threat changes labels only: --attacks flip, not "
                        f"{', '.join(excluded)}")
    if (Path(run_dir) / rundir.SETTINGS).is_file() and not (Path(run_dir) / rundir.CONFIG
                                                            ).exists():
        return _attack_defence(Path(run_dir), radius, targets=targets, controls=controls,
                               attacks=attacks, seed=seed, workers=workers, device=device,
                               progress=progress, log=log, threat=threat, data_dir=data_dir)
    if data_dir is not None:
        raise UserError("--data-dir is for partition and Bagging runs; a DP run records its "
                        "dataset's path")
    cfg, votes, scores, labels, certs = _load_run(run_dir, threat)
    if device is not None:
        cfg = replace(cfg, device=device)
    check_device(cfg.device, asked=f"{run_dir} was trained on cuda",
                 advice=": pass --device cpu to retrain on the CPU")
    data = load_run_data(cfg)
    if len(data.y_test) != len(labels) or not np.array_equal(data.y_test, labels):
        raise UserError(f"the dataset no longer matches the run in {run_dir}")
    controls = targets if controls is None else controls
    chosen = choose_targets(certs[:, 2], certs[:, 1], labels, radius, targets, controls, seed)
    out = out_dir(run_dir, radius, threat)
    out.mkdir(exist_ok=True)
    budget = _budget(radius, threat)
    workers = workers or max(1, min(os.cpu_count() or 1, cfg.instances))
    if cfg.device == "cuda":
        workers = 1  # one process drives the GPU
    jobs, outcomes = [], []
    for group, idx in chosen.items():
        for index in idx.tolist():
            label = int(certs[index, 1])
            target_label = runner_up(votes, scores, index, label)
            jobs += [Job(group, index, a, label, target_label, budget) for a in attacks]

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
    text = _report(outcomes, radius, cfg, threat)
    _write_results(out, text, outcomes)
    return text, outcomes


def _budget(radius: int, threat: str) -> int:
    """The poisoning budget of a job: r changes, or r flipped labels = 2 r changes (the flip
    attack relabels budget // 2 examples)."""
    return radius if threat == "poisoning" else 2 * radius


def _write_results(out: Path, text: str, outcomes: list[Outcome]) -> None:
    atomic_write_text(out / rundir.REPORT, text)
    atomic_write_text(out / "outcomes.json", json.dumps(
        [{k: v for k, v in asdict(o).items() if not (k == "retrained" and v is None)}
         | {"flipped": o.flipped} for o in outcomes], indent=1) + "\n")


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


def _certificates_file(threat: str) -> str:
    return rundir.certificates_name(threat=threat)


def _read_certificates(run_dir: Path, threat: str) -> np.ndarray:
    path = run_dir / _certificates_file(threat)
    if not path.is_file():
        raise UserError(f"{run_dir} has no {path.name} (a run of an older dpcert certifies no "
                        "label flips: rerun it)" if threat == "label-flip" else
                        f"{run_dir} is not a finished dpcert run ({path.name} expected)")
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise UserError(f"{run_dir}: damaged run files: {err}") from None


def _load_run(run_dir: Path, threat: str = "poisoning"):
    from dpcert.store import load_array

    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).is_file() or not (run_dir / rundir.CERTIFICATES).is_file():
        raise UserError(f"{run_dir} is not a finished dpcert run (config.json and "
                        "certificates.csv expected, or settings.json of a partition or "
                        "Bagging run)")
    cfg = RunConfig.from_mapping(stored_config(run_dir))
    certs = _read_certificates(run_dir, threat)
    votes = load_array(run_dir / rundir.VOTES, "votes")
    scores = load_array(run_dir / rundir.SCORES, "scores", mmap=True)
    labels = load_array(run_dir / rundir.LABELS, "labels")
    if (certs.shape[1] < 3 or len(certs) != len(labels) or len(votes) != len(labels)
            or scores.ndim != 3 or scores.shape[1] != len(labels)):
        raise UserError(f"{run_dir}: certificates, votes, scores and labels disagree in length")
    return cfg, votes, scores, labels, certs


def _attacks_text(radius: int, threat: str) -> str:
    if threat == "label-flip":
        return (f"Threat: label flips (radius = flipped labels, {rundir.LABEL_FLIP}). Attack "
                f"within the radius: flip = relabel the {radius} nearest training examples of "
                "the predicted class as the runner-up label.")
    return (f"Attacks within the radius: flip = relabel the {radius // 2} "
            f"nearest training examples of the predicted class as the runner-up label "
            f"(a modification counts 2); insert = add {radius} copies of the test point "
            "labelled as the runner-up.")


def _outcome_table(outcomes: list[Outcome], radius: int, models: int | None = None
                   ) -> list[str]:
    """Markdown rows: per group and attack, how many points were attacked and how many
    predictions changed; with ``models``, also the mean number of models retrained."""
    retrained = models is not None
    lines = ["| group | attack | attacked | " + ("models retrained (mean) | " if retrained
                                                  else "") + "prediction changed |",
             "|---|---|---|" + ("---|" if retrained else "") + "---|"]
    for group in ("certified", "control"):
        for attack in ATTACKS:
            sel = [o for o in outcomes if o.group == group and o.attack == attack]
            if sel:
                extra = (f"{np.mean([o.retrained for o in sel]):.1f} of {models} | "
                         if retrained else "")
                lines.append(f"| {group} (radius {'>=' if group == 'certified' else '<'} "
                             f"{radius}) | {attack} | {len(sel)} | {extra}"
                             f"{sum(o.flipped for o in sel)} |")
    return lines


def _report(outcomes: list[Outcome], radius: int, cfg: RunConfig,
            threat: str = "poisoning") -> str:
    title = "" if threat == "poisoning" else " (label flips)"
    lines = [f"# dpcert attack-check at radius {radius}{title}", "",
             f"Run: {cfg.dataset}, {cfg.instances} x {cfg.model}, sigma {cfg.noise_multiplier}, "
             f"eta {cfg.eta}. {_attacks_text(radius, threat)} Each attack retrains the whole "
             "ensemble with the run's seeds.", "",
             *_outcome_table(outcomes, radius)]
    broken = [o for o in outcomes if o.group == "certified" and o.flipped]
    lines += ["", "Certified predictions changed: "
              + (", ".join(f"point {o.index} ({o.attack})" for o in broken) if broken
                 else "none") + ". (A valid certificate may still see a flip with probability "
              "about eta, or through the finite vote of the retrained ensemble; two attacks "
              "are evidence, not proof.)"]
    return "\n".join(lines) + "\n"


# -- partition defences and Bagging ----------------------------------------------------------


@dataclass(frozen=True)
class DefenceRun:
    """A finished ``dpcert run --defence`` directory, as attack-check reads it."""

    kind: str  # the certificate it takes: dpa, fa, roe, fa-roe, bagging
    setting: object  # BaselineConfig
    cfg: RunConfig  # the run options its models were trained with
    scores: np.ndarray  # (M, N, L) every kept model's test scores
    labels: np.ndarray
    certs: np.ndarray  # index, prediction, radius, label
    train_size: int  # the clean training set's


def load_defence_run(run_dir: Path, threat: str = "poisoning",
                     data_dir: str | None = None) -> DefenceRun:
    """The setting, run options, models' scores and certificates of a partition or Bagging
    run directory; refuses one whose dataset (``data_dir`` for the datasets read from disk)
    is not the one its models were trained on."""
    from dpcert.workflows.ensemble import read_info
    from dpcert.workflows.setting import BaselineConfig

    info = read_info(run_dir)
    settings = json.loads((run_dir / rundir.SETTINGS).read_text())
    if info.dataset != "digits" and data_dir is None:
        raise UserError(f"{run_dir} was trained on {info.dataset}: pass --data-dir (the "
                        "run records its data's fingerprint, not its path)")
    try:
        setting = BaselineConfig(**info.training)
        values = {"dataset": info.dataset, "data_dir": data_dir,
                  "features": info.input.features, "model": settings.get("model", "digits_cnn"),
                  "seed": settings.get("seed", 0), "validation": settings.get("validation", 0),
                  "eta": info.eta, "max_radius": info.max_radius}
    except TypeError as err:
        raise UserError(f"{run_dir}: damaged run files: {err}") from None
    if values["model"] == "linear":
        values["optimizer"] = "sgd"  # as dpcert run --defence sets it
    cfg = RunConfig.from_mapping(values)
    certs = _read_certificates(run_dir, threat)
    found = [read_unit(run_dir / f"model_{i:06d}.npz") for i in range(info.instances)]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        raise UserError(f"{run_dir}: model {missing[0]} is missing or damaged (and "
                        f"{len(missing) - 1} more); rerun dpcert run to finish it")
    labels = np.load(run_dir / rundir.LABELS, allow_pickle=False)
    scores = np.stack(found)
    if certs.shape[1] < 3 or len(certs) != len(labels) or scores.shape[1] != len(labels):
        raise UserError(f"{run_dir}: certificates, models' scores and labels disagree in "
                        "length")
    data = load_run_data(cfg)
    if info.data_sha256 is not None and data.fingerprint() != info.data_sha256:
        raise UserError(f"the dataset{' in ' + str(data_dir) if data_dir else ''} is not the "
                        f"one the models in {run_dir} were trained on")
    if not np.array_equal(data.y_test, labels):
        raise UserError(f"the dataset no longer matches the run in {run_dir}")
    return DefenceRun(info.defence, setting, cfg, scores, labels, certs, len(data.y_train))


def defence_prediction(run: DefenceRun, scores: np.ndarray) -> np.ndarray:
    """The defence's own aggregate prediction from models' scores (M, n, L)."""
    from dpcert.workflows.partition import certify_baseline

    return certify_baseline(run.kind, run.setting, scores, run.train_size, run.cfg).prediction


def touched_models(kind: str, setting, cfg: RunConfig, clean: Dataset,
                   poisoned: Dataset) -> np.ndarray:
    """Indices of the models whose training examples differ between ``clean`` and
    ``poisoned`` (the latter: the former relabelled, or with examples appended): those of
    the parts whose members or labels changed, computed by the run's own partition; every
    Bagging model when the training set's size changed (its bags are redrawn)."""
    from dpcert.workflows.partition import model_examples, training_indices
    from dpcert.workflows.setting import trained_as

    n = len(clean.y_train)
    relabelled = np.zeros(len(poisoned.y_train), bool)
    relabelled[:n] = poisoned.y_train[:n] != clean.y_train
    relabelled[n:] = True  # inserted
    m = setting.trained_models(kind)
    if trained_as(kind) == "bagging":
        if len(poisoned.y_train) != n:
            return np.arange(m)
        return np.array([i for i in range(m)
                         if relabelled[model_examples(cfg, setting, i, None, n)[0]].any()],
                        np.int64)
    before = training_indices(kind, setting, clean.x_train, clean.y_train)
    after = training_indices(kind, setting, poisoned.x_train, poisoned.y_train)
    return np.array([j for j in range(m)
                     if not np.array_equal(before[j], after[j]) or relabelled[after[j]].any()],
                    np.int64)


def _retrain_on_target(cfg_dict: dict, setting_dict: dict, kind: str, job: Job,
                       models: list[int]) -> np.ndarray:
    """Scores (len(models), L) at the target of baseline models ``models`` trained on the
    job's poisoned data by the run's own trainer (:func:`dpcert.workflows.partition._fit_units`);
    runs in a worker that holds the clean dataset."""
    from dpcert.workflows.partition import _fit_units, training_indices
    from dpcert.workflows.setting import BaselineConfig

    cfg = RunConfig(**cfg_dict)
    data = poison(load_run_data(cfg), job.attack, job.index, job.label, job.target_label,
                  job.radius)
    indices = training_indices(kind, BaselineConfig(**setting_dict), data.x_train,
                               data.y_train)
    one = replace(data, x_test=data.x_test[job.index: job.index + 1],
                  y_test=data.y_test[job.index: job.index + 1])
    units = [(i, None if indices is None else indices[i], "") for i in models]
    return np.stack([scores[0] for scores, _ in _fit_units(cfg_dict, setting_dict, kind, units,
                                                           data=one)])


def _attack_defence(run_dir: Path, radius: int, *, targets: int, controls: int | None,
                    attacks: tuple[str, ...], seed: int, workers: int, device: str | None,
                    progress: bool, log, threat: str, data_dir: str | None
                    ) -> tuple[str, list[Outcome]]:
    """attack_check of a partition defence or Bagging run: only the models the poison
    reaches are retrained."""
    from tqdm import tqdm

    from dpcert.workflows.setting import FREE_LEARNERS

    run = load_defence_run(run_dir, threat, data_dir)
    if run.setting.augment_shift and "insert" in attacks:
        # its models translate the run's own images, which an inserted copy is not among
        raise UserError(f"{run_dir} trains on translated images (augment_shift): attack it "
                        "with --attacks flip")
    cfg = run.cfg if device is None else replace(run.cfg, device=device)
    check_device(cfg.device, asked=f"{run_dir} was trained on cuda",
                 advice=": pass --device cpu to retrain on the CPU")
    clean = load_run_data(cfg)
    controls = targets if controls is None else controls
    certs = run.certs
    chosen = choose_targets(certs[:, 2], certs[:, 1], run.labels, radius, targets, controls,
                            seed)
    every = np.concatenate(list(chosen.values()))
    if len(every):
        kept = defence_prediction(run, run.scores[:, every])
        if not np.array_equal(kept, certs[every, 1]):
            raise UserError(f"{run_dir}: the models' scores do not give the certified "
                            "predictions; the run directory is damaged")
    votes = tally_votes(run.scores)
    out = out_dir(run_dir, radius, threat)
    out.mkdir(exist_ok=True)
    budget = _budget(radius, threat)
    jobs, touched = [], {}
    for group, idx in chosen.items():
        for index in idx.tolist():
            label = int(certs[index, 1])
            target_label = runner_up(votes, run.scores, index, label)
            for a in attacks:
                job = Job(group, index, a, label, target_label, budget)
                jobs.append(job)
                touched[job] = touched_models(run.kind, run.setting, cfg, clean, poison(
                    clean, a, index, label, target_label, budget))

    def unit(job: Job) -> Path:
        return out / f"{job.attack}_{job.index:06d}.npz"

    def model_file(job: Job, i: int) -> Path:
        return out / f"{job.attack}_{job.index:06d}" / f"model_{i:06d}.npz"

    todo = [job for job in jobs if read_unit(unit(job)) is None]
    workers = workers or max(1, min(os.cpu_count() or 1, len(todo) or 1))
    if cfg.device == "cuda":
        workers = 1  # one process drives the GPU
    m = run.scores.shape[0]
    retrain = sum(len(touched[j]) for j in todo)
    if log is not None:
        log(f"attack-check plan: {len(jobs)} attacks ({len(todo)} to do) on "
            f"{run.setting.name(run.kind)}: {retrain} model trainings of the {m} models' "
            f"{len(todo) * m} (only the models each poison reaches) on {workers} worker(s). "
            "Interrupted? Rerun the same command: finished models are kept.")
    bar = tqdm(total=retrain, desc=f"attacks at r={radius} (models retrained)", unit="model",
               disable=not progress)
    # the closed-form learners fit a job's models in one stacked call; the others one each
    per = None if run.setting.learner in FREE_LEARNERS else 1
    cfg_dict, setting_dict = asdict(cfg), asdict(run.setting)

    def chunks(job: Job) -> list[list[int]]:
        left = [int(i) for i in touched[job] if read_unit(model_file(job, int(i))) is None]
        size = per or max(1, len(left))
        bar.update(len(touched[job]) - len(left))
        return [left[k:k + size] for k in range(0, len(left), size)]

    def keep(job: Job, models: list[int], scores: np.ndarray) -> None:
        for i, s in zip(models, scores, strict=True):
            write_unit(model_file(job, i), s)
        bar.update(len(models))

    def finish(job: Job) -> None:
        poisoned = np.array(run.scores[:, job.index], copy=True)
        for i in touched[job].tolist():
            got = read_unit(model_file(job, i))
            if got is None:
                raise UserError(f"a retrained model's file in {out} is damaged; rerun")
            poisoned[i] = got
        write_unit(unit(job), poisoned)

    if workers == 1:
        for job in todo:
            for models in chunks(job):
                keep(job, models, _retrain_on_target(cfg_dict, setting_dict, run.kind, job,
                                                     models))
            finish(job)
    else:
        with worker_pool(workers) as pool:
            pending = [(job, [(models, pool.submit(_retrain_on_target, cfg_dict, setting_dict,
                                                   run.kind, job, models))
                              for models in chunks(job)]) for job in todo]
            for job, futures in pending:
                for models, fut in futures:
                    keep(job, models, fut.result())
                finish(job)
    bar.close()
    outcomes = []
    for job in jobs:
        poisoned = read_unit(unit(job))
        if poisoned is None or poisoned.shape != run.scores[:, job.index].shape:
            raise UserError(f"{unit(job)} is damaged; remove it and rerun")
        outcomes.append(Outcome(job.index, job.group, job.attack, job.label, job.target_label,
                                int(defence_prediction(run, poisoned[:, None])[0]),
                                len(touched[job])))
    text = _defence_report(outcomes, radius, run, threat)
    _write_results(out, text, outcomes)
    return text, outcomes


def broken_certificates(outcomes: list[Outcome]) -> list[Outcome]:
    """The certified targets whose prediction an attack within the radius changed."""
    return [o for o in outcomes if o.group == "certified" and o.flipped]


def _defence_report(outcomes: list[Outcome], radius: int, run: DefenceRun, threat: str) -> str:
    from dpcert.workflows.setting import trained_as

    bagging = trained_as(run.kind) == "bagging"
    title = "" if threat == "poisoning" else " (label flips)"
    m = run.scores.shape[0]
    lines = [f"# dpcert attack-check at radius {radius}{title}", "",
             f"Run: {run.cfg.dataset}, {run.setting.name(run.kind)}, {m} models. "
             f"{_attacks_text(radius, threat)} Each attack retrains, with the run's own "
             "trainer and seeds, the models whose training examples it changes "
             + ("(a flip: the bags that drew the example; an insertion: every bag, redrawn "
                "from the larger training set)" if bagging else
                "(the parts hash each example's input alone: a flipped label stays in its "
                "example's part, an inserted copy lands in the part of its hash)")
             + "; the others keep their scores, and the defence's own aggregation recounts "
             "the vote.", "",
             *_outcome_table(outcomes, radius, models=m)]
    broken = broken_certificates(outcomes)
    changed = ", ".join(f"point {o.index} ({o.attack})" for o in broken) or "none"
    if bagging:
        lines += ["", f"Certified predictions changed: {changed}. (Bagging's certificate holds "
                  f"with probability >= 1 - eta = {1 - run.cfg.eta:g} over the bags drawn; "
                  "two attacks are evidence, not proof.)"]
    elif broken:
        lines += ["", f"**SOUNDNESS BUG: certified predictions changed: {changed}.** The "
                  f"certificates of {run.kind} are deterministic: an attack within the "
                  "radius must never change a certified prediction."]
    else:
        lines += ["", "Certified predictions changed: none. (The certificates of "
                  f"{run.kind} are deterministic: any change would be a soundness bug; two "
                  "attacks are evidence, not proof.)"]
    return "\n".join(lines) + "\n"
