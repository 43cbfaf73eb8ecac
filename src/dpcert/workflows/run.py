"""The main job: train P DP-SGD instances -> predict -> certify -> report, in a resumable run store.

Run directory layout (a public contract other tools read):

    config.json          the training configuration (a rerun with other values is refused)
    mechanism.json       the mechanism record (sample_rate, noise_multiplier, steps, ...)
    ensemble.json        what the instances are: model, labels, input specification
    instances/inst_NNNNNN.npz   softmax scores (N, L) of one instance + checksum, atomic
    instances/inst_NNNNNN.safetensors   that instance's parameters + checksum, atomic
    votes.npy            int64 (N, L) vote counts       scores.npy  float32 (P, N, L)
    labels.npy           int64 (N,) test labels
    certificates.csv     index,prediction,radius,label for the default method (pld, sound, votes)
    certificates_<method>.csv   the same for every other method
    certificates_label_flip.csv the default certificate counted in flipped labels
    report.md            certified-accuracy table        certified_accuracy.png  CA_r curves

Each instance is written atomically as soon as it finishes; a rerun skips the finished ones
(after verifying their checksums), so a crash loses at most the instances in flight, and the
final result equals an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dpcert.certification.accounting import AccountingSpec
from dpcert.certification.aggregation import dp_label_flips, tally_votes
from dpcert.certification.certify import Certificates, certify
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError
from dpcert.learning.inputs import InputSpec
from dpcert.store import atomic_path, atomic_save_npy, atomic_write_text
from dpcert.workflows import rundir
from dpcert.workflows.dispatch import run_record, train_all, train_group, worker_pool
from dpcert.workflows.ensemble import (
    EnsembleInfo,
    check_declared_inputs,
    check_same_data,
    keeps_models,
    read_info,
    write_info,
)
from dpcert.workflows.runconfig import (
    AVERAGING_NAMES,
    DATASETS,
    FEATURE_NAMES,
    MODEL_NAMES,
    RunConfig,
    load_config_file,
    load_run_data,
    read_unit,
    write_unit,
)

#: Names other modules and users import from here (defined in runconfig and training).
__all__ = ["AVERAGING_NAMES", "DATASETS", "FEATURE_NAMES", "METHODS", "MODEL_NAMES",
           "RunConfig", "aggregate", "certify_all", "load_config_file", "load_run_data",
           "prepare_run_dir", "read_unit", "report", "run", "stored_config", "tally_votes",
           "train_all", "train_group", "worker_pool", "write_unit"]

#: The default certificate counted in flipped labels instead of inserted + deleted examples.
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


def aggregate(cfg: RunConfig, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Assemble scores (P, N, L) and votes (N, L) from the unit files; write both.

    Streams the units: each is rounded to float32, written into ``scores.npy`` through a
    memory map (a temporary file renamed into place) and its votes counted, so memory stays
    O(N L) whatever P (P = 10,000 Fashion-MNIST units are 4 GB of float32 scores; holding them
    all at once was killed for memory on a 24 GB machine). Returns the votes and the scores,
    memory-mapped read-only."""
    path = run_dir / rundir.SCORES
    with atomic_path(path) as tmp:
        out, votes = None, None
        for i in range(cfg.instances):
            s = read_unit(run_dir / "instances" / f"inst_{i:06d}.npz")
            if s is None:
                raise UserError(f"instance {i} is missing or damaged; rerun to retrain it")
            s = s.astype(np.float32)  # votes from the stored float32 scores, as always
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                shape=(cfg.instances, *s.shape))
                votes = np.zeros(s.shape, dtype=np.int64)
            elif s.shape != out.shape[1:]:
                raise UserError(f"instance {i} has scores of shape {s.shape}, the others "
                                f"{out.shape[1:]}; remove it and rerun")
            out[i] = s
            votes += tally_votes(s[None])
        out.flush()
        del out
    atomic_save_npy(run_dir / rundir.VOTES, votes)
    return votes, np.load(path, mmap_mode="r")


# -- the whole job ---------------------------------------------------------------------------


def stored_config(run_dir: Path) -> dict:
    """The run options stored in ``run_dir/config.json`` (RunConfig's fields only)."""
    path = Path(run_dir) / rundir.CONFIG
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
    from dpcert.learning.philox import expected_batch

    data = load_run_data(cfg)
    # the step size's divisor is declared: refused here, before anything is written
    expected_batch(cfg.sample_rate, subset_size=cfg.subset_size,
                   declared_size=data.declared_size)
    cfg_path = run_dir / rundir.CONFIG
    if (run_dir / rundir.SETTINGS).exists():
        raise UserError(f"{run_dir} holds the models of a partition defence or Bagging; use "
                        "another --output directory")
    if cfg_path.exists():
        if keeps_models(run_dir):
            # refuses a run trained before the inputs were declared
            read_info(run_dir, check_settings=False)
        else:
            check_declared_inputs(cfg.dataset, data.num_classes, False,
                                  MechanismRecord.load(run_dir / rundir.MECHANISM),
                                  cfg.validation)
        old = stored_config(run_dir)
        # a key an older run did not store had its default then (fields are only ever added)
        default = RunConfig()
        changed = {k: (old.get(k, getattr(default, k)), v) for k, v in cfg.training().items()
                   if old.get(k, getattr(default, k)) != v}
        if changed:
            desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise UserError(f"{run_dir} holds a run with other training settings ({desc}); "
                            "use another --output directory")
    if data.x_train.ndim == 2 and cfg.model != "linear":
        raise UserError(f"{cfg.data_dir} holds feature vectors {data.x_train.shape}: train "
                        "them with model: linear")
    if data.x_train.ndim != 2 and cfg.model == "linear":
        raise UserError(f"{cfg.data_dir} holds images {data.x_train.shape}: the linear model "
                        "needs feature vectors (features: scatter, or an npz of (n, D))")
    if cfg.subset_size is not None and cfg.subset_size > len(data.y_train):
        raise UserError(f"subset size {cfg.subset_size} exceeds the {len(data.y_train)} "
                        "training examples")
    # A new run keeps its models; a run begun before models were kept resumes as it was.
    keep_models = not cfg_path.exists() or keeps_models(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    # the record the engine reads (dispatch.trainer_config): certified = trained
    record = run_record(cfg, data)
    record.save(run_dir / rundir.MECHANISM)
    atomic_save_npy(run_dir / rundir.LABELS, data.y_test)
    if keep_models:
        info = ensemble_info(cfg, data, record)
        check_same_data(run_dir, info)
        write_info(run_dir, info)
    return record


def input_spec(cfg: RunConfig, data) -> InputSpec:
    """What the models of a run take as input. ``data`` is the run's dataset as trained on
    (features if the run has a feature map)."""
    if data.x_test.ndim == 2 and cfg.features is None:  # the user's own feature vectors
        return InputSpec(None, feature_dim=int(data.x_test.shape[1]))
    if cfg.features is None:
        return InputSpec.for_dataset(data.raw_max, data.x_test.shape[1:], None, None)
    from dpcert.learning.data import load_dataset

    raw = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None)
    return InputSpec.for_dataset(raw.raw_max, raw.x_test.shape[1:], cfg.features,
                                 int(data.x_train.shape[1]))


def ensemble_info(cfg: RunConfig, data, record: MechanismRecord) -> EnsembleInfo:
    """The description of a run's ensemble (``ensemble.json``): what its instances are and
    what input they take."""
    import dpcert

    return EnsembleInfo(dataset=cfg.dataset, model=cfg.model, num_classes=data.num_classes,
                        instances=cfg.instances, input=input_spec(cfg, data),
                        mechanism=record, eta=cfg.eta, max_radius=cfg.max_radius,
                        training=cfg.training(), data_sha256=data.fingerprint(),
                        dpcert_version=dpcert.__version__)


def certify_all(cfg: RunConfig, run_dir: Path, record: MechanismRecord, votes: np.ndarray,
                scores: np.ndarray, labels: np.ndarray, methods=METHODS
                ) -> dict[str, Certificates]:
    results = {}
    for name, acc, group, inference, bound in methods:
        if record.uses_subsets and group == "paper" and acc == "rdp":
            continue  # the paper's RDP sub-dataset heuristic is not reproduced
        spec = AccountingSpec(accounting=acc, group=group, max_radius=cfg.max_radius)
        outputs = votes if inference == "multinomial" else scores
        cert = certify(outputs, record, inference=inference, eta=cfg.eta, bound=bound, spec=spec)
        default = name == methods[0][0]
        rundir.write_certificates(run_dir, cert, labels, method=None if default else name)
        if default:  # the default certificate, counted in flipped labels
            rundir.write_certificates(run_dir, dp_label_flips(cert), labels,
                                      threat="label-flip")
        results[name] = cert
    return results


def report(results: dict[str, Certificates], labels: np.ndarray, run_dir: Path,
           cfg: RunConfig) -> str:
    """Markdown table of CA_r, median and max radius per method; writes report.md and PNG."""
    from dpcert.workflows.report import ca_table, plot_curves

    learner = f"{cfg.instances} instances of {cfg.model}"
    if cfg.augment_shift:
        learner += (f", trained on random translations by up to {cfg.augment_shift} px "
                    f"({cfg.augment_copies} per example, gradients averaged before clipping)")
    lines = [f"# dpcert run: {cfg.dataset}, {learner}",
             "",
             f"DP-SGD q = {cfg.sample_rate}, sigma = {cfg.noise_multiplier}, T = {cfg.steps}, "
             f"C = {cfg.clip_norm}; eta = {cfg.eta}. Radius = inserted + deleted training "
             "examples (a modification counts 2); median/max over all test points, with -1 for "
             "wrong or abstained ones. Methods marked (paper) reproduce the published, UNSOUND "
             "formulas and are shown for comparison only.",
             "", *ca_table(results, labels), "",
             f"Against label flips (inputs untouched): {rundir.LABEL_FLIP}, the default "
             "certificate counted in flipped labels — one flip replaces an example, one "
             "deletion and one insertion, so r flips are certified where 2r changes are."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / rundir.REPORT, text)
    plot_curves(results, labels, run_dir / rundir.PLOT,
                f"{cfg.dataset}: {cfg.instances} x {cfg.model}, q={cfg.sample_rate}, "
                f"sigma={cfg.noise_multiplier}, T={cfg.steps}")
    return text


def run(cfg: RunConfig, run_dir: Path, progress: bool = True, methods=METHODS) -> str:
    """Train (resuming), aggregate and certify a run; ``methods``: which certificates (the
    first one is written as certificates.csv). Returns the report's markdown."""
    record = prepare_run_dir(cfg, run_dir)
    train_all(cfg, run_dir, progress)
    votes, scores = aggregate(cfg, run_dir)
    labels = np.load(run_dir / rundir.LABELS)
    results = certify_all(cfg, run_dir, record, votes, scores, labels, methods)
    return report(results, labels, run_dir, cfg)
