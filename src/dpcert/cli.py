"""The ``dpcert`` command line.

User mistakes (bad shapes, out-of-range parameters, missing files) end in one line on stderr
and exit status 2, with no traceback and no partial output file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from dpcert.certification.accounting import ACCOUNTINGS, GROUPS, AccountingSpec
from dpcert.certification.aggregation import dp_label_flips
from dpcert.certification.bounds import check_unit_interval, check_vote_counts
from dpcert.certification.certify import (
    INFERENCES,
    Certificates,
    certificates_csv,
    certified_accuracy,
    certify,
    radius_summary,
)
from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError, check_device
from dpcert.store import atomic_write_text, load_array
from dpcert.workflows.defence import DEFENCE_KINDS
from dpcert.workflows.run import AVERAGING_NAMES, DATASETS, FEATURE_NAMES, MODEL_NAMES
from dpcert.workflows.setting import LEARNERS

#: Radii at which certified accuracy is reported.
REPORT_RADII = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_SCORE_SUM_TOL = 1e-3
_MAX_VOTES = 2**53


class BatchInstances(click.ParamType):
    """A positive integer or ``auto``."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive integer nor auto", param, ctx)
        return number


def validate_outputs(arr: np.ndarray, inference: str) -> np.ndarray:
    """Check votes (N, L) non-negative integers, or scores (P, N, L) in [0, 1] summing to 1."""
    if arr.size == 0:
        raise UserError(f"input array is empty (shape {arr.shape})")
    if inference == "multinomial":
        if arr.ndim != 2:
            raise UserError(
                f"multinomial input must be vote counts of shape (N, L), got {arr.shape}")
        check_vote_counts(arr)
        if np.any(arr > _MAX_VOTES):  # beyond exact float/int64 arithmetic
            raise UserError(f"vote counts above {_MAX_VOTES} are not supported")
        return arr.astype(np.int64)
    if inference == "scores":
        if arr.ndim != 3:
            raise UserError(f"scores input must have shape (P, N, L), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"scores must be numbers, got dtype {arr.dtype}")
        arr = arr.astype(float)
        check_unit_interval(arr)
        worst = float(np.max(np.abs(arr.sum(axis=2) - 1.0)))
        if worst > _SCORE_SUM_TOL:
            raise UserError(f"scores must sum to 1 over labels (worst deviation {worst:.3g})")
        return arr
    raise UserError(f"inference must be one of {INFERENCES}")


def resolve_mechanism(mechanism: Path | None, sample_rate: float | None,
                      noise_multiplier: float | None, steps: int | None,
                      dataset_size: int | None, subset_size: int | None) -> MechanismRecord:
    """The record from --mechanism, from the options, or both when they agree."""
    given = {"sample_rate": sample_rate, "noise_multiplier": noise_multiplier, "steps": steps,
             "dataset_size": dataset_size, "subset_size": subset_size}
    given = {k: v for k, v in given.items() if v is not None}
    if mechanism is not None:
        record = MechanismRecord.load(mechanism)
        for key, value in given.items():
            if getattr(record, key) != value:
                raise UserError(f"--{key.replace('_', '-')} {value} contradicts {mechanism} "
                                f"({key} = {getattr(record, key)})")
        return record
    missing = [k for k in ("sample_rate", "noise_multiplier", "steps") if k not in given]
    if missing:
        opts = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise UserError(f"missing {opts} (or pass --mechanism mechanism.json)")
    return MechanismRecord(**given)


def accuracy_report(cert: Certificates, labels: np.ndarray, radii=REPORT_RADII,
                    threat: str = "poisoning") -> str:
    summary = radius_summary(cert, labels)
    shown = [r for r in radii if r <= max(summary["max_radius"], 0) or r <= 2]
    ca = certified_accuracy(cert, labels, np.array(shown))
    lines = [f"clean accuracy (ensemble prediction): {summary['accuracy']:.4f}",
             "radius  certified accuracy"]
    lines += [f"{r:>6}  {a:.4f}" for r, a in zip(shown, ca, strict=True)]
    lines.append(f"median certified radius: {summary['median_radius']:g}   "
                 f"max certified radius: {summary['max_radius']}")
    lines.append("(radius = inserted + deleted training examples; a modification counts 2; "
                 "-1 for wrong or abstained points)" if threat == "poisoning" else
                 "(radius = flipped training labels; -1 for wrong or abstained points)")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpcert")
def main() -> None:
    """Pointwise certificates against training-data poisoning from DP ensembles."""


@main.command("certify")
@click.argument("input_path", metavar="INPUT.npy", type=click.Path(path_type=Path))
@click.option("--sample-rate", type=float, help="Poisson sampling rate q of DP-SGD.")
@click.option("--noise-multiplier", type=float, help="Noise multiplier sigma of DP-SGD.")
@click.option("--steps", type=int, help="Number of DP-SGD steps T.")
@click.option("--dataset-size", type=int, help="Training-set size n (needed with subsets).")
@click.option("--subset-size", type=int, help="Sub-dataset size m each instance trained on.")
@click.option("--mechanism", type=click.Path(path_type=Path),
              help="mechanism.json written by training (instead of the options above).")
@click.option("--inference", type=click.Choice(INFERENCES), default="multinomial",
              show_default=True, help="Votes (N, L) or per-instance softmax scores (P, N, L).")
@click.option("--accounting", type=click.Choice(ACCOUNTINGS), default="pld", show_default=True,
              help="pld: exact privacy profile (tightest); rdp; adp.")
@click.option("--group", type=click.Choice(GROUPS), default="sound", show_default=True,
              help="paper reproduces the published (unsound) group privacy; never certify with it.")
@click.option("--eta", type=float, default=1e-3, show_default=True,
              help="Certificates hold with probability >= 1 - eta.")
@click.option("--bound", type=click.Choice(["simuem", "bernstein", "hoeffding", "paper"]),
              help="Confidence bound (default: simuem for votes, bernstein for scores).")
@click.option("--max-radius", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--resolution", type=click.IntRange(0), default=256, show_default=True,
              help="Group tables at every radius up to this and at relative spacing "
                   "1/resolution beyond (radii there at most ~1/resolution below a table at "
                   "every radius; always sound); 0: a table at every radius.")
@click.option("--workers", type=click.IntRange(1),
              help="Processes building group tables [default: $DPCERT_WORKERS, else one per "
                   "usable CPU].")
@click.option("--paper-delta", type=float, default=1e-5, show_default=True,
              help="Single-example delta of --accounting adp --group paper.")
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="CSV with columns index,prediction,radius[,label].")
@click.option("--labels", type=click.Path(path_type=Path),
              help="Test labels (N,) .npy: adds a label column and prints certified accuracy.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Group-table cache (default $DPCERT_CACHE or ~/.cache/dpcert).")
@click.option("--method", type=click.Choice(["dp", "bagging", "dpa", "fa", "roe", "fa-roe"]),
              default="dp", show_default=True,
              help="Defence that produced the votes (dp: this project). roe: Run-off Election "
                   "over DPA-partition models; INPUT.npy holds every model's scores (k, N, L). "
                   "fa-roe: Run-off Election over Finite Aggregation's models, scores "
                   "(k*d, N, L), with --spread (and --shifts).")
@click.option("--train-size", type=int, help="Bagging: training-set size n.")
@click.option("--subsample-size", type=int, help="Bagging: examples k per bag.")
@click.option("--spread", type=int, help="Finite Aggregation: spread d.")
@click.option("--per-model", is_flag=True,
              help="FA: INPUT.npy holds every model's label, shape (N, k*d): full certificate "
                   "(without it: vote counts and the count-only bound).")
@click.option("--num-classes", type=click.IntRange(2), help="FA --per-model: number of labels L.")
@click.option("--shifts", help="FA --per-model, fa-roe: the d comma-separated spreading "
                               "shifts (default: those of the reference implementation).")
@click.option("--threat", type=click.Choice(["poisoning", "label-flip"]), default="poisoning",
              show_default=True,
              help="What the radius counts: inserted + deleted training examples (a "
                   "modification counts 2), or flipped training labels.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the table cache.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def certify_cmd(**options) -> None:
    """Certify every test point of INPUT.npy (votes or scores) and write OUT.csv."""

    def action() -> None:
        opts = CertifyOptions(**options)
        _check_method_flags(opts.method)
        if opts.per_model and opts.method != "fa":
            raise UserError("--per-model applies to --method fa only")
        if not 0.0 < opts.eta < 1.0:
            raise UserError(f"--eta must lie in (0, 1), got {opts.eta}")
        _check_output(opts.output)
        if opts.per_model:
            cert, n_points = _certify_fa(opts)
        elif opts.method in ("roe", "fa-roe"):
            cert, n_points = _certify_roe(opts)
        elif opts.method != "dp":
            cert, n_points = _certify_baseline(opts)
        else:
            cert, n_points = _certify(opts)
        if opts.threat == "label-flip" and opts.method == "dp":
            cert = dp_label_flips(cert)
        _write_results(cert, _load_labels(opts.labels, n_points), opts.output, opts.threat)

    _run_user(action)


@dataclass(frozen=True, kw_only=True)
class CertifyOptions:
    """Everything ``dpcert certify`` was asked (its options by name): what to read, which
    defence's certificate, the DP certificate's settings, the baselines' structure."""

    input_path: Path
    output: Path
    labels: Path | None
    method: str
    threat: str
    eta: float
    max_radius: int
    quiet: bool
    # the DP ensemble's mechanism and certificate
    sample_rate: float | None
    noise_multiplier: float | None
    steps: int | None
    dataset_size: int | None
    subset_size: int | None
    mechanism: Path | None
    inference: str
    accounting: str
    group: str
    bound: str | None
    paper_delta: float
    resolution: int
    workers: int | None
    cache_dir: Path | None
    no_cache: bool
    # the baselines' structure
    train_size: int | None
    subsample_size: int | None
    spread: int | None
    per_model: bool
    num_classes: int | None
    shifts: str | None


#: Options of ``certify`` that only one kind of defence reads.
_DP_ONLY = ("sample_rate", "noise_multiplier", "steps", "dataset_size", "subset_size",
            "mechanism", "inference", "accounting", "group", "bound", "paper_delta",
            "cache_dir", "no_cache", "resolution", "workers")
_BASELINE_ONLY = {"train_size": ("bagging",), "subsample_size": ("bagging",),
                  "spread": ("fa", "fa-roe"), "per_model": ("fa",), "num_classes": ("fa",),
                  "shifts": ("fa", "fa-roe")}


def _check_method_flags(method: str) -> None:
    """Options the chosen --method ignores are an error, not silently dropped."""
    ctx = click.get_current_context()

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    if method != "dp":
        bad = [n for n in _DP_ONLY if given(n)]
        if bad:
            raise UserError(f"--method {method} does not use the DP options "
                            f"{', '.join('--' + n.replace('_', '-') for n in bad)}")
    for name, methods in _BASELINE_ONLY.items():
        if given(name) and method not in methods:
            raise UserError(f"--{name.replace('_', '-')} applies to --method "
                            f"{' / '.join(methods)} only, not {method}")


def _certify(opts: CertifyOptions) -> tuple[Certificates, int]:
    """The DP ensemble's certificate from its votes or scores, and the number of points."""
    record = resolve_mechanism(opts.mechanism, opts.sample_rate, opts.noise_multiplier,
                               opts.steps, opts.dataset_size, opts.subset_size)
    spec = AccountingSpec(accounting=opts.accounting, group=opts.group,
                          max_radius=opts.max_radius, paper_delta=opts.paper_delta,
                          resolution=opts.resolution)
    outputs = validate_outputs(load_array(opts.input_path, "input"), opts.inference)
    n_points = outputs.shape[0] if opts.inference == "multinomial" else outputs.shape[1]
    _load_labels(opts.labels, n_points)  # refused before any table is built
    if opts.group == "paper":
        click.echo("warning: --group paper reproduces the published group privacy, which is "
                   "NOT a valid certificate (docs/method.md, section 2)", err=True)
    cache = None if opts.no_cache else (opts.cache_dir or "default")
    cert = certify(outputs, record, inference=opts.inference, eta=opts.eta, bound=opts.bound,
                   spec=spec, cache_dir=cache, progress=not opts.quiet and sys.stderr.isatty(),
                   workers=opts.workers)
    return cert, n_points


def _check_output(output: Path) -> None:
    if output.exists() and output.is_dir():
        raise UserError(f"--output {output} is a directory")
    if not output.parent.exists():
        raise UserError(f"output folder does not exist: {output.parent}")


def _load_labels(labels_path: Path | None, n_points: int) -> np.ndarray | None:
    if labels_path is None:
        return None
    labels = load_array(labels_path, "labels")
    if labels.shape != (n_points,) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be integers of shape ({n_points},), got "
                        f"{labels.dtype} {labels.shape}")
    return labels


def _write_results(cert: Certificates, labels: np.ndarray | None, output: Path,
                   threat: str = "poisoning") -> None:
    atomic_write_text(output, certificates_csv(cert, labels))
    certified = int(np.sum(cert.radius >= 0))
    click.echo(f"wrote {output}: {len(cert)} points, {certified} certified at r >= 0, "
               f"max radius {int(cert.radius.max())}")
    if labels is not None:
        click.echo(accuracy_report(cert, labels, threat=threat))


def _certify_fa(opts: CertifyOptions) -> tuple[Certificates, int]:
    """Full Finite Aggregation certificate from every model's label (N, k*d)."""
    from dpcert.certification import baselines

    if opts.spread is None or opts.num_classes is None:
        raise UserError("--method fa --per-model needs --spread D and --num-classes L")
    preds = load_array(opts.input_path, "input")
    if preds.ndim != 2 or preds.size == 0 or not np.issubdtype(preds.dtype, np.integer):
        raise UserError(f"--per-model input must be integer labels of shape (N, k*d), got "
                        f"{preds.dtype} {preds.shape}")
    shift_arr = _parse_shifts(opts.shifts, preds.shape[1])
    pred, radius = baselines.fa_certificate(preds, opts.num_classes, opts.spread, shift_arr)
    return _counted(pred, radius, opts.max_radius), len(pred)


def _counted(pred: np.ndarray, radius: np.ndarray, max_radius: int) -> Certificates:
    """A baseline's certificate (no confidence bounds), capped at ``max_radius``. The same
    against label flips: its parts hash inputs alone, so a flip reaches the models its
    insertion would."""
    nan = np.full(len(pred), np.nan)
    return Certificates(pred, np.minimum(radius, max_radius), nan, nan)


def _parse_shifts(shifts: str | None, models: int) -> np.ndarray | None:
    """--shifts "s1,s2,..." as integers in 0..models-1 (None: the reference's)."""
    if shifts is None:
        return None
    try:
        shift_arr = np.array([int(v) for v in shifts.split(",")], dtype=np.int64)
    except ValueError:
        raise UserError(f"--shifts must be comma-separated integers, got {shifts!r}") from None
    if shift_arr.min() < 0 or shift_arr.max() >= models:
        raise UserError(f"--shifts must lie in 0..{models - 1}")
    return shift_arr


def _certify_roe(opts: CertifyOptions) -> tuple[Certificates, int]:
    """Run-off Election certificate from every partition model's scores (k, N, L), over
    DPA's partition (roe) or Finite Aggregation's spread buckets (fa-roe, k*d models)."""
    from dpcert.certification import baselines

    if opts.method == "fa-roe" and opts.spread is None:
        raise UserError("--method fa-roe needs --spread D")
    scores = validate_outputs(load_array(opts.input_path, "input"), "scores")
    if opts.method == "fa-roe":
        shift_arr = _parse_shifts(opts.shifts, scores.shape[0])
        pred, radius = baselines.fa_roe_certificate(scores, opts.spread, shift_arr)
    else:
        pred, radius = baselines.roe_certificate(scores)
    return _counted(pred, radius, opts.max_radius), scores.shape[1]


def _certify_baseline(opts: CertifyOptions) -> tuple[Certificates, int]:
    """DPA, Finite Aggregation (count-only) or Bagging certificates from vote counts."""
    from dpcert.certification import baselines

    counts = validate_outputs(load_array(opts.input_path, "input"), "multinomial")
    if opts.method == "dpa":
        pred, radius = baselines.dpa_radius(counts)
    elif opts.method == "fa":
        if opts.spread is None:
            raise UserError("--method fa needs --spread D")
        pred, radius = baselines.fa_radius(counts, opts.spread)
    else:
        if opts.train_size is None or opts.subsample_size is None:
            raise UserError("--method bagging needs --train-size N and --subsample-size K")
        pred, radius = baselines.bagging_radius(counts, train_size=opts.train_size,
                                                subsample_size=opts.subsample_size,
                                                eta=opts.eta, max_radius=opts.max_radius,
                                                label_flips=opts.threat == "label-flip")
    return _counted(pred, radius, opts.max_radius), len(counts)


@main.command("run")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--defence", type=click.Choice((*DEFENCE_KINDS, "best")),
              help="dp: DP-SGD instances (default); dpa, fa, roe, fa-roe: partition "
                   "defences (Deep Partition Aggregation, Finite Aggregation, Run-off "
                   "Election over either); bagging; best: the one that certifies most at "
                   "--radius on a validation split of the training set. Every one gives a "
                   "run directory that predict, export and serve accept.")
@click.option("--radius", type=int,
              help="best: the radius R to certify most at (validation CA@R decides).")
@click.option("--tune-validation", type=int,
              help="best: training examples held out to choose on [default: a fifth of "
                   "them, at most 10,000]; the test set is not read to choose.")
@click.option("--models", type=int,
              help="Partition defences: k parts (FA trains k * spread models); bagging: N "
                   "bags [default: 50].")
@click.option("--learner", type=click.Choice(LEARNERS),
              help="Partition defences and bagging: how each model is fitted to its "
                   "examples [default: minibatch]. The closed-form learners (prototype, "
                   "prototype-cosine, nearest-neighbour, kernel-ridge) take feature vectors, "
                   "or the images flattened when no feature map is given.")
@click.option("--spread", type=int, help="fa, fa-roe: d, the models every example trains.")
@click.option("--subsample", type=int, help="bagging: examples per bag [default: 200].")
@click.option("--epochs", type=int, help="minibatch learner: passes over a part [default: 10].")
@click.option("--batch-size", type=int, help="minibatch learner: batch size [default: 32].")
@click.option("--weight-decay", type=float, help="Gradient learners: weight decay [default: 0].")
@click.option("--gamma", type=float,
              help="kernel-ridge: kernel width gamma of exp(-gamma |a - b|^2) [default: 0.25].")
@click.option("--ridge", type=float, help="kernel-ridge: regularisation [default: 0.001].")
@click.option("--dataset", type=click.Choice(DATASETS),
              help="Training and test data [default: digits, embedded].")
@click.option("--data-dir", help="Folder (IDX / CIFAR batches; train/ and test/ class "
              "folders of images for --dataset folder) or .npz file of the dataset.")
@click.option("--model", type=click.Choice(MODEL_NAMES),
              help="Model family [default: digits_cnn; linear needs --features].")
@click.option("--instances", type=int, help="Number P of DP-SGD instances [default: 100].")
@click.option("--sample-rate", type=float,
              help="Poisson sampling rate q: each example joins each step's batch with this "
                   "probability [default: 0.05].")
@click.option("--noise-multiplier", type=float,
              help="sigma: noise N(0, sigma^2 C^2) on the clipped gradient sum; larger sigma, "
                   "larger radii, noisier models [default: 3].")
@click.option("--steps", type=int, help="DP-SGD steps T per instance [default: 300]; the "
              "full-batch learner: its optimiser steps [default: 300].")
@click.option("--clip-norm", type=float,
              help="Per-example gradient clipping norm C [default: 1].")
@click.option("--lr", type=float, help="Learning rate [default: 0.01].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]),
              help="Optimiser of the DP-SGD steps or of a gradient learner [default: adam; "
                   "the linear model: sgd].")
@click.option("--subset-size", type=int,
              help="Train each instance on its own random subset of this size [default: the "
                   "whole training set].")
@click.option("--features", type=click.Choice(FEATURE_NAMES),
              help="Fixed feature map applied to every image (with --model linear).")
@click.option("--averaging", type=click.Choice(AVERAGING_NAMES),
              help="tail: average the iterates of the second half (linear model; free).")
@click.option("--bias-feature", type=float,
              help="Linear model: value of the constant input feature that carries the bias "
                   "[default: 1, the ordinary bias; 0 = none]. The shipped ScatterNet recipes "
                   "(configs/*_best.yaml) use 0.5, chosen on validation splits; the default "
                   "stays 1 because the option exists for the linear model only. Privacy and "
                   "certificate are unchanged.")
@click.option("--augment-shift", type=int,
              help="Image models: train on random translations by up to this many pixels.")
@click.option("--augment-copies", type=int,
              help="Translations per example, their gradients averaged before clipping "
                   "(one example's contribution: the certificate is unchanged).")
@click.option("--seed", type=int, help="Master seed (default 0: reruns are identical).")
@click.option("--validation", type=int,
              help="Hold out the last N training examples: train on the rest and certify "
                   "on them instead of the test set, which is then not read [default: 0, "
                   "off].")
@click.option("--train-size", type=int,
              help="The declared number of training examples DP-SGD scales its steps by "
                   "(q times it) [default: the dataset's: the standard split's size, an "
                   ".npz's train_size]; never counted from the data, which a poisoner "
                   "extends.")
@click.option("--eta", type=float,
              help="Certificates hold with probability >= 1 - eta [default: 0.001].")
@click.option("--max-radius", type=int, help="Largest radius searched [default: 1000].")
@click.option("--workers", type=int, help="Training processes (default: one per core).")
@click.option("--batch-instances", type=BatchInstances(),
              help="Train this many instances as one stacked computation, or 'auto': as "
                   "many as fit in half the free GPU memory (1 per process on CPU).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Where instances train [default: cpu].")
@click.option("--backend", type=click.Choice(["local", "ray"]),
              help="local: one process per core (default); ray: Ray tasks (pip install "
                   "'dpcert[ray]').")
@click.option("--address", "ray_address",
              help="Ray cluster address (default: a private local cluster).")
@click.option("--output", type=click.Path(path_type=Path),
              help="Run directory [default: runs/DATASET]; a rerun resumes it.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_cmd(config, output, quiet, **options) -> None:
    """Train a defence, certify every test point, and report (DP instances on digits by
    default; --defence for the partition defences and Bagging).

    CONFIG: an optional YAML file of the same options (keys with underscores, e.g.
    sample_rate: 0.001); options given here override it."""

    def action() -> None:
        from dpcert.workflows.defence import defence_config, run_defence
        from dpcert.workflows.run import RunConfig, load_config_file, run

        values = load_config_file(config) if config is not None else {}
        values.update({k: v for k, v in options.items() if v is not None})
        best = {k: values.pop(k) for k in ("radius", "tune_validation", "candidates")
                if k in values}
        if values.get("defence") == "best":
            from dpcert.workflows.best import run_best

            del values["defence"]
            cfg = RunConfig.from_mapping(values)
            check_device(cfg.device)
            run_dir = output or Path("runs") / f"{cfg.dataset}-best"
            click.echo(run_best(values, radius=best.get("radius"),
                                validation=best.get("tune_validation"),
                                candidates=best.get("candidates"), run_dir=run_dir,
                                progress=not quiet))
            click.echo(f"run directory: {run_dir} (certificates.csv, report.md, "
                       "certified_accuracy.png; the candidates in tuning/)")
            _echo_digest(run_dir)
            return
        if best:
            raise UserError(f"{', '.join(best)}: option{'s' if len(best) > 1 else ''} of "
                            "--defence best")
        kind, cfg, setting = defence_config(values)
        check_device(cfg.device)
        if setting is None:
            run_dir = output or Path("runs") / cfg.dataset
            text = run(cfg, run_dir, progress=not quiet)
        else:
            run_dir = output or Path("runs") / f"{cfg.dataset}-{kind}"
            text = run_defence(kind, setting, cfg, run_dir, progress=not quiet)
        click.echo(text)
        click.echo(f"run directory: {run_dir} (certificates.csv, report.md, "
                   "certified_accuracy.png)")
        _echo_digest(run_dir)

    _run_user(action)


@main.command("sign")
@click.argument("ensemble", type=click.Path(path_type=Path))
@click.option("--key", "private_key", type=click.Path(path_type=Path), required=True,
              help="Ed25519 private key, PEM (openssl genpkey -algorithm ed25519 -out KEY).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sign_cmd(ensemble, private_key, quiet) -> None:
    """Verify every model of a kept ENSEMBLE and sign its digest: the signature goes to
    ENSEMBLE/signature.json (a directory) or ENSEMBLE.sig (an exported file; copy it with
    the file). A run and its export share the digest, so one signature serves both.
    verify, predict and serve check it with --public-key."""

    def action() -> None:
        from dpcert.workflows.ensemble import load_ensemble
        from dpcert.workflows.signing import sign

        digest = load_ensemble(ensemble).verify(progress=not quiet)
        out = sign(ensemble, digest, private_key)
        click.echo(f"signed digest {digest}: {out}")

    _run_user(action)


def _echo_digest(run_dir: Path) -> None:
    from dpcert.workflows.ensemble import keeps_models, load_ensemble

    if keeps_models(run_dir):
        click.echo(f"ensemble digest {load_ensemble(run_dir).digest()} (pin it: predict, "
                   "serve and verify take --digest)")


@main.command("compare")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="Comparison directory.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Train every model (DP instances and baselines) here [default: the "
                   "config's dp.device, else cpu].")
@click.option("--threat", type=click.Choice(["poisoning", "label-flip"]),
              help="What the radii count: inserted + deleted training examples, or flipped "
                   "training labels (reports compare_label_flip.md) [default: the config's "
                   "threat, else poisoning].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare_cmd(config, output, device, threat, quiet) -> None:
    """Train and certify the defences of CONFIG on the same data; one report.

    Defences: dp (this project's DP ensemble), dpa (Deep Partition Aggregation), fa (Finite
    Aggregation), roe and fa-roe (Run-off Election over DPA's or FA's models), bagging, and the
    statistical baseline-DP bound of Ma et al. With `validation: N` in CONFIG, every listed
    setting is tuned on the last N training examples and only the chosen ones are certified
    on the test set (tuning.md says what was chosen and why)."""

    def action() -> None:
        from dpcert.workflows.compare import CompareConfig, compare
        from dpcert.workflows.run import load_config_file

        check_device(device)
        values = load_config_file(config)
        if device is not None:
            dp = values.get("dp", {})
            values["dp"] = {**(dp if isinstance(dp, dict) else {}), "device": device}
        if threat is not None:
            values["threat"] = threat
        cfg = CompareConfig.from_mapping(values)
        check_device(cfg.dp.get("device") if isinstance(cfg.dp, dict) else None)
        out = output or Path("runs") / f"compare-{Path(config).stem}"
        click.echo(compare(cfg, out, progress=not quiet))
        suffix = "" if cfg.threat == "poisoning" else "_label_flip"
        extra = f", tuning{suffix}.md" if cfg.validation else ""
        click.echo(f"comparison directory: {out} (compare{suffix}.md, compare{suffix}.png"
                   f"{extra})")

    _run_user(action)


@main.command("attack-check")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--radius", type=int, required=True, help="Attack budget r (insertions + "
              "deletions, a label flip counting 2; with --threat label-flip: flipped labels).")
@click.option("--threat", type=click.Choice(["poisoning", "label-flip"]), default="poisoning",
              show_default=True,
              help="label-flip: flip attacks only, r flips, against "
                   "certificates_label_flip.csv.")
@click.option("--targets", type=click.IntRange(0), default=5, show_default=True,
              help="Points certified at >= r to attack.")
@click.option("--controls", type=click.IntRange(0),
              help="Control points (correct, certified below r) to attack [default: --targets].")
@click.option("--attacks",
              help="Comma-separated: flip (nearest examples relabelled), insert (copies of "
                   "the point, wrong label) [default: flip,insert; label-flip: flip].")
@click.option("--data-dir", help="A partition or Bagging run on a dataset read from disk: "
              "its folder or file (the run records the data's fingerprint, not its path).")
@click.option("--seed", type=int, default=0, show_default=True, help="Choice of targets.")
@click.option("--workers", type=click.IntRange(0), default=0, help="Training processes.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Retrain here [default: the run's device].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def attack_check_cmd(run_dir, radius, threat, targets, controls, attacks, data_dir, seed,
                     workers, device, quiet) -> None:
    """Poison the training set of RUN_DIR aimed at chosen test points, retrain, count flips.

    RUN_DIR: a DP run, or a partition defence or Bagging run (dpcert run --defence), whose
    models the poison does not reach keep their scores. A certified prediction of a
    partition defence that changes is a soundness bug: exit status 1."""

    def action() -> None:
        from dpcert.workflows.attack import attack_check, broken_certificates, out_dir

        check_device(device)
        chosen = None if attacks is None else tuple(
            a.strip() for a in attacks.split(",") if a.strip())
        text, outcomes = attack_check(run_dir, radius, targets=targets, controls=controls,
                                      attacks=chosen, seed=seed, workers=workers,
                                      device=device, progress=not quiet, threat=threat,
                                      data_dir=data_dir,
                                      log=lambda line: click.echo(line, err=True))
        click.echo(text)
        click.echo(f"details: {out_dir(run_dir, radius, threat)}")
        if "SOUNDNESS BUG" in text:
            broken = broken_certificates(outcomes)
            click.echo(f"dpcert: SOUNDNESS BUG: {len(broken)} certified prediction(s) changed "
                       "under an attack within the radius", err=True)
            sys.exit(1)

    _run_user(action)


DIGEST_HELP = ("Refuse the ensemble unless its digest (printed by run, export and verify) is "
               "this one: pin the ensemble you trained.")
PUBLIC_KEY_HELP = ("Refuse the ensemble unless its signature (dpcert sign) verifies with this "
                   "Ed25519 public key (PEM).")


def _load_trusted(path: Path, *, device: str = "cpu", digest: str | None = None,
                  public_key: Path | None = None):
    """load_ensemble, pinned to a digest and/or a signer when asked."""
    from dpcert.workflows.ensemble import load_ensemble

    ens = load_ensemble(path, device=device, digest=digest)
    if public_key is not None:
        from dpcert.workflows.signing import check_signature

        check_signature(path, ens.digest(), public_key)
    return ens


@main.command("predict")
@click.argument("ensemble", type=click.Path(path_type=Path))
@click.argument("inputs", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), required=True,
              help="CSV to write: index, name, prediction, radius, the top two labels and "
                   "their votes, and the confidence bounds.")
@click.option("--eta", type=float, help="Failure probability [default: the run's eta].")
@click.option("--accounting", type=click.Choice(ACCOUNTINGS), default="pld", show_default=True,
              help="Privacy accounting of the certificate.")
@click.option("--inference", type=click.Choice(INFERENCES), default="multinomial",
              show_default=True, help="Certify from votes or from softmax scores.")
@click.option("--max-radius", type=click.IntRange(1),
              help="Largest radius searched [default: the run's].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the instances run.")
@click.option("--threat", type=click.Choice(["poisoning", "label-flip"]), default="poisoning",
              show_default=True,
              help="What the radius counts: inserted + deleted training examples (a "
                   "modification counts 2), or flipped training labels.")
@click.option("--digest", help=DIGEST_HELP)
@click.option("--public-key", type=click.Path(path_type=Path), help=PUBLIC_KEY_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict_cmd(ensemble, inputs, output, eta, accounting, inference, max_radius, device,
                threat, digest, public_key, quiet) -> None:
    """Certify new INPUTS with a kept ENSEMBLE (a run directory or an exported file).

    INPUTS: a .npy array, an IDX file (raw or .gz), an image file (PNG, JPEG, ...) or a
    folder of image files. Arrays may hold the reader's float images in [0, 1], raw integer
    pixels, or (for feature runs) precomputed features."""

    def action() -> None:
        from dpcert.learning.inputs import read_inputs

        _check_output(output)
        ens = _load_trusted(ensemble, device=device, digest=digest, public_key=public_key)
        x, names = read_inputs(inputs, ens.info.input)
        cert, pred = ens.certify_with_votes(x, eta=eta, accounting=accounting,
                                            inference=inference, max_radius=max_radius,
                                            progress=not quiet, threat=threat)
        from dpcert.workflows.serve import result_rows

        lines = ["index,name,prediction,radius,top_label,top_votes,runner_up,runner_up_votes,"
                 "p_lower,p_upper"]
        for i, row in enumerate(result_rows(cert, pred)):
            name = names[i].replace('"', '""')
            lines.append(f'{i},"{name}",{row["prediction"]},{row["radius"]},{row["top_label"]},'
                         f'{row["top_votes"]},{row["runner_up"]},{row["runner_up_votes"]},'
                         f'{_bound(row["p_lower"])},{_bound(row["p_upper"])}')
        atomic_write_text(output, "\n".join(lines) + "\n")
        certified = int((cert.radius >= 0).sum())
        click.echo(f"{len(cert)} inputs, {certified} certified (median radius "
                   f"{np.median(cert.radius):g}); wrote {output}")

    _run_user(action)


def _bound(value: float | None) -> str:
    """A confidence bound for the CSV; empty where the defence has none (a partition
    defence's vote count is deterministic: there is nothing to bound)."""
    return "" if value is None else f"{value:.6g}"


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_cmd(run_dir, file, quiet) -> None:
    """Write the ensemble of RUN_DIR into one portable FILE (safetensors: every model, the
    input preprocessing, the mechanism record, checksums). predict, serve and
    dpcert.load_ensemble accept it."""

    def action() -> None:
        from dpcert.workflows.ensemble import export_ensemble, load_ensemble

        if file.exists() and file.is_dir():
            raise UserError(f"{file} is a directory; name the file to write")
        digest = export_ensemble(run_dir, file, progress=not quiet)
        click.echo(f"wrote {file} ({file.stat().st_size / 1e6:.1f} MB), sha256 {digest}")
        click.echo(f"ensemble digest {load_ensemble(file).digest()} (the same as the run's)")

    _run_user(action)


@main.command("verify")
@click.argument("ensemble", type=click.Path(path_type=Path))
@click.option("--digest", help=DIGEST_HELP)
@click.option("--public-key", type=click.Path(path_type=Path), help=PUBLIC_KEY_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify_cmd(ensemble, digest, public_key, quiet) -> None:
    """Check every model of a kept ENSEMBLE (a run directory, a compare setting's folder or
    an exported file) and print its digest: sha256 of its manifest — the description,
    mechanism, training settings and every model's checksum — the same for a run and its
    export. Exit status 2 on any damage, or when it is not --digest."""

    def action() -> None:
        from dpcert.workflows.ensemble import load_ensemble

        ens = load_ensemble(ensemble)
        got = ens.verify(progress=not quiet)
        if digest is not None and got != digest.strip().lower():
            raise UserError(f"{ensemble} has digest {got}, not the pinned {digest.strip()}")
        if public_key is not None:
            from dpcert.workflows.signing import check_signature

            check_signature(ensemble, got, public_key)
            click.echo(f"signature: valid for the key {public_key}")
        kind = "DP" if ens.info.defence == "dp" else ens.info.defence
        click.echo(f"{ensemble}: {ens.info.instances} {kind} models of {ens.info.model}, "
                   f"every one verified; trained by dpcert "
                   f"{ens.info.dpcert_version or '< 0.3'} on data "
                   f"{(ens.info.data_sha256 or 'not recorded')[:16]}")
        click.echo(f"digest {got}")

    _run_user(action)


@main.command("serve")
@click.argument("ensemble", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--eta", type=float, help="Failure probability [default: the run's eta].")
@click.option("--accounting", type=click.Choice(ACCOUNTINGS), default="pld", show_default=True,
              help="Privacy accounting of the certificates.")
@click.option("--max-batch", type=click.IntRange(1), default=1024, show_default=True,
              help="Most inputs per request.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the instances run.")
@click.option("--token-file", type=click.Path(path_type=Path),
              help="A file holding a secret: /certify and /ensemble then need "
                   "'Authorization: Bearer <secret>'. Required beyond loopback.")
@click.option("--insecure", is_flag=True,
              help="Serve beyond loopback without a token (anyone reaching the port may "
                   "query the ensemble).")
@click.option("--digest", help=DIGEST_HELP)
@click.option("--public-key", type=click.Path(path_type=Path), help=PUBLIC_KEY_HELP)
def serve_cmd(ensemble, host, port, eta, accounting, max_batch, device, token_file,
              insecure, digest, public_key) -> None:
    """Serve a kept ENSEMBLE over HTTP: POST /certify, GET /health, GET /ensemble, and a page
    at / to upload or draw an image (pip install 'dpcert[serve]'). Concurrent requests share
    model passes. Headers must arrive within 10 s and bodies within 30 s; at most 256
    connections are open and 64 requests certified at once (then 503); a request may decode
    at most 16.7 million pixels."""

    def action() -> None:
        from dpcert.workflows.serve import check_exposure, serve

        token = None
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as err:
                raise UserError(f"cannot read {token_file}: {err.strerror or err}") from None
            if len(token) < 16:
                raise UserError(f"{token_file} holds a token of {len(token)} characters; "
                                "use at least 16 (e.g. python -c 'import secrets; "
                                "print(secrets.token_urlsafe(32))')")
        check_exposure(host, token, insecure)  # before the work of loading
        ens = _load_trusted(ensemble, device=device, digest=digest, public_key=public_key)
        click.echo(f"loading {ens} ...", err=True)
        serve(ens, host=host, port=port, eta=eta, accounting=accounting, max_batch=max_batch,
              token=token, insecure=insecure)

    _run_user(action)


@main.command("plan")
@click.option("--defence", type=click.Choice(("dp", "dpa", "fa", "bagging")), default="dp",
              show_default=True, help="Which defence to plan.")
@click.option("--sample-rate", type=float, help="dp: Poisson sampling rate q.")
@click.option("--noise-multiplier", "noise_multipliers",
              help="dp: one sigma or several, comma-separated (e.g. 3,6,10).")
@click.option("--steps", type=click.IntRange(1), help="dp: DP-SGD steps T.")
@click.option("--instances", type=click.IntRange(2),
              help="dp: number P of instances the ensemble will have.")
@click.option("--models", type=click.IntRange(1),
              help="dpa, fa: partitions k; bagging: bags N.")
@click.option("--spread", type=click.IntRange(1), default=1, show_default=True,
              help="fa: models every example trains (d).")
@click.option("--subsample", type=click.IntRange(1), help="bagging: examples per bag.")
@click.option("--train-size", type=click.IntRange(1), help="bagging: training-set size n.")
@click.option("--num-classes", type=click.IntRange(2), default=10, show_default=True,
              help="Number of labels L.")
@click.option("--eta", type=float, default=1e-3, show_default=True,
              help="Certificates hold with probability >= 1 - eta (dp, bagging).")
@click.option("--accounting", type=click.Choice(ACCOUNTINGS), default="pld", show_default=True,
              help="dp: privacy accounting (pld: tightest; rdp: fastest).")
@click.option("--max-radius", type=click.IntRange(1), default=1000, show_default=True,
              help="Largest radius searched.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of rows instead.")
def plan_cmd(defence, sample_rate, noise_multipliers, steps, instances, models, spread,
             subsample, train_size, num_classes, eta, accounting, max_radius, as_json) -> None:
    """What a defence can certify, before training: the radius at top-label vote shares
    1.0, 0.99, 0.95, 0.9 and 0.8 (the rest of the votes on one runner-up label) — the number
    the certificate gives those votes. dp: per mechanism (q, sigma, T, P), with the
    single-example (epsilon, delta = 1e-5); dpa, fa: per number of parts k (fa: the
    count-only bound); bagging: per (N, bag size, n)."""

    def action() -> None:
        import json

        from dpcert.certification.planning import SHARES

        if not 0.0 < eta < 1.0:
            raise UserError(f"--eta must lie in (0, 1), got {eta}")
        dp_given = [n for n, v in (("--sample-rate", sample_rate),
                                   ("--noise-multiplier", noise_multipliers),
                                   ("--steps", steps), ("--instances", instances)) if v is not None]
        if defence == "dp":
            rows = _plan_dp(sample_rate, noise_multipliers, steps, instances, num_classes, eta,
                            accounting, max_radius, quiet=as_json)
        else:
            from dpcert.certification.planning import plan_baseline

            if dp_given:
                raise UserError(f"{', '.join(dp_given)}: DP-SGD option"
                                f"{'s' if len(dp_given) > 1 else ''}, not of {defence}")
            if models is None:
                raise UserError(f"planning {defence} needs --models")
            rows = plan_baseline(defence=defence, models=models, num_classes=num_classes,
                                 spread=spread, train_size=train_size, subsample=subsample,
                                 eta=eta, max_radius=max_radius)
        if as_json:
            click.echo(json.dumps(rows, indent=1))
            return
        shares = " | ".join(f"share {s:g}" for s in SHARES)
        if defence == "dp":
            click.echo(f"q = {sample_rate}, T = {steps}, P = {instances}, L = {num_classes}, "
                       f"eta = {eta}, {accounting} accounting; radius by top-label vote share "
                       "(-1: abstain)")
            click.echo(f"| sigma | {shares} | eps (delta 1e-5) |")
            click.echo("|---" * (len(SHARES) + 2) + "|")
            for sigma in dict.fromkeys(r["noise_multiplier"] for r in rows):
                sel = [r for r in rows if r["noise_multiplier"] == sigma]
                click.echo(f"| {sigma:g} | " + " | ".join(str(r["radius"]) for r in sel)
                           + f" | {sel[0]['epsilon']:.3g} |")
            return
        what = {"dpa": f"k = {models}", "fa": f"k = {models}, d = {spread} (count-only bound)",
                "bagging": f"N = {models}, bags of {subsample} from n = {train_size}, "
                           f"eta = {eta}"}[defence]
        click.echo(f"{defence}: {what}, L = {num_classes}; radius by top-label vote share "
                   "(-1: abstain)")
        click.echo(f"| defence | {shares} |")
        click.echo("|---" * (len(SHARES) + 1) + "|")
        click.echo(f"| {defence} | " + " | ".join(str(r["radius"]) for r in rows) + " |")

    _run_user(action)


def _plan_dp(sample_rate, noise_multipliers, steps, instances, num_classes, eta, accounting,
             max_radius, *, quiet: bool) -> list[dict]:
    """``plan``'s DP rows, one mechanism at a time with a line on stderr as each starts
    (a PLD group table takes minutes at large radii)."""
    from dpcert.certification.planning import plan

    missing = [n for n, v in (("--sample-rate", sample_rate),
                              ("--noise-multiplier", noise_multipliers), ("--steps", steps),
                              ("--instances", instances)) if v is None]
    if missing:
        raise UserError(f"planning a DP ensemble needs {', '.join(missing)}")
    try:
        sigmas = [float(v) for v in noise_multipliers.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--noise-multiplier takes numbers separated by commas, got "
                        f"{noise_multipliers!r}") from None
    if not sigmas:
        raise UserError("--noise-multiplier names no value")
    rows = []
    for i, sigma in enumerate(sigmas):
        if not quiet:
            click.echo(f"[{i + 1}/{len(sigmas)}] sigma = {sigma:g}: {accounting} group tables "
                       f"up to r = {max_radius} (cached after the first time) ...", err=True)
        rows += plan(sample_rate=sample_rate, noise_multipliers=[sigma], steps=steps,
                     instances=instances, num_classes=num_classes, eta=eta,
                     accounting=accounting, max_radius=max_radius)
    return rows


_default_showwarning = __import__("warnings").showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from dpcert.errors import InputWarning

    if issubclass(category, InputWarning):
        click.echo(f"dpcert: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _run_user(action) -> None:
    import warnings

    from dpcert.errors import InputWarning

    warnings.showwarning = _show_warning
    warnings.simplefilter("always", InputWarning)
    try:
        action()
    except UserError as err:
        click.echo(f"dpcert: error: {err}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("dpcert: error: out of memory (input too large for this machine)", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
