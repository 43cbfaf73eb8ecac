"""A partition defence or Bagging as a run directory of its own: ``dpcert run --defence``.

DPA, Finite Aggregation, Run-off Election (over DPA's or FA's models) and Bagging, trained and
certified into a directory that every command reading a kept ensemble accepts, like a DP
run's:

    settings.json        the setting (a rerun with another one is refused; a rerun resumes)
    ensemble.json        what the models are and which certificate they take
    model_NNNNNN.npz / .safetensors   each model's test scores and its parameters, atomic
    certificates.csv     index,prediction,radius,label: the defence's own certificate
    certificates_<base>.csv   a run-off's: the certificate of the defence whose models it uses
    certificates_label_flip.csv   the defence's certificate against flipped labels
    votes.npy  labels.npy    int64 (N, L) vote counts and (N,) test labels
    report.md  certified_accuracy.png

The models are trained exactly as ``dpcert compare`` trains one setting (same folder
format, same seeds), so a setting trained here and in a comparison are the same models.
"""

from __future__ import annotations

from pathlib import Path

from dpcert.certification.aggregation import tally_votes
from dpcert.errors import UserError, unknown_keys_error
from dpcert.store import atomic_save_npy, atomic_write_text
from dpcert.workflows import rundir, white_box
from dpcert.workflows.compare import BASELINES
from dpcert.workflows.partition import (
    certify_baseline,
    certify_setting,
    learner_model,
    train_models,
)
from dpcert.workflows.runconfig import RunConfig, load_run_data
from dpcert.workflows.setting import BaselineConfig, parse_settings, trained_as

#: What ``--defence`` may name: the DP ensemble, or a baseline defence.
DEFENCE_KINDS = ("dp", *BASELINES)
#: Run options a partition defence or Bagging reads: the data, the model its gradient
#: learners train, execution and certification. (lr, optimizer, steps and augment_shift are
#: its learner's own options.)
RUN_KEYS = ("dataset", "data_dir", "model", "features", "seed", "validation", "eta",
            "max_radius", "workers", "device", "backend", "ray_address", "gpu_fraction")
_LEARNER_KEYS = tuple(k for k in BaselineConfig.__dataclass_fields__ if k not in RUN_KEYS)


def defence_config(values: dict) -> tuple[str, RunConfig, BaselineConfig | None]:
    """Split run options (a config file's keys with the command line's over them) into the
    defence named by ``defence`` (default ``dp``), its run options and, for a baseline, its
    setting. Every key must belong to the defence it is given to: one line otherwise."""
    values = dict(values)
    kind = values.pop("defence", "dp")
    if kind not in DEFENCE_KINDS:
        raise UserError(f"defence must be one of {', '.join(DEFENCE_KINDS)}, got {kind!r}")
    run_fields = set(RunConfig.__dataclass_fields__)
    if kind == "dp":
        theirs = sorted(set(values) & (set(_LEARNER_KEYS) - run_fields))
        if theirs:
            raise UserError(f"{', '.join(theirs)}: option{'s' if len(theirs) > 1 else ''} of "
                            "the partition defences and Bagging (--defence dpa, fa, roe, "
                            "fa-roe, bagging), not of the DP ensemble")
        return kind, RunConfig.from_mapping(values), None
    run_values = {k: v for k, v in values.items() if k in RUN_KEYS}
    learner = {k: v for k, v in values.items() if k in _LEARNER_KEYS}
    rest = set(values) - set(run_values) - set(learner)
    dp_only = sorted(rest & run_fields)
    if dp_only:
        raise UserError(f"{', '.join(dp_only)}: DP-SGD option{'s' if len(dp_only) > 1 else ''}"
                        f" (--defence dp), not of {kind}")
    if rest:
        raise unknown_keys_error(rest, (*RUN_KEYS, *_LEARNER_KEYS, "defence"),
                                 f"options of {kind}")
    if run_values.get("features") and "model" not in run_values:
        run_values["model"] = "linear"  # the model that feature runs name
    if run_values.get("model") == "linear":
        run_values["optimizer"] = "sgd"  # the DP engine's rule; this defence trains no DP-SGD
    return kind, RunConfig.from_mapping(run_values), parse_settings(kind, learner)[0]


def run_defence(kind: str, bc: BaselineConfig, cfg: RunConfig, run_dir: Path, *,
                progress: bool = True) -> str:
    """Train (resuming) and certify one baseline setting into ``run_dir``; returns the
    report's markdown. ``kind``: dpa, fa, roe, fa-roe or bagging."""
    from dpcert.workflows.report import ca_table, plot_curves

    run_dir = Path(run_dir)
    if (run_dir / rundir.CONFIG).exists():
        raise UserError(f"{run_dir} holds a DP run; use another --output directory")
    data = load_run_data(cfg)
    scores = train_models(kind, bc, cfg, data.x_train, run_dir, progress, defence=kind)
    results = {}
    for k in dict.fromkeys((kind, trained_as(kind))):  # the defence first, then its base
        cert = certify_baseline(k, bc, scores, len(data.y_train), cfg)
        rundir.write_certificates(run_dir, cert, data.y_test, method=None if k == kind else k)
        results[bc.name(k)] = cert
    flips = certify_baseline(kind, bc, scores, len(data.y_train), cfg, threat="label-flip")
    flip_rows = {bc.name(kind): flips}
    white = white_box.applies(kind, learner_model(bc, cfg.model))
    if white:
        flips = certify_setting(kind, bc, scores, data, cfg, threat="label-flip",
                                progress=progress)
        flip_rows = {f"{bc.name(kind)}, counting": flip_rows[bc.name(kind)],
                     f"{bc.name(kind)}, white-box": flips}
    rundir.write_certificates(run_dir, flips, data.y_test, threat="label-flip")
    atomic_save_npy(run_dir / rundir.VOTES, tally_votes(scores))
    atomic_save_npy(run_dir / rundir.LABELS, data.y_test)
    where = "held-out training examples" if cfg.validation else "test set"
    lines = [f"# dpcert run: {cfg.dataset}, {bc.name(kind)}", "",
             f"{len(scores)} models trained on the {len(data.y_train)} training examples "
             f"({bc.learner} learner); certified on the {where} ({len(data.y_test)} points). "
             "Radius = inserted + deleted training examples (a modification counts 2); "
             "median/max over all points, with -1 for wrong or abstained ones. The "
             "certificates are deterministic except Bagging's, which holds with probability "
             f">= 1 - eta (eta = {cfg.eta}).", "", *ca_table(results, data.y_test), "",
             "Against label flips (inputs untouched; radius = flipped labels; "
             f"{rundir.LABEL_FLIP}): the parts hash each example's input alone, so a flip "
             "reaches the models its insertion would"
             + ("; each kernel-ridge part is priced at the fewest flips of its own labels "
                "that can turn it (white-box certificate), at least one." if white else "."),
             "",
             *ca_table(flip_rows, data.y_test)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / rundir.REPORT, text)
    plot_curves(results, data.y_test, run_dir / rundir.PLOT,
                f"{cfg.dataset}: {bc.name(kind)}")
    return text
