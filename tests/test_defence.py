"""`dpcert run --defence`: every baseline defence as a run directory that the other commands
accept."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dpcert.cli import main
from dpcert.errors import UserError
from dpcert.learning.data import load_digits
from dpcert.workflows.defence import defence_config
from dpcert.workflows.ensemble import export_ensemble, load_ensemble


def _invoke(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"])


def _certificates(path):
    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)


@pytest.mark.parametrize(("kind", "extra", "files"), [
    ("dpa", ["--models", "20"], ["certificates.csv"]),
    ("roe", ["--models", "20"], ["certificates.csv", "certificates_dpa.csv"]),
    ("fa", ["--models", "10", "--spread", "2"], ["certificates.csv"]),
    ("bagging", ["--models", "12", "--subsample", "150"], ["certificates.csv"]),
])
def test_a_baseline_defence_is_a_run_that_predict_export_and_serve_take(tmp_path, kind, extra,
                                                                        files):
    """On the embedded digits as they are (the closed-form learner takes the images
    flattened): trained, certified, its ensemble reproduces its own certificates through
    `predict` and an export, and a rerun resumes without retraining."""
    out = tmp_path / kind
    res = _invoke("run", "--defence", kind, "--learner", "kernel-ridge", *extra,
                  "--output", str(out))
    assert res.exit_code == 0, res.output
    for name in (*files, "votes.npy", "labels.npy", "report.md", "ensemble.json",
                 "certified_accuracy.png"):
        assert (out / name).exists(), name
    certs = _certificates(out / "certificates.csv")
    labels = np.load(out / "labels.npy")
    np.testing.assert_array_equal(certs[:, 3], labels)
    assert (certs[:, 1] == labels).mean() > 0.8  # kernel ridge on raw pixels learns digits
    if kind != "bagging":
        assert (certs[:, 2] >= 1).mean() > 0.5  # certificates with teeth
    x = load_digits().x_test
    np.save(tmp_path / "new.npy", x[:25])
    res = _invoke("predict", str(out), str(tmp_path / "new.npy"), "--output",
                  str(tmp_path / "p.csv"))
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert [int(r[3]) for r in rows] == certs[:25, 2].tolist()
    assert [int(r[2]) for r in rows] == certs[:25, 1].tolist()
    export_ensemble(out, tmp_path / "e.safetensors")
    again = load_ensemble(tmp_path / "e.safetensors")
    assert again.info.defence == kind
    np.testing.assert_array_equal(again.certify(x).radius, certs[:, 2])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("model_*")}
    res = _invoke("run", "--defence", kind, "--learner", "kernel-ridge", *extra,
                  "--output", str(out))
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("model_*")} == stamps
    np.testing.assert_array_equal(_certificates(out / "certificates.csv"), certs)


def test_a_run_directory_holds_one_defence_and_one_setting(tmp_path):
    out = tmp_path / "dpa"
    assert _invoke("run", "--defence", "dpa", "--models", "10", "--learner", "prototype",
                   "--output", str(out)).exit_code == 0
    for args, message in (
            (["--defence", "dpa", "--models", "11", "--learner", "prototype"], "other settings"),
            (["--instances", "2", "--steps", "2"], "holds the models of a partition defence"),
    ):
        res = _invoke("run", *args, "--output", str(out))
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    dp = tmp_path / "dp"
    assert _invoke("run", "--instances", "2", "--steps", "2", "--max-radius", "3",
                   "--output", str(dp)).exit_code == 0
    res = _invoke("run", "--defence", "dpa", "--models", "10", "--output", str(dp))
    assert res.exit_code == 2 and "holds a DP run" in res.output


@pytest.mark.parametrize(("values", "message"), [
    ({"defence": "dpa", "sample_rate": 0.1}, "sample_rate: DP-SGD option"),
    ({"defence": "bagging", "noise_multiplier": 2, "instances": 3}, "instances, noise_multiplier"),
    ({"spread": 2}, "spread: option of the partition defences"),
    ({"defence": "dpa", "spread": 2}, "spread applies to fa and fa-roe only"),
    ({"defence": "magic"}, "defence must be one of"),
    ({"defence": "dpa", "modles": 3}, "did you mean 'models'"),
])
def test_options_belong_to_the_defence_they_are_given_to(values, message):
    with pytest.raises(UserError, match=message):
        defence_config(values)


def test_a_partition_learner_reads_its_own_options_and_the_run_its_own():
    kind, cfg, bc = defence_config({"defence": "fa", "models": 4, "spread": 2, "lr": 0.5,
                                    "steps": 7, "seed": 3, "dataset": "digits"})
    assert (kind, bc.models, bc.spread, bc.lr, bc.steps) == ("fa", 4, 2, 0.5, 7)
    assert cfg.seed == 3 and cfg.lr != 0.5 and cfg.steps != 7  # the learner's, not DP-SGD's
    _, cfg, _ = defence_config({"defence": "dpa", "features": "scatter"})
    assert cfg.model == "linear"


def test_best_chooses_on_validation_and_trains_only_the_winner(tmp_path):
    """The winner is the candidate with the highest validation CA at R (recomputed here from
    the candidates' own certificates on the held-out training examples); it alone is trained
    on the whole training set, into an ordinary run directory."""
    from dpcert.workflows.best import run_best

    data = load_digits()
    grid = {"methods": ["dpa", "roe", "bagging"],
            "dpa": [{"models": 8, "learner": "prototype"},
                    {"models": 30, "learner": "kernel-ridge"}],
            "roe": [{"models": 30, "learner": "kernel-ridge"}],
            "bagging": [{"models": 10, "subsample": 100, "learner": "prototype"}]}
    text = run_best({}, radius=4, validation=300, candidates=grid, run_dir=tmp_path / "best",
                    progress=False)
    tuning = tmp_path / "best" / "tuning"
    at_r = {}
    for folder, csv in (("dpa_k8_learnerprototype", "certificates.csv"),
                        ("dpa_k30_learnerkernel-ridge", "certificates.csv"),
                        ("dpa_k30_learnerkernel-ridge", "certificates_roe.csv"),
                        ("bagging_N10_k100_learnerprototype", "certificates.csv")):
        rows = _certificates(tuning / folder / csv)
        np.testing.assert_array_equal(rows[:, 3], data.y_train[-300:])  # never the test set
        at_r[(folder, csv)] = np.mean((rows[:, 1] == rows[:, 3]) & (rows[:, 2] >= 4))
    assert len(at_r) == 4 and "| yes |" in text
    chosen = [line for line in text.splitlines() if line.endswith("| yes |")][0]
    assert float(chosen.split("|")[3]) == pytest.approx(max(at_r.values()), abs=5e-4)
    ens = load_ensemble(tmp_path / "best")  # an ordinary run directory of the winner
    assert ens.info.defence in ("dpa", "roe", "bagging")
    certs = _certificates(tmp_path / "best" / "certificates.csv")
    np.testing.assert_array_equal(certs[:, 3], data.y_test)
    assert "How this defence was chosen" in (tmp_path / "best" / "report.md").read_text()


def test_best_options_and_its_default_grid():
    from dpcert.workflows.best import default_grid, part_counts
    from dpcert.workflows.compare import CompareConfig
    from dpcert.workflows.runconfig import RunConfig

    assert part_counts(5, 1000) == [14, 28, 55] and part_counts(100, 60) == [20]
    grid = default_grid(RunConfig(), 2, 1100)
    cfg = CompareConfig.from_mapping({**grid, "dp": {}, "validation": 300, "tune_radius": 2})
    assert cfg.methods == ("dp", "dpa", "roe", "fa", "bagging")
    assert {bc.learner for kind in ("dpa", "roe", "fa", "bagging")
            for bc in cfg.settings[kind]} == {"kernel-ridge"}
    res = _invoke("run", "--radius", "3", "--output", "/nonexistent/x")
    assert res.exit_code == 2 and "radius: option of --defence best" in res.output
    res = _invoke("run", "--defence", "best", "--output", "/nonexistent/x")
    assert res.exit_code == 2 and "needs --radius" in res.output


def test_a_resumed_kernel_ridge_run_votes_exactly_as_a_fresh_one(tmp_path):
    """Example-row models are scored in aligned blocks of 50 (their company sets the rounding
    of the batched products): a model lost mid-run is fitted again with its whole block,
    and the kept ensemble, read in the same blocks, reproduces the run's votes."""
    args = ["--defence", "dpa", "--models", "60", "--learner", "kernel-ridge"]
    assert _invoke("run", *args, "--output", str(tmp_path / "a")).exit_code == 0
    fresh = _certificates(tmp_path / "a" / "certificates.csv")
    votes = np.load(tmp_path / "a" / "votes.npy")
    for suffix in (".npz", ".safetensors"):
        (tmp_path / "a" / f"model_000055{suffix}").unlink()
    kept = (tmp_path / "a" / "model_000010.npz").stat().st_mtime_ns
    assert _invoke("run", *args, "--output", str(tmp_path / "a")).exit_code == 0
    assert (tmp_path / "a" / "model_000010.npz").stat().st_mtime_ns == kept  # other block
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "votes.npy"), votes)
    np.testing.assert_array_equal(_certificates(tmp_path / "a" / "certificates.csv"), fresh)
    pred = load_ensemble(tmp_path / "a").predict(load_digits().x_test)
    np.testing.assert_array_equal(pred.votes, votes)
