"""``dpcert run --defence best --radius R``: the defence that certifies most at radius R,
chosen on a validation split of the training set, trained as an ordinary run.

The protocol of ``dpcert compare`` with ``validation:``, for one radius: every candidate is
trained on the first n - N training examples and certified on the last N (the test set is
not read), the candidate with the highest certified accuracy at R there wins (ties: the
higher mean over radii 0..R, then the one listed first), and only the winner is trained on
the whole training set and certified on the test set, into ``run_dir`` — a DP run directory
or a baseline defence's (:mod:`dpcert.workflows.defence`). The candidates' validation folders
stay in ``run_dir/tuning``; ``report.md`` lists every candidate and why the winner won.

The choice is a function of the training set, so it is outside every certificate: the
certificate covers the winner's training with its setting held fixed (docs/method.md,
section 11).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpcert.errors import UserError
from dpcert.store import atomic_write_text
from dpcert.workflows import rundir
from dpcert.workflows.compare import CompareConfig, evaluate_setting, setting_candidates
from dpcert.workflows.defence import run_defence
from dpcert.workflows.run import run
from dpcert.workflows.runconfig import RunConfig, load_run_data

#: Noise multipliers the default grid's DP candidate is chosen from (by ``plan``).
SIGMAS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
#: Kernel widths of the default grid's kernel-ridge candidates: for unit-norm features
#: (ScatterNet's) and small images, and for images of hundreds of pixels.
GAMMAS = (0.25, 0.02)


def part_counts(radius: int, examples: int) -> list[int]:
    """The default grid's numbers of parts for radius R: 1.25, 2.5 and 5 times the 2R + 1
    that a unanimous DPA vote needs, at most a third of the examples (three a part)."""
    top = max(2, examples // 3)
    ks = [min(top, max(2, math.ceil(m * (2 * radius + 1)))) for m in (1.25, 2.5, 5.0)]
    return sorted(set(ks))


def dp_sigma(cfg: RunConfig, radius: int) -> float:
    """The smallest noise multiplier of :data:`SIGMAS` whose mechanism (the run's q, T, P)
    certifies R at a 0.95 vote share (``dpcert plan``, RDP accounting: fast); the largest
    when none does."""
    from dpcert.certification.planning import plan

    for sigma in SIGMAS:
        rows = plan(sample_rate=cfg.sample_rate, noise_multipliers=[sigma], steps=cfg.steps,
                    instances=cfg.instances, eta=cfg.eta, accounting="rdp",
                    max_radius=max(1, radius), shares=(0.95,))
        if rows[0]["radius"] >= radius:
            return sigma
    return SIGMAS[-1]


def default_grid(cfg: RunConfig, radius: int, examples: int) -> dict:
    """The candidates tried when the config names none (a ``dpcert compare`` mapping): DP at
    the noise multiplier :func:`dp_sigma` picks; DPA and Run-off Election over kernel ridge at
    :func:`part_counts` parts and both :data:`GAMMAS`; Finite Aggregation over kernel ridge at
    the smallest k (d = 4) and Bagging over kernel ridge (2k bags of n / k examples, the
    middle k)."""
    ks = part_counts(radius, examples)
    mid = ks[len(ks) // 2]
    kernel = [{"models": k, "learner": "kernel-ridge", "gamma": g} for k in ks for g in GAMMAS]
    return {
        "methods": ["dp", "dpa", "roe", "fa", "bagging"],
        "dp_grid": [{"noise_multiplier": dp_sigma(cfg, radius)}],
        "dpa": kernel, "roe": kernel,
        "fa": [{"models": ks[0], "spread": 4, "learner": "kernel-ridge",
                "gamma": GAMMAS[0]}],
        "bagging": [{"models": 2 * mid, "subsample": max(1, examples // mid),
                     "learner": "kernel-ridge", "gamma": GAMMAS[0]}],
    }


def run_best(values: dict, *, radius: int, validation: int | None, candidates: dict | None,
             run_dir: Path, progress: bool = True) -> str:
    """Choose on validation, train the winner into ``run_dir``; returns its report.
    ``values``: run options (the data, and the DP candidate's mechanism); ``candidates``: a
    ``dpcert compare`` mapping of settings (``methods``, ``dpa``, ``dp_grid``, ...), or None
    for :func:`default_grid`."""
    if not (isinstance(radius, int) and not isinstance(radius, bool) and radius >= 0):
        raise UserError(f"--defence best needs --radius R, an integer >= 0 (got {radius!r})")
    base = RunConfig.from_mapping(values)
    if base.validation:
        raise UserError("--defence best carves its own validation split: give "
                        "--tune-validation N, not --validation")
    n = len(load_run_data(base).y_train)
    held = validation if validation is not None else min(10_000, n // 5)
    if not (isinstance(held, int) and 0 < held < n - 1):
        raise UserError(f"--tune-validation must lie between 1 and {n - 2} (of the {n} "
                        f"training examples), got {held}")
    grid = candidates if candidates is not None else default_grid(base, radius, n - held)
    if not isinstance(grid, dict):
        raise UserError("candidates must be a mapping like a dpcert compare config "
                        "(methods, dpa, dp_grid, ...)")
    cfg = CompareConfig.from_mapping({**grid, "dp": values, "validation": held,
                                      "tune_radius": radius})
    val_cfg = RunConfig.from_mapping({**values, "validation": held})
    labels = load_run_data(val_cfg).y_test
    from dpcert.certification.certify import certified_accuracy

    rows, last = [], {}
    cands = setting_candidates(cfg)
    for kind, name, folder, setting in cands:
        cert = evaluate_setting(kind, setting, val_cfg, run_dir / "tuning" / folder, progress, last)
        curve = certified_accuracy(cert, labels, np.arange(radius + 1))
        rows.append((name, kind, setting, float(np.mean(cert.prediction == labels)),
                     float(curve[radius]), float(curve.mean())))
    last.clear()
    # highest CA at R, then the higher mean over 0..R, then the first listed (a stable sort)
    ranked = sorted(range(len(rows)), key=lambda i: (-rows[i][4], -rows[i][5]))
    name, kind, setting = rows[ranked[0]][:3]
    if kind == "dp":
        text = run(RunConfig.from_mapping(setting), run_dir, progress)
    else:
        text = run_defence(kind, setting, base, run_dir, progress=progress)
    table = ["| candidate | clean acc | CA@" + str(radius) + " | mean CA 0.." + str(radius)
             + " | chosen |", "|---|---|---|---|---|"]
    for i in ranked:
        nm, _, _, clean, at_r, mean = rows[i]
        table.append(f"| {nm} | {clean:.3f} | {at_r:.3f} | {mean:.3f} | "
                     f"{'yes' if nm == name else ''} |")
    why = [f"## How this defence was chosen (--defence best --radius {radius})", "",
           f"Every candidate was trained on the first {n - held} training examples and "
           f"certified on the last {held} (validation; the test set was not read). {name} "
           f"certified the most of them at radius {radius} "
           f"({rows[ranked[0]][4]:.3f}; ties go to the higher mean over radii 0..{radius}), "
           "so it alone was trained on all the training examples and certified on the test "
           "set above. The choice reads the training set, so it lies outside the "
           "certificate, which covers this setting held fixed. Candidates' folders: "
           "tuning/.", "", *table]
    text = text + "\n" + "\n".join(why) + "\n"
    atomic_write_text(run_dir / rundir.REPORT, text)
    return text
