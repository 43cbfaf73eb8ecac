"""Certificates against label flips: an attacker who flips up to r training labels and
leaves every input alone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpcert.certification import baselines
from dpcert.certification.aggregation import baseline_certificate, dp_label_flips
from dpcert.certification.certify import Certificates
from dpcert.errors import UserError


def _dpa_predictions(x, y, xt, k, classes):
    """DPA over nearest-class-mean parts, retrained from scratch: (predictions, scores)."""
    import torch

    from dpcert.learning.inference import score_instances, stack_params
    from dpcert.workflows.partition import _fit_free, training_indices
    from dpcert.workflows.setting import BaselineConfig

    bc = BaselineConfig(models=k, learner="prototype")
    params = [_fit_free(bc, x, y, classes, idx) for idx in training_indices("dpa", bc, x)]
    stacked = {n: torch.from_numpy(v) for n, v in stack_params(params).items()}
    scores = score_instances("linear", stacked, torch.from_numpy(xt), in_channels=x.shape[1],
                             num_classes=classes)
    return baselines.dpa_radius(np.stack([np.bincount(s, minlength=classes)
                                          for s in scores.argmax(2).T]))[0], scores


def test_dpa_against_label_flips_is_sound_by_exhaustive_search():
    """Every set of up to r flips of a small training set, every new labelling of it, the
    touched parts retrained: no prediction certified at r flips changes. And the flips
    certificate is never below the counting one (they are equal for DPA)."""
    rng = np.random.default_rng(4)
    classes, k = 3, 5
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    y = rng.integers(0, classes, 14)
    x = (centres[y] + rng.normal(size=(14, 2))).astype(np.float32)
    xt = (centres[rng.integers(0, classes, 25)] + rng.normal(size=(25, 2))).astype(np.float32)
    pred, scores = _dpa_predictions(x, y, xt, k, classes)
    cert = baseline_certificate("dpa", scores, spread=1, train_size=14, subsample=1, eta=0.1,
                                max_radius=10, threat="label-flip")
    counting = baseline_certificate("dpa", scores, spread=1, train_size=14, subsample=1,
                                    eta=0.1, max_radius=10)
    np.testing.assert_array_equal(cert.prediction, pred)
    assert (cert.radius >= counting.radius).all()
    top = int(cert.radius.max())
    assert top >= 1, "nothing certified: the check would be empty"
    checked = 0
    for r in range(1, top + 1):
        for chosen in itertools.combinations(range(14), r):
            others = [[c for c in range(classes) if c != y[i]] for i in chosen]
            for labels in itertools.product(*others):
                y2 = y.copy()
                y2[list(chosen)] = labels
                pred2, _ = _dpa_predictions(x, y2, xt, k, classes)
                safe = cert.radius >= r
                assert (pred2[safe] == pred[safe]).all(), (chosen, labels)
                checked += 1
    assert checked > 100


def test_bagging_flip_threshold_is_the_exact_chance_a_bag_sees_a_flip():
    """Enumerating every bag of k = 3 positions out of n = 5: a bag misses r given
    positions with probability ((n - r)/n)^k, so the two vote distributions differ by at most
    1 - that; and flips are never certified less than insertions and deletions."""
    n, k = 5, 3
    bags = list(itertools.product(range(n), repeat=k))
    t = baselines.bagging_flip_threshold(n, k, n)
    for r in range(n + 1):
        missed = sum(not set(b) & set(range(r)) for b in bags) / len(bags)
        assert t[r] == pytest.approx(2 * (1 - missed))
    assert (t <= baselines.bagging_threshold(n, k, n) + 1e-12).all()
    votes = np.array([[90, 10, 0], [60, 40, 0], [100, 0, 0]])
    flips = baselines.bagging_radius(votes, train_size=1000, subsample_size=50, eta=1e-3,
                                     label_flips=True)[1]
    changes = baselines.bagging_radius(votes, train_size=1000, subsample_size=50, eta=1e-3)[1]
    assert (flips >= changes).all()


def test_a_dp_certificate_counts_a_flip_as_a_deletion_and_an_insertion():
    cert = Certificates(np.array([1, 2, 0, 4]), np.array([-1, 0, 5, 8]), np.zeros(4),
                        np.zeros(4))
    np.testing.assert_array_equal(dp_label_flips(cert).radius, [-1, 0, 2, 4])
    with pytest.raises(UserError, match="threat must be one of"):
        baseline_certificate("dpa", np.zeros((3, 2, 2)), spread=1, train_size=3, subsample=1,
                             eta=0.1, max_radius=3, threat="flips")


def test_runs_write_and_ensembles_give_label_flip_certificates(tmp_path):
    from click.testing import CliRunner

    from dpcert.cli import main
    from dpcert.learning.data import load_digits
    from dpcert.workflows.ensemble import load_ensemble
    from dpcert.workflows.run import RunConfig, run

    def rows(path):
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)

    run(RunConfig(instances=4, steps=5, workers=1, max_radius=5), tmp_path / "dp",
        progress=False)
    dp, flips = rows(tmp_path / "dp" / "certificates.csv"), \
        rows(tmp_path / "dp" / "certificates_label_flip.csv")
    np.testing.assert_array_equal(flips[:, 2], np.where(dp[:, 2] >= 0, dp[:, 2] // 2, -1))
    x = load_digits().x_test
    assert (load_ensemble(tmp_path / "dp").certify(x, threat="label-flip").radius
            == flips[:, 2]).all()
    # prototypes: counted flip for flip (kernel ridge's white-box: tests/test_kernel_flips.py)
    res = CliRunner().invoke(main, ["run", "--defence", "dpa", "--models", "20", "--learner",
                                    "prototype", "--output", str(tmp_path / "dpa"),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    part = rows(tmp_path / "dpa" / "certificates_label_flip.csv")
    np.testing.assert_array_equal(part, rows(tmp_path / "dpa" / "certificates.csv"))
    np.save(tmp_path / "x.npy", x[:15])
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "dpa"), str(tmp_path / "x.npy"),
                                    "--threat", "label-flip", "--output",
                                    str(tmp_path / "p.csv"), "--quiet"])
    assert res.exit_code == 0, res.output
    got = [int(line.split(",")[3]) for line in
           (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert got == part[:15, 2].tolist()
    ens = load_ensemble(tmp_path / "dpa")  # one prediction, both threats
    pred = ens.predict(x[:15], keep_scores=True)
    assert (ens.certify_prediction(pred, threat="label-flip").radius == part[:15, 2]).all()


def test_certify_command_counts_label_flips(tmp_path):
    """`dpcert certify --threat label-flip`: the DP certificate halved (a flip is a group of
    2), DPA's unchanged, Bagging's from its own flip threshold; the report says what the
    radius counts."""
    from click.testing import CliRunner

    from dpcert.cli import main

    rng = np.random.default_rng(0)
    votes = np.zeros((30, 3), np.int64)
    votes[:, 0] = rng.integers(60, 100, 30)
    votes[:, 1] = 100 - votes[:, 0]
    np.save(tmp_path / "v.npy", votes)
    np.save(tmp_path / "y.npy", np.zeros(30, np.int64))

    def radii(*args):
        out = tmp_path / "c.csv"
        res = CliRunner().invoke(main, ["certify", str(tmp_path / "v.npy"), "--output", str(out),
                                        "--labels", str(tmp_path / "y.npy"), "--quiet", *args])
        assert res.exit_code == 0, res.output
        return np.loadtxt(out, delimiter=",", skiprows=1, dtype=np.int64)[:, 2], res.output

    dp = ["--sample-rate", "0.01", "--noise-multiplier", "2", "--steps", "100",
          "--max-radius", "20"]
    ins, _ = radii(*dp)
    flips, text = radii(*dp, "--threat", "label-flip")
    np.testing.assert_array_equal(flips, np.where(ins >= 0, ins // 2, ins))
    assert "flipped training labels" in text and ins.max() >= 2
    dpa, _ = radii("--method", "dpa")
    np.testing.assert_array_equal(radii("--method", "dpa", "--threat", "label-flip")[0], dpa)
    bag = ["--method", "bagging", "--train-size", "1000", "--subsample-size", "20"]
    want = baselines.bagging_radius(votes, train_size=1000, subsample_size=20, eta=1e-3,
                                    max_radius=1000, label_flips=True)[1]
    np.testing.assert_array_equal(radii(*bag, "--threat", "label-flip")[0], want)
