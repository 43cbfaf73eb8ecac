"""`dpcert compare`: DP instances vs DPA vs Finite Aggregation vs Bagging, one report.

Every method is trained with the same architecture on the same training set and certified
for the same threat (radius = inserted + deleted training examples; a modification counts 2):

* dp: this project's run (:mod:`dpcert.workflows.run`), default certificate (PLD, sound, votes);
* dpa: k models, one per part of a hash partition of the examples' content
  (Levine & Feizi 2021) — the part of an example does not depend on the rest of the data;
* fa: Finite Aggregation (Wang, Levine, Feizi 2022), k d models; every example hashed into one
  of k d buckets, bucket h training the d models (h + s) mod kd; full per-model certificate;
* bagging: N models, each on k examples drawn with replacement (Jia, Cao, Gong 2021);
* roe: Run-off Election (Rezaei et al. 2023) over DPA's k partition models — the same trained
  models as a dpa setting with the same values (they share its folder), a second aggregation;
* fa-roe: Run-off Election over Finite Aggregation's k d models (FA + ROE, Rezaei et al.
  2023), likewise sharing the folder of the fa setting with the same values;
* baseline-DP: the statistical certified-accuracy lower bound of Ma, Zhu, Hsu (2019) for one
  of the DP instances (a curve, not a per-point certificate).

A baseline section may list several settings. With ``calibrate: true`` each baseline keeps the
setting whose clean accuracy is closest to the DP ensemble's (as in the paper's comparison);
otherwise every setting is reported. Each trained model's test scores are a checksummed unit
file, written atomically, reused on rerun, and its parameters are kept beside it
(``model_NNNNNN.safetensors``; the folder's ``ensemble.json`` says which certificate they
take), so ``dpcert.load_ensemble(folder)`` certifies new inputs with the defence's own
certificate. A setting's folder refuses other training values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dpcert.certification import baselines
from dpcert.certification.aggregation import (
    BASELINES,
    RUNOFF,
    check_threat,
    deterministic_certificates,
)
from dpcert.certification.certify import Certificates
from dpcert.errors import UserError, unknown_keys_error
from dpcert.store import atomic_write_text, instance_blocks, load_array
from dpcert.workflows import rundir
from dpcert.workflows.partition import (
    certify_setting,
    train_models,
)
from dpcert.workflows.run import METHODS, run, stored_config
from dpcert.workflows.runconfig import RunConfig, load_run_data
from dpcert.workflows.setting import (
    BaselineConfig,
    parse_settings,
)
from dpcert.workflows.tuning import Choice, choose, envelope

_KEYS = {"dp", "dp_grid", *BASELINES, "methods", "calibrate", "dp_run", "validation",
         "tune_radius", "threat"}


@dataclass(frozen=True)
class CompareConfig:
    """What ``dpcert compare`` runs. ``dp``: the run options (dataset, model, features, ... —
    the baselines train on the same data and model); ``dp_grid``: DP settings to try, each a
    mapping of run options over ``dp``; ``settings``: the baseline settings per defence.
    ``validation`` > 0 turns on the tuning protocol (:func:`compare_tuned`): every setting is
    evaluated on the last ``validation`` training examples, the choice is made there for
    radii 0..``tune_radius``, and only the chosen settings are trained on the full training
    set and certified on the test set."""

    dp: dict = field(default_factory=dict)  # RunConfig fields
    settings: dict[str, tuple[BaselineConfig, ...]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    calibrate: bool = False
    dp_run: str | None = None  # an existing run directory to reuse (resumed, not retrained)
    dp_grid: tuple[dict, ...] = ()
    validation: int = 0
    tune_radius: int | None = None
    threat: str = "poisoning"  # what the radii count: THREATS

    @classmethod
    def from_mapping(cls, data: dict) -> CompareConfig:
        if not isinstance(data, dict):
            raise UserError("a compare config must be a mapping")
        unknown = set(data) - _KEYS
        if unknown:
            raise unknown_keys_error(unknown, _KEYS, "compare config keys")
        if "methods" not in data:
            found = ", ".join(sorted(data)) or "none"
            raise UserError(f"a compare config must say what it compares: add methods: "
                            f"[...] from {', '.join(('dp', *BASELINES))} (sections found: "
                            f"{found})")
        methods = data["methods"]
        if not isinstance(methods, list | tuple) or not methods:
            raise UserError(f"methods must be a non-empty list ({', '.join(('dp', *BASELINES))})")
        bad = [m for m in methods if not isinstance(m, str) or m not in ("dp", *BASELINES)]
        if bad:
            raise UserError(f"unknown methods {bad} ({', '.join(('dp', *BASELINES))})")
        methods = tuple(dict.fromkeys(methods))
        calibrate = data.get("calibrate", False)
        if not isinstance(calibrate, bool):
            raise UserError(f"calibrate must be true or false, got {calibrate!r}")
        if calibrate and "dp" not in methods:
            raise UserError("calibrate needs the dp method (its clean accuracy is the target)")
        # every section given is validated now, before any training, used or not
        given = {k: parse_settings(k, data[k]) for k in BASELINES if k in data}
        settings = {k: given.get(k) or parse_settings(k, {}) for k in BASELINES if k in methods}
        if not isinstance(data.get("dp", {}), dict):
            raise UserError("the dp section must be a mapping of run options")
        dp_run = data.get("dp_run")
        if dp_run is not None and not isinstance(dp_run, str):
            raise UserError(f"dp_run must be a run directory path, got {dp_run!r}")
        dp = {**(stored_config(Path(dp_run)) if dp_run else {}), **data.get("dp", {})}
        RunConfig.from_mapping(dp)
        grid = data.get("dp_grid", [])
        if not isinstance(grid, list) or not all(isinstance(g, dict) and g for g in grid):
            raise UserError("dp_grid must be a list of mappings of run options, e.g. "
                            "[{noise_multiplier: 3}, {noise_multiplier: 6}]")
        for g in grid:
            RunConfig.from_mapping({**dp, **g})
        if dp_run is not None and grid:
            raise UserError("dp_run reuses one run; give dp_grid without it")
        validation = data.get("validation", 0)
        if not (isinstance(validation, int) and not isinstance(validation, bool)
                and validation >= 0):
            raise UserError(f"validation must be a number of training examples >= 0, got "
                            f"{validation!r}")
        tune_radius = data.get("tune_radius")
        if tune_radius is not None and not (isinstance(tune_radius, int) and tune_radius >= 0):
            raise UserError(f"tune_radius must be an integer >= 0, got {tune_radius!r}")
        if tune_radius is not None and not validation:
            raise UserError("tune_radius belongs to the tuning protocol: set validation too")
        if calibrate and grid:
            raise UserError("calibrate matches one DP ensemble's accuracy: drop dp_grid")
        if validation and (calibrate or dp_run is not None):
            raise UserError("the tuning protocol (validation) chooses settings itself: drop "
                            "calibrate and dp_run")
        threat = data.get("threat", "poisoning")
        check_threat(threat)
        return cls(dp, settings, methods, calibrate, dp_run, tuple(grid), validation,
                   tune_radius, threat)

    def dp_settings(self) -> list[tuple[str, str, dict]]:
        """(name, folder, run options) of every DP setting: ``dp`` alone, or ``dp`` under each
        ``dp_grid`` entry."""
        if not self.dp_grid:
            return [("dp (pld, sound)", "dp", dict(self.dp))]
        out = []
        for g in self.dp_grid:
            desc = ", ".join(f"{k}={v}" for k, v in g.items())
            folder = "dp_" + "_".join(f"{k.replace('_', '-')}{v}" for k, v in g.items())
            out.append((f"dp ({desc})", folder, {**self.dp, **g}))
        return out


def compare(cfg: CompareConfig, out: Path, progress: bool = True) -> str:
    if cfg.validation:
        return compare_tuned(cfg, out, progress)
    run_cfg = RunConfig.from_mapping(cfg.dp)
    labels = load_run_data(run_cfg).y_test  # run() reuses the loaded data
    results: dict[str, Certificates] = {}
    curves: dict[str, object] = {}
    if "dp" in cfg.methods:
        for name, folder, options in cfg.dp_settings():
            dp_dir = Path(cfg.dp_run) if cfg.dp_run else out / folder
            results[name] = _dp_certificates(RunConfig.from_mapping(options), dp_dir, progress,
                                             cfg.threat)
            if not cfg.dp_grid and cfg.threat == "poisoning":
                curves["baseline-DP (Ma et al., CA lower bound)"] = _ma_curve(dp_dir,
                                                                              run_cfg.eta)
    per_kind: dict[str, dict[str, Certificates]] = {}
    last: dict = {}
    cands = setting_candidates(cfg)
    for kind, name, folder, bc in cands:
        if kind != "dp":
            per_kind.setdefault(kind, {})[name] = evaluate_setting(
                kind, bc, run_cfg, out / folder, progress, last, threat=cfg.threat)
    last.clear()
    calibration: list[tuple[str, float, bool]] = []
    for kind in BASELINES:
        if kind not in per_kind:
            continue
        certs = per_kind[kind]
        if cfg.calibrate:
            target = _clean(results["dp (pld, sound)"], labels)
            best = min(certs, key=lambda k: abs(_clean(certs[k], labels) - target))
            calibration += [(k, _clean(c, labels), k == best) for k, c in certs.items()]
            certs = {best: certs[best]}
        results.update(certs)
    used = {folder for _, _, folder, _ in cands}
    return _report(results, labels, out, run_cfg, curves, calibration,
                   unused=unused_folders(out, used), threat=cfg.threat)


def _dp_certificates(run_cfg: RunConfig, run_dir: Path, progress: bool,
                     threat: str = "poisoning") -> Certificates:
    """The DP ensemble's default certificates (PLD, sound, votes) against ``threat``,
    training what is missing (a finished run is only re-certified). Only that certificate is
    computed: the paper's modes at large radii take minutes, and ``dpcert run`` on the folder
    adds every method."""
    run(run_cfg, run_dir, progress, methods=METHODS[:1])
    rows = rundir.read_certificates(run_dir / rundir.certificates_name(threat=threat))
    return deterministic_certificates(rows[:, 1], rows[:, 2])


def setting_candidates(cfg: CompareConfig) -> list[tuple[str, str, str, object]]:
    """(defence, setting name, folder, setting) of every setting the config lists, those that
    share a folder (a run-off and the models it aggregates) next to each other, so that one
    reading of the folder's models serves them all."""
    out = [("dp", name, folder, options) for name, folder, options in cfg.dp_settings()
           if "dp" in cfg.methods]
    baselines_ = [(kind, bc.name(kind), bc.folder(kind), bc) for kind in BASELINES
                  if kind in cfg.methods for bc in cfg.settings[kind]]
    first = {}
    for i, (_, _, folder, _) in enumerate(baselines_):
        first.setdefault(folder, i)
    return out + sorted(baselines_, key=lambda c: first[c[2]])


def evaluate_setting(kind: str, setting, run_cfg: RunConfig, folder: Path, progress: bool,
                     last: dict | None = None, *, threat: str = "poisoning") -> Certificates:
    """Certificates of one setting of one defence on ``run_cfg``'s evaluation set (the test
    set, or the held-out training examples when ``run_cfg.validation`` is set). ``last``
    keeps the scores of the folder read last, reused when the next setting shares it (a
    run-off after the models it aggregates), dropped before another folder is read."""
    if kind == "dp":
        return _dp_certificates(RunConfig.from_mapping({**asdict(run_cfg), **setting,
                                                        "validation": run_cfg.validation}),
                                folder, progress, threat)
    data = load_run_data(run_cfg)
    if last is not None and last.get("folder") == folder:
        scores = last["scores"]
    else:
        if last is not None:
            last.clear()  # FA's scores are GBs: never two folders' at once
        scores = train_models(kind, setting, run_cfg, data.x_train, folder, progress)
        if last is not None:
            last.update(folder=folder, scores=scores)
    cert = certify_setting(kind, setting, scores, data, run_cfg, threat=threat,
                           progress=progress)
    rundir.write_certificates(folder, cert, data.y_test,
                              method=kind if kind in RUNOFF else None, threat=threat)
    return cert


def compare_tuned(cfg: CompareConfig, out: Path, progress: bool = True) -> str:
    """The tuning protocol: choose every defence's setting on a validation split carved from
    the training set, then train the chosen settings on the full training set and certify
    them on the test set (read only then). Writes ``tuning.md`` (every setting on validation,
    what was chosen) and ``compare.md``/``compare.png`` (the chosen settings on test, and
    per-radius envelopes: at each radius the setting, or the defence, that validation chose
    for that radius)."""
    from dpcert.certification.certify import certified_accuracy

    base = RunConfig.from_mapping(cfg.dp)
    val_cfg = RunConfig.from_mapping({**cfg.dp, "validation": cfg.validation})
    top = base.max_radius if cfg.tune_radius is None else cfg.tune_radius
    radii = np.arange(top + 1)
    cands = setting_candidates(cfg)
    if not cands:
        raise UserError("nothing to compare: list at least one method")
    val_data = load_run_data(val_cfg)
    val_labels = val_data.y_test
    val: dict[str, dict[str, np.ndarray]] = {}
    val_certs: dict[str, Certificates] = {}
    last: dict = {}
    for kind, name, folder, setting in cands:
        cert = evaluate_setting(kind, setting, val_cfg, out / "validation" / folder, progress,
                                last, threat=cfg.threat)
        val_certs[name] = cert
        val.setdefault(kind, {})[name] = certified_accuracy(cert, val_labels, radii)
    last.clear()
    val = {kind: val[kind] for kind in ("dp", *BASELINES) if kind in val}  # report order
    choices = {kind: choose(curves) for kind, curves in val.items()}
    overall = choose({name: c for curves in val.values() for name, c in curves.items()})
    needed = set(overall.per_radius).union(
        *({c.best, *c.per_radius} for c in choices.values()))
    labels = load_run_data(base).y_test
    results: dict[str, Certificates] = {}
    test_curves: dict[str, np.ndarray] = {}
    for kind, name, folder, setting in cands:
        if name not in needed:
            continue
        cert = evaluate_setting(kind, setting, base, out / folder, progress, last,
                                threat=cfg.threat)
        test_curves[name] = certified_accuracy(cert, labels, np.arange(base.max_radius + 1))
        if name == choices[kind].best:
            results[name] = cert
    last.clear()
    order = {name: list(val).index(kind) for kind, name, _, _ in cands}
    results = dict(sorted(results.items(), key=lambda item: order[item[0]]))
    curves = {f"{kind} envelope": envelope(c.per_radius, test_curves)
              for kind, c in choices.items() if len(val[kind]) > 1}
    if len(choices) > 1:
        curves["envelope of all defences"] = envelope(overall.per_radius, test_curves)
    tuning = _tuning_report(cfg, val, val_certs, val_labels, choices, overall, top)
    atomic_write_text(out / _threat_name("tuning.md", cfg.threat), tuning)
    protocol = [
        f"Protocol: every setting was trained on the first {len(val_data.y_train)}"
        f" training examples and certified on the last {cfg.validation} (validation); each "
        f"defence's row is its setting with the best mean validation CA over radii "
        f"0..{top}, trained again on the full training set and certified on the test set, "
        "which nothing else reads. An envelope row picks at every radius the setting (or the "
        "defence) with the best validation CA at that radius and reports its test CA there. "
        f"Every setting's validation scores: {_threat_name('tuning.md', cfg.threat)}.", ""]
    used = {f for _, name, f, _ in cands if name in needed} | {
        f"validation/{f}" for _, _, f, _ in cands}
    return _report(results, labels, out, base, curves, [], preamble=protocol,
                   unused=unused_folders(out, used), threat=cfg.threat)


def _tuning_report(cfg: CompareConfig, val: dict[str, dict[str, np.ndarray]],
                   certs: dict[str, Certificates], labels: np.ndarray,
                   choices: dict[str, Choice], overall: Choice, top: int) -> str:
    from dpcert.workflows.report import TABLE_RADII

    shown = [r for r in TABLE_RADII if r <= top]
    lines = [f"# Tuning on the validation split (last {cfg.validation} training examples)", "",
             f"Mean CA = mean certified accuracy over radii 0..{top}; each defence keeps its "
             "setting with the highest (marked best); 'wins at' lists the radii (of the table"
             "'s) where a setting has the best validation CA of its defence.", "",
             "| defence | setting | clean acc | mean CA | " + " | ".join(f"CA@{r}" for r in shown)
             + " | chosen | wins at |",
             "|" + "---|" * (len(shown) + 6)]
    for kind, curves in val.items():
        for name, curve in curves.items():
            clean = float(np.mean(certs[name].prediction == labels))
            wins = [r for r in shown if choices[kind].per_radius[r] == name and curve[r] > 0]
            lines.append(f"| {kind} | {name} | {clean:.3f} | {curve.mean():.3f} | "
                         + " | ".join(f"{curve[r]:.3f}" for r in shown)
                         + f" | {'best' if name == choices[kind].best else ''} | "
                         + ", ".join(map(str, wins)) + " |")
    picks = ", ".join(f"r={r}: {overall.per_radius[r]}" for r in shown)
    lines += ["", f"Across defences, validation chose at each radius: {picks}."]
    return "\n".join(lines) + "\n"


def _clean(cert: Certificates, labels: np.ndarray) -> float:
    return float(np.mean(cert.prediction == labels))


def instance_accuracies(scores: np.ndarray, labels: np.ndarray, values: int = 2**24
                        ) -> np.ndarray:
    """Test accuracy (P,) of each instance from its scores (P, N, L), read a block of about
    ``values`` scores at a time (:func:`~dpcert.store.instance_blocks`)."""
    return np.concatenate([(block.argmax(axis=2) == labels).mean(axis=1)
                           for block in instance_blocks(scores, values)])


def _ma_curve(run_dir: Path, eta: float, delta: float = 1e-5):
    """Ma, Zhu, Hsu (2019): CA_r lower bound of one DP model from the run's own instances.

    (eps, delta) is the exact single-example profile at delta = 1e-5; the expected accuracy of
    one instance is lower-bounded by Hoeffding over the P independent instances at level eta.
    """
    from dpcert.certification.accounting import EPS_GRID
    from dpcert.certification.mechanism import MechanismRecord
    from dpcert.certification.pld import group_privacy_profile

    rec = MechanismRecord.load(run_dir / rundir.MECHANISM)
    prof = group_privacy_profile(rec.sample_rate, rec.noise_multiplier, 1, rec.steps, EPS_GRID)
    ok = np.flatnonzero(prof <= delta)
    eps = float(EPS_GRID[ok[0]]) if ok.size else np.inf
    scores = load_array(run_dir / rundir.SCORES, "scores", mmap=True)
    labels = load_array(run_dir / rundir.LABELS, "labels")
    if scores.ndim != 3 or scores.shape[1] != len(labels):
        raise UserError(f"{run_dir}: scores {scores.shape} do not match {len(labels)} labels")
    per_instance = instance_accuracies(scores, labels)
    acc_lo = max(0.0, float(per_instance.mean()) - np.sqrt(np.log(1 / eta) / (2 * len(scores))))
    if not np.isfinite(eps):
        return lambda radii: np.zeros(np.shape(radii))
    return lambda radii: baselines.dp_baseline_accuracy(radii, eps, delta, acc_lo)


#: Files that mark a folder of trained models: a baseline setting's, a DP run's.
MODEL_FOLDER_MARKERS = rundir.MODEL_FOLDER_MARKERS


def unused_folders(out: Path, used: set[str]) -> list[tuple[str, int]]:
    """(path relative to ``out``, size in bytes) of every folder of trained models in ``out``
    and ``out/validation`` whose path is not in ``used``: models of settings the config no
    longer lists, or that validation no longer chose, left by earlier runs. Only reported,
    never removed: they cost nothing to keep but disk, and retraining them can take hours."""
    found = []
    for parent in (out, out / "validation"):
        if not parent.is_dir():
            continue
        for folder in sorted(p for p in parent.iterdir() if p.is_dir()):
            rel = folder.relative_to(out).as_posix()
            if rel not in used and any((folder / m).is_file() for m in MODEL_FOLDER_MARKERS):
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                found.append((rel, size))
    return found


def _size_text(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _unused_lines(unused: list[tuple[str, int]]) -> list[str]:
    if not unused:
        return []
    total = _size_text(sum(size for _, size in unused))
    listed = ", ".join(f"`{rel}` ({_size_text(size)})" for rel, size in unused)
    return ["", "Not read by this comparison (models of settings the config no longer lists, "
            f"or that validation no longer chose; removing them frees {total}): {listed}."]


def _report(results: dict[str, Certificates], labels: np.ndarray, out: Path,
            cfg: RunConfig, curves: dict[str, object],
            calibration: list[tuple[str, float, bool]], preamble: list[str] = (),
            unused: list[tuple[str, int]] = (), threat: str = "poisoning") -> str:
    from dpcert.workflows.report import ca_table, plot_curves

    if threat == "poisoning":
        radius = ("Radius = inserted + deleted training examples (a modification counts 2), "
                  "the same convention for every method.")
        bound = (" The baseline-DP row is a statistical lower bound on certified accuracy (no "
                 "per-point certificate).")
    else:
        radius = ("Radius = flipped training labels (inputs untouched), for every method: the "
                  "DP ensemble's certificate at 2r changed examples, the partitions' counted "
                  "flip for flip (a flip reaches one part), DPA over kernel ridge priced part by "
                  "part (white-box), Bagging's bags drawn by position.")
        bound = ""
    lines = [f"# dpcert compare: {cfg.dataset}, model {cfg.model}"
             + ("" if threat == "poisoning" else ", against label flips"), "",
             radius + " CA@r = fraction of test points predicted correctly and certified at "
             "radius >= r." + bound, "", *preamble, *ca_table(results, labels, curves)]
    if calibration:
        target = _clean(results["dp (pld, sound)"], labels)
        lines += ["", f"Calibration: each baseline keeps the setting whose clean accuracy is "
                  f"closest to the DP ensemble's ({target:.3f}).", "",
                  "| setting | clean acc | kept |", "|---|---|---|",
                  *(f"| {name} | {acc:.3f} | {'yes' if kept else ''} |"
                    for name, acc, kept in calibration)]
    lines += _unused_lines(list(unused))
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / _threat_name("compare.md", threat), text)
    plot_curves(results, labels, out / _threat_name("compare.png", threat),
                f"{cfg.dataset}: defences compared"
                + ("" if threat == "poisoning" else " against label flips"), curves,
                xlabel=None if threat == "poisoning" else "radius r (flipped training labels)")
    return text


def _threat_name(name: str, threat: str) -> str:
    """A report file's name for ``threat``: compare.md, compare_label_flip.md, ..."""
    if threat == "poisoning":
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}_{threat.replace('-', '_')}.{suffix}"
