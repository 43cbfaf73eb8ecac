"""The run store and the end-to-end job on digits."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dpcert.errors import UserError
from dpcert.workflows.run import RunConfig, aggregate, read_unit, run

SMALL = dict(instances=4, steps=15, sample_rate=0.05, noise_multiplier=2.0, workers=1)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = RunConfig(**SMALL)
    a = tmp_path / "a"
    run(cfg, a, progress=False)
    votes, scores = np.load(a / "votes.npy"), np.load(a / "scores.npy")
    certs = (a / "certificates.csv").read_text()
    # a crash: one instance never written, another truncated mid-write
    (a / "instances" / "inst_000001.npz").unlink()
    damaged = a / "instances" / "inst_000002.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert read_unit(damaged) is None
    run(cfg, a, progress=False)
    np.testing.assert_array_equal(np.load(a / "votes.npy"), votes)
    np.testing.assert_array_equal(np.load(a / "scores.npy"), scores)
    assert (a / "certificates.csv").read_text() == certs
    # the same command in a fresh directory gives the same result
    b = tmp_path / "b"
    run(cfg, b, progress=False)
    np.testing.assert_array_equal(np.load(b / "scores.npy"), scores)
    # other worker counts change torch's thread count, hence float rounding only
    w = tmp_path / "w"
    run(RunConfig(**{**SMALL, "workers": 2}), w, progress=False)
    np.testing.assert_allclose(np.load(w / "scores.npy"), scores, atol=1e-5)
    # batched training gives the same instances up to float rounding
    c = tmp_path / "c"
    run(RunConfig(**{**SMALL, "batch_instances": 3}), c, progress=False)
    np.testing.assert_allclose(np.load(c / "scores.npy"), scores, atol=1e-4)
    np.testing.assert_array_equal(np.load(c / "votes.npy"), votes)
    d = tmp_path / "d"
    run(RunConfig(**{**SMALL, "batch_instances": "auto"}), d, progress=False)
    np.testing.assert_allclose(np.load(d / "scores.npy"), scores, atol=1e-4)


@pytest.mark.parametrize("value", ["many", 0, -2, 1.5])
def test_bad_batch_instances_is_a_user_error(value):
    with pytest.raises(UserError, match="batch_instances"):
        RunConfig(**{**SMALL, "batch_instances": value})


def test_checksum_catches_silent_corruption(tmp_path):
    cfg = RunConfig(**SMALL)
    run(cfg, tmp_path, progress=False)
    unit = tmp_path / "instances" / "inst_000000.npz"
    with np.load(unit) as z:
        scores, digest = z["scores"].copy(), z["sha256"]
    scores[0, 0] += 0.25
    np.savez(unit, scores=scores, sha256=digest)
    assert read_unit(unit) is None
    with pytest.raises(UserError, match="instance 0"):
        aggregate(cfg, tmp_path)


def test_aggregate_streams_units_into_scores_and_votes(tmp_path):
    from dpcert.workflows.run import tally_votes, write_unit

    cfg = RunConfig(**{**SMALL, "instances": 5})
    rng = np.random.default_rng(3)
    units = rng.dirichlet(np.ones(4), size=(5, 7))  # float64, as the engines write them
    (tmp_path / "instances").mkdir()
    for i, u in enumerate(units):
        write_unit(tmp_path / "instances" / f"inst_{i:06d}.npz", u)
    votes, scores = aggregate(cfg, tmp_path)
    np.testing.assert_array_equal(scores, units.astype(np.float32))
    np.testing.assert_array_equal(votes, tally_votes(units.astype(np.float32)))
    np.testing.assert_array_equal(np.load(tmp_path / "scores.npy"), scores)
    np.testing.assert_array_equal(np.load(tmp_path / "votes.npy"), votes)
    assert not list(tmp_path.glob(".*.tmp"))
    write_unit(tmp_path / "instances" / "inst_000003.npz", units[3][:, :3])
    with pytest.raises(UserError, match="instance 3 has scores of shape"):
        aggregate(cfg, tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_changed_training_parameter_is_refused(tmp_path):
    run(RunConfig(**SMALL), tmp_path, progress=False)
    with pytest.raises(UserError, match="steps"):
        run(RunConfig(**{**SMALL, "steps": 16}), tmp_path, progress=False)
    with pytest.raises(UserError, match="augment_copies"):
        run(RunConfig(**{**SMALL, "augment_shift": 1, "augment_copies": 2}), tmp_path,
            progress=False)
    # certification-only settings may change
    run(RunConfig(**{**SMALL, "eta": 0.01}), tmp_path, progress=False)
    # a run stored before a training field existed had that field's default: it resumes
    import json

    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["augment_shift"], stored["augment_copies"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    run(RunConfig(**{**SMALL, "eta": 0.02}), tmp_path, progress=False)


def test_augmented_run_trains_and_certifies(tmp_path):
    cfg = RunConfig(**{**SMALL, "augment_shift": 1, "augment_copies": 2})
    text = run(cfg, tmp_path / "aug", progress=False)
    assert "translations by up to 1 px (2 per example" in text
    aug_votes = np.load(tmp_path / "aug" / "votes.npy")
    run(RunConfig(**SMALL), tmp_path / "plain", progress=False)
    assert aug_votes.sum() == np.load(tmp_path / "plain" / "votes.npy").sum()
    # the mechanism (what certification reads) is the same; the instances are not
    assert (json.loads((tmp_path / "aug" / "mechanism.json").read_text())
            == json.loads((tmp_path / "plain" / "mechanism.json").read_text()))
    assert not np.array_equal(aug_votes, np.load(tmp_path / "plain" / "votes.npy"))


def test_run_layout_and_certify_reproduces_csv(tmp_path):
    run(RunConfig(**SMALL), tmp_path, progress=False)
    for name in ("config.json", "mechanism.json", "votes.npy", "scores.npy", "labels.npy",
                 "certificates.csv", "report.md", "certified_accuracy.png"):
        assert (tmp_path / name).exists(), name
    votes = np.load(tmp_path / "votes.npy")
    assert votes.dtype == np.int64 and votes.sum(axis=1).tolist() == [4] * len(votes)
    assert np.load(tmp_path / "scores.npy").shape == (4, *votes.shape)
    out = tmp_path / "again.csv"
    res = subprocess.run([sys.executable, "-m", "dpcert.cli", "certify", tmp_path / "votes.npy",
                          "--mechanism", tmp_path / "mechanism.json", "--labels",
                          tmp_path / "labels.npy", "--output", out, "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.read_text() == (tmp_path / "certificates.csv").read_text()


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config keys"):
        RunConfig.from_mapping({"colour": "red"})
    with pytest.raises(UserError):
        RunConfig.from_mapping({"sample_rate": 2.0})
    with pytest.raises(UserError):
        RunConfig.from_mapping({"instances": 1})


@pytest.mark.slow  # the docs tests train the demo run end to end and check its table
def test_end_to_end_digits_certifies(tmp_path):
    cfg = RunConfig(instances=100, steps=300, sample_rate=0.05, noise_multiplier=2.0, eta=0.01)
    run(cfg, tmp_path, progress=False)
    labels = np.load(tmp_path / "labels.npy")
    votes = np.load(tmp_path / "votes.npy")
    radius = np.loadtxt(tmp_path / "certificates.csv", delimiter=",", skiprows=1, dtype=int)
    correct = votes.argmax(axis=1) == labels
    ca0 = np.mean(correct & (radius[:, 2] >= 0))
    assert ca0 >= correct.mean() - 0.08  # within a few points of the clean accuracy
    assert np.any(radius[:, 2] >= 1)


LINEAR = dict(instances=5, steps=30, sample_rate=0.05, noise_multiplier=2.0, workers=1,
              model="linear", features="scatter", optimizer="sgd", lr=0.5)


def test_linear_on_scatter_features_is_one_instance_whatever_the_batching(tmp_path):
    """Instances of the batched linear engine depend on (seed, index) only: batch sizes 1, 2
    and 5, two worker processes and a resume give the same votes and scores up to float
    rounding (batched products of other shapes round differently)."""
    a = tmp_path / "a"
    run(RunConfig(**{**LINEAR, "batch_instances": 2}), a, progress=False)
    scores, votes = np.load(a / "scores.npy"), np.load(a / "votes.npy")
    assert scores.shape == (5, 359, 10)
    assert np.mean(scores.argmax(2) == np.load(a / "labels.npy")[None]) > 0.5  # it learns
    for name, extra in (("one", {"batch_instances": 1}), ("all", {"batch_instances": 5}),
                        ("procs", {"batch_instances": 2, "workers": 2})):
        run(RunConfig(**{**LINEAR, **extra}), tmp_path / name, progress=False)
        np.testing.assert_allclose(np.load(tmp_path / name / "scores.npy"), scores, atol=1e-4)
        np.testing.assert_array_equal(np.load(tmp_path / name / "votes.npy"), votes)
    (a / "instances" / "inst_000003.npz").unlink()  # retrained alone now, not beside 2
    run(RunConfig(**{**LINEAR, "batch_instances": 2}), a, progress=False)
    np.testing.assert_allclose(np.load(a / "scores.npy"), scores, atol=1e-4)
    np.testing.assert_array_equal(np.load(a / "votes.npy"), votes)


def test_bias_feature_reaches_the_engine_and_guards_the_run_directory(tmp_path):
    import torch

    from dpcert.learning import linear
    from dpcert.learning.data import load_dataset_cached

    cfg = RunConfig(**{**LINEAR, "instances": 2, "bias_feature": 0.5})
    run(cfg, tmp_path, progress=False)
    data = load_dataset_cached("digits", None, "scatter")
    lcfg = linear.LinearDpSgd(cfg.sample_rate, cfg.noise_multiplier, cfg.steps, cfg.clip_norm,
                              cfg.lr, bias_feature=0.5, declared_size=len(data.y_train))
    w, b = linear.train_linear(lcfg, torch.tensor(data.x_train), torch.tensor(data.y_train),
                               10, seed=0, instances=[1])
    want = linear.predict_linear(w, b, torch.tensor(data.x_test))[0]
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy")[1], want, atol=1e-4)
    with pytest.raises(UserError, match="bias_feature"):
        run(RunConfig(**{**LINEAR, "instances": 2}), tmp_path, progress=False)


@pytest.mark.parametrize("bad", [
    {"model": "linear"},  # no features
    {"features": "scatter"},  # a conv model on feature vectors
    {"model": "linear", "features": "scatter", "optimizer": "adam"},
    {"model": "linear", "features": "pixels", "optimizer": "sgd"},
    {"averaging": "tail"},  # averaging is for the linear model
    {"model": "linear", "features": "scatter", "optimizer": "sgd", "averaging": "ema"},
    {"augment_copies": 4},  # copies of nothing: no shift
    {"augment_shift": -1},
    {"augment_shift": 2, "augment_copies": 0},
    {"augment_shift": 1.5},
    {"model": "linear", "features": "scatter", "optimizer": "sgd", "augment_shift": 2},
    {"bias_feature": 0.5},  # the bias feature is an option of the linear model
    {"model": "linear", "features": "scatter", "optimizer": "sgd", "bias_feature": -1.0},
    {"model": "linear", "features": "scatter", "optimizer": "sgd", "bias_feature": "half"},
])
def test_learner_options_are_validated(bad):
    with pytest.raises(UserError):
        RunConfig(**bad)
