"""White-box label-flip certificates for DPA over kernel ridge, against exhaustive search:
every labelling of every part retrained and scored exactly as a kept model scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dpcert.certification import baselines
from dpcert.certification.kernel_flips import (
    NEVER,
    ensemble_flip_radius,
    labels_from_coef,
    part_flip_costs,
)
from dpcert.errors import UserError
from dpcert.learning.inference import KERNEL, score_instances, stack_params
from dpcert.learning.reference import kernel_ridge_params
from dpcert.workflows.partition import training_indices
from dpcert.workflows.setting import BaselineConfig


def _votes(x, labellings, xt, classes, gamma, ridge):
    """The kept models' votes (len(labellings), N) for the part x under each labelling."""
    params = [kernel_ridge_params(x, y, classes, len(x), gamma=gamma, ridge=ridge)
              for y in labellings]
    stacked = {n: torch.from_numpy(v) for n, v in stack_params(params).items()}
    scores = score_instances(KERNEL, stacked, torch.from_numpy(xt), in_channels=x.shape[1],
                             num_classes=classes)
    return scores.argmax(axis=2)


def _exact_part_costs(x, y, xt, classes, gamma, ridge):
    """The fewest flips (N, L) that make the part vote each label (a huge number: never),
    by retraining the part under every labelling of its examples."""
    labellings = np.array(list(itertools.product(range(classes), repeat=len(x))))
    flips = (labellings != y[None, :]).sum(axis=1)
    votes = _votes(x, labellings, xt, classes, gamma, ridge)  # (labellings, N)
    exact = np.full((len(xt), classes), 10**6)
    for lab in range(classes):
        hit = votes == lab
        exact[:, lab] = np.where(hit.any(0), np.where(hit, flips[:, None], 10**6).min(0), 10**6)
    return exact, votes[flips.argmin()]


def _problem(seed, n, classes, parts, n_test, spread):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(classes, 2))
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(size=(n, 2))).astype(np.float32)
    xt = (centres[rng.integers(0, classes, n_test)] + rng.normal(size=(n_test, 2))
          ).astype(np.float32)
    idx = training_indices("dpa", BaselineConfig(models=parts, learner=KERNEL), x)
    return x, y, xt, idx


@pytest.mark.parametrize(("seed", "n", "classes", "parts", "ridge", "gamma", "spread"),
                         [(0, 18, 3, 3, 0.1, 0.5, 1.2), (2, 33, 2, 3, 0.01, 0.5, 1.2),
                          (3, 30, 3, 4, 0.3, 0.1, 3.0), (4, 50, 2, 5, 1.0, 0.1, 2.5)])
def test_white_box_certificate_is_sound_and_beats_counting(seed, n, classes, parts, ridge,
                                                           gamma, spread):
    """Per part: the cost bound never exceeds the exact fewest flips. Per input: the
    certified radius is below the exact fewest flips that change DPA's prediction (every
    combination of the parts' exact costs) and never below the counting certificate."""
    x, y, xt, idx = _problem(seed, n, classes, parts, 40, spread)
    assert max(len(i) for i in idx) <= 14, "parts too large to enumerate"
    exact, costs, votes = [], [], []
    for part in idx:
        e, v = _exact_part_costs(x[part], y[part], xt, classes, gamma, ridge)
        exact.append(e)
        votes.append(v)
        c = part_flip_costs(xt, x[part], y[part], v, num_classes=classes, gamma=gamma,
                            ridge=ridge)
        bound = np.where(c == NEVER, 10**6, c.astype(np.int64))
        assert (bound <= e).all(), "a part's cost bound over-states the flips it needs"
        assert (c[np.arange(len(xt)), v] == 0).all()
        costs.append(c)
    pred, radius = ensemble_flip_radius(np.stack(costs), np.stack(votes), classes,
                                        max_radius=1000)
    counts = np.stack([np.bincount(v, minlength=classes) for v in np.stack(votes).T])
    base_pred, counting = baselines.dpa_radius(counts)
    np.testing.assert_array_equal(pred, base_pred)
    assert (radius >= counting).all()
    # the exact fewest flips that change the ensemble's prediction: every choice of a label
    # per part, each at its exact cost
    exact_total = np.full(len(xt), 10**6)
    for choice in itertools.product(range(classes), repeat=len(idx)):
        cost = sum(exact[p][:, lab] for p, lab in enumerate(choice))
        new = np.stack([np.bincount([lab], minlength=classes) for lab in choice]).sum(0)
        changed = np.argmax(new) != pred
        exact_total = np.where(changed, np.minimum(exact_total, cost), exact_total)
    assert (radius < exact_total).all(), "a certified radius reaches a successful attack"
    gained = int((radius > counting).sum())
    tight = int((radius == exact_total - 1).sum())
    print(f"seed {seed}: white-box above counting on {gained}/{len(xt)}, "
          f"exact on {tight}/{len(xt)}")
    if seed == 4:  # parts of about 10 with a strong ridge: the white-box bound buys flips
        assert gained >= 10


def test_labels_are_recovered_from_a_kept_model():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 3)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    params = kernel_ridge_params(x, y, 4, 9, gamma=0.3, ridge=0.001)
    got = labels_from_coef(params["examples"], params["coef"], gamma=0.3, ridge=0.001)
    order = [np.flatnonzero((x == row).all(1))[0] for row in params["examples"]]
    np.testing.assert_array_equal(got, y[order])
    assert labels_from_coef(params["examples"], params["coef"], gamma=0.3, ridge=0.5) is None


def test_an_empty_part_never_turns():
    c = part_flip_costs(np.zeros((3, 2), np.float32), np.zeros((0, 2), np.float32),
                        np.zeros(0, np.int64), np.zeros(3, np.int64), num_classes=3,
                        gamma=1.0, ridge=0.1)
    assert (c[:, 0] == 0).all() and (c[:, 1:] == NEVER).all()


def test_combination_matches_counting_when_every_part_costs_one():
    """With every move priced at one flip the bound is DPA's counting certificate exactly."""
    rng = np.random.default_rng(0)
    votes = rng.integers(0, 4, (25, 60))
    costs = np.ones((25, 60, 4), np.uint16)
    costs[votes[:, :, None] == np.arange(4)] = 0
    pred, radius = ensemble_flip_radius(costs, votes, 4, max_radius=100)
    counts = np.stack([np.bincount(v, minlength=4) for v in votes.T])
    base_pred, counting = baselines.dpa_radius(counts)
    np.testing.assert_array_equal(pred, base_pred)
    np.testing.assert_array_equal(radius, counting)


def test_blocked_driver_equals_part_by_part():
    """The driver (kernels of many parts in one product, inputs in blocks) gives the
    certificate that part-by-part costs give."""
    from dpcert.certification.kernel_flips import dpa_kernel_radius, kernel_part

    x, y, xt, idx = _problem(7, 200, 4, 12, 30, 2.0)
    idx[3] = idx[3][:0]  # an empty part among them
    votes = np.stack([_votes(x[i], [y[i]], xt, 4, 0.2, 0.05)[0] if len(i) else
                      np.zeros(len(xt), np.int64) for i in idx])
    costs = np.stack([part_flip_costs(xt, x[i], y[i], v, num_classes=4, gamma=0.2, ridge=0.05)
                      for i, v in zip(idx, votes, strict=True)])
    want = ensemble_flip_radius(costs, votes, 4, max_radius=50)
    parts = [kernel_part(x[i], y[i], gamma=0.2, ridge=0.05) for i in idx]
    ticks = []
    got = dpa_kernel_radius(xt, parts, votes, num_classes=4, gamma=0.2, ridge=0.05,
                            max_radius=50, block=7, tick=ticks.append)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert sum(ticks) == 12 * 5  # every part, in each of the 5 blocks


def test_a_kernel_ridge_dpa_run_certifies_label_flips_white_box(tmp_path):
    """`dpcert run --defence dpa` over kernel ridge on the digits: its label-flip
    certificates are never below DPA's counting ones and above them on some points; the kept
    ensemble (run directory and export) gives the same certificates from its models alone;
    `predict --threat label-flip` writes them."""
    from click.testing import CliRunner

    from dpcert.certification.aggregation import baseline_certificate
    from dpcert.cli import main
    from dpcert.learning.data import load_digits
    from dpcert.workflows.ensemble import export_ensemble, load_ensemble

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", "--defence", "dpa", "--models", "20", "--learner",
                                    "kernel-ridge", "--gamma", "0.05", "--ridge", "1",
                                    "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    flips = np.loadtxt(out / "certificates_label_flip.csv", delimiter=",", skiprows=1,
                       dtype=np.int64)
    votes = np.load(out / "votes.npy")
    _, counting = baselines.dpa_radius(votes)
    assert (flips[:, 2] >= counting).all()
    assert (flips[:, 2] > counting).sum() >= 20
    assert "white-box" in (out / "report.md").read_text()
    x = load_digits().x_test
    ens = load_ensemble(out)
    np.testing.assert_array_equal(ens.certify(x, threat="label-flip").radius, flips[:, 2])
    pred = ens.predict(x[:40], keep_scores=True)
    counted = ens.certify_prediction(pred, threat="label-flip")  # no inputs: counting
    np.testing.assert_array_equal(
        counted.radius, baseline_certificate("dpa", pred.scores, spread=1, train_size=1,
                                             subsample=1, eta=0.1, max_radius=10**6,
                                             threat="label-flip").radius)
    export_ensemble(out, tmp_path / "e.safetensors")
    again = load_ensemble(tmp_path / "e.safetensors")
    np.testing.assert_array_equal(again.certify(x[:40], threat="label-flip").radius,
                                  flips[:40, 2])
    np.save(tmp_path / "new.npy", x[:40])
    res = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "new.npy"), "--output",
                                    str(tmp_path / "p.csv"), "--threat", "label-flip",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert [int(r[3]) for r in rows] == flips[:40, 2].tolist()


def test_compare_against_label_flips_uses_the_white_box_certificate(tmp_path):
    """`dpcert compare --threat label-flip` writes compare_label_flip.md, and its DPA
    kernel-ridge setting carries the same label-flip certificates as the same setting trained
    by `dpcert run --defence dpa`."""
    from click.testing import CliRunner

    from dpcert.cli import main

    (tmp_path / "c.yaml").write_text(
        "methods: [dpa]\ndpa:\n  - {models: 20, learner: kernel-ridge, gamma: 0.05, ridge: 1.0}\n")
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "c.yaml"), "--output",
                                    str(tmp_path / "cmp"), "--threat", "label-flip", "--quiet"])
    assert res.exit_code == 0, res.output
    report = (tmp_path / "cmp" / "compare_label_flip.md").read_text()
    assert "flipped training labels" in report and "white-box" in report
    res = CliRunner().invoke(main, ["run", "--defence", "dpa", "--models", "20", "--learner",
                                    "kernel-ridge", "--gamma", "0.05", "--ridge", "1",
                                    "--output", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "cmp" / "dpa_k20_learnerkernel-ridge_gamma0.05_ridge1.0"
    assert (folder / "certificates_label_flip.csv").read_text() == \
        (tmp_path / "run" / "certificates_label_flip.csv").read_text()


def test_coefficients_that_are_not_the_labels_solution_are_refused():
    """A kept model whose coefficients round to one-hot labels but are not their solution
    (altered, or fitted otherwise) gets no white-box certificate."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    params = kernel_ridge_params(x, rng.integers(0, 3, 8), 3, 8, gamma=0.3, ridge=0.1)
    assert labels_from_coef(params["examples"], params["coef"], gamma=0.3, ridge=0.1) is not None
    nudged = params["coef"].copy()
    nudged[0, 0] += 0.01
    assert labels_from_coef(params["examples"], nudged, gamma=0.3, ridge=0.1) is None


def test_labels_hidden_by_float32_at_a_tiny_ridge_are_not_guessed():
    """At a ridge of 1e-8 a part with an input repeated under two labels has coefficients
    near 1e7, whose float32 rounding hides the labels: no labels are recovered (the kept
    ensemble then certifies label flips by counting), never wrong ones."""
    from dpcert.workflows.white_box import parts_from_models

    rng = np.random.default_rng(2)
    x = np.repeat(rng.normal(size=(10, 4)).astype(np.float32), 2, axis=0)
    y = rng.integers(0, 3, 20)
    ok = kernel_ridge_params(x, y, 3, 20, gamma=0.5, ridge=1e-3)
    tiny = kernel_ridge_params(x, y, 3, 20, gamma=0.5, ridge=1e-8)
    assert labels_from_coef(tiny["examples"], tiny["coef"], gamma=0.5, ridge=1e-8) is None
    assert parts_from_models([ok, tiny], gamma=0.5, ridge=1e-8) == 0  # ok at the wrong ridge
    assert isinstance(parts_from_models([ok], gamma=0.5, ridge=1e-3), list)


def test_one_label_is_refused():
    with pytest.raises(UserError, match="two labels"):
        ensemble_flip_radius(np.zeros((2, 3, 1), np.uint16), np.zeros((2, 3), np.int64), 1,
                             max_radius=5)
