"""`dpcert attack-check`: the attacks stay within the radius, retraining reproduces the run,
certified points survive, and the attack is real (it flips uncertified points)."""

import numpy as np
import pytest
from click.testing import CliRunner

from dpcert.cli import main
from dpcert.errors import UserError
from dpcert.learning.data import load_dataset
from dpcert.workflows.attack import Job, attack_check, poison, retrain_jobs
from dpcert.workflows.run import RunConfig, run


def test_poison_stays_within_the_radius():
    data = load_dataset("digits")
    label, target = int(data.y_test[0]), (int(data.y_test[0]) + 1) % 10
    for r in (1, 2, 7):
        flipped = poison(data, "flip", 0, label, target, r)
        changed = np.flatnonzero(flipped.y_train != data.y_train)
        assert len(changed) == r // 2  # each relabelled example = 1 deletion + 1 insertion
        assert (data.y_train[changed] == label).all() and (flipped.y_train[changed] == target).all()
        inserted = poison(data, "insert", 0, label, target, r)
        assert len(inserted.y_train) == len(data.y_train) + r
        np.testing.assert_array_equal(inserted.x_train[: len(data.y_train)], data.x_train)
        assert (inserted.x_train[-r:] == data.x_test[0]).all()
        assert (inserted.y_train[-r:] == target).all()
    # the flipped examples are the nearest ones of the predicted class
    flipped = poison(data, "flip", 0, label, target, 6)
    same = np.flatnonzero(data.y_train == label)
    d = ((data.x_train[same] - data.x_test[0]) ** 2).reshape(len(same), -1).sum(1)
    nearest = set(same[np.argsort(d)[:3]].tolist())
    assert set(np.flatnonzero(flipped.y_train != data.y_train).tolist()) == nearest


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # the softmax regression on ScatterNet features: the attack machinery is model-agnostic,
    # and this model retrains its 30 instances in well under a second
    cfg = RunConfig(model="linear", features="scatter", optimizer="sgd", lr=0.5, instances=30,
                    steps=150, sample_rate=0.05, noise_multiplier=3.0, eta=0.05,
                    max_radius=20, workers=2)
    run(cfg, out, progress=False)
    return out, cfg


def test_retraining_without_poison_reproduces_the_run(small_run):
    out, cfg = small_run
    scores = np.load(out / "scores.npy")
    got = {}
    job = Job("control", 5, "flip", 0, 1, 1)  # radius 1: floor(1/2) = 0 flips, clean data
    retrain_jobs(cfg, [job], 2, lambda j, s: got.setdefault(j, s))  # as the run: 2 x 1 thread
    # the same instances; predicting one point instead of a batch only changes rounding
    np.testing.assert_allclose(got[job], scores[:, 5], atol=1e-5)
    np.testing.assert_array_equal(got[job].argmax(axis=1), scores[:, 5].argmax(axis=1))


def test_attack_check_certified_survive_and_controls_flip(small_run):
    out, _ = small_run
    certs = np.loadtxt(out / "certificates.csv", delimiter=",", skiprows=1, dtype=int)
    r_cert = 2
    assert (certs[:, 2] >= r_cert).sum() >= 2, "the fixture should certify some points at r=2"
    _, outcomes = attack_check(out, r_cert, targets=2, controls=0, progress=False)
    assert len(outcomes) == 4 and all(o.group == "certified" for o in outcomes)
    assert not any(o.flipped for o in outcomes)
    # a large attack on uncertified points is a real attack: it changes predictions
    text, outcomes = attack_check(out, 150, targets=0, controls=3, attacks=("insert",),
                                  progress=False)
    control = [o for o in outcomes if o.group == "control"]
    assert len(control) == 3 and sum(o.flipped for o in control) >= 1
    assert (out / "attack_check_r150" / "report.md").read_text() == text
    # rerun: every retrained ensemble is reused
    again, _ = attack_check(out, 150, targets=0, controls=3, attacks=("insert",),
                            progress=False)
    assert again == text
    # an interrupted retrain: its ensemble file never written, half its instances missing;
    # the rerun says its plan and trains only the missing instances
    folder = out / "attack_check_r150"
    job_file = sorted(folder.glob("insert_*.npz"))[0]
    job_file.unlink()
    instances = sorted((folder / job_file.stem).glob("inst_*.npz"))
    assert len(instances) == 30
    for f in instances[::2]:
        f.unlink()
    kept = {f: f.stat().st_mtime_ns for f in instances[1::2]}
    lines = []
    resumed, _ = attack_check(out, 150, targets=0, controls=3, attacks=("insert",),
                              progress=False, log=lines.append)
    assert resumed == text
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert lines and "3 attacks (1 to do) x 30 instances = 30 instance trainings" in lines[0]
    assert "min" in lines[0] and "finished instances are kept" in lines[0]


def test_attack_check_errors(tmp_path, small_run):
    out, _ = small_run
    with pytest.raises(UserError):
        attack_check(tmp_path, 2, progress=False)
    with pytest.raises(UserError):
        attack_check(out, 0, progress=False)
    with pytest.raises(UserError):
        attack_check(out, 2, attacks=("magic",), progress=False)
    res = CliRunner().invoke(main, ["attack-check", str(tmp_path), "--radius", "2"])
    assert res.exit_code == 2 and "not a finished dpcert run" in res.output


def test_attack_check_reads_scores_as_a_memory_map_and_checks_their_shape(tmp_path, small_run):
    import shutil

    from dpcert.workflows.attack import _load_run

    out, _ = small_run
    _, _, scores, labels, _ = _load_run(out)
    assert isinstance(scores, np.memmap) and scores.shape[1] == len(labels)
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("attack_check_*"))
    np.save(copy / "scores.npy", np.load(copy / "scores.npy")[:, :-1])
    with pytest.raises(UserError, match="disagree"):
        attack_check(copy, 2, progress=False)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_attack_check_of_a_gpu_run_on_a_cpu_machine_says_what_to_do(tmp_path, small_run):
    import json
    import shutil

    out, _ = small_run
    copy = tmp_path / "gpu-run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("attack_check_*"))
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "device": "cuda"}))
    with pytest.raises(UserError, match="--device cpu"):
        attack_check(copy, 2, progress=False)
    assert not (copy / "attack_check_r2").exists()
