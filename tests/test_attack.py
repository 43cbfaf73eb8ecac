"""`dpcert attack-check`: the attacks stay within the radius, retraining reproduces the run,
certified points survive, and the attack is real (it flips uncertified points)."""

from dataclasses import asdict

import numpy as np
import pytest
from click.testing import CliRunner

from dpcert.cli import main
from dpcert.errors import UserError
from dpcert.learning.data import load_dataset
from dpcert.workflows.attack import Job, attack_check, poison, retrain_jobs
from dpcert.workflows.run import RunConfig, run
from dpcert.workflows.runconfig import load_run_data


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


# -- partition defences: only the parts the poison reaches are retrained ---------------------


@pytest.fixture(scope="module")
def dpa_run(tmp_path_factory):
    from dpcert.workflows.defence import defence_config, run_defence

    out = tmp_path_factory.mktemp("dpa")
    kind, cfg, setting = defence_config({"defence": "dpa", "learner": "kernel-ridge",
                                         "models": 20})
    run_defence(kind, setting, cfg, out, progress=False)
    return out


def test_the_poison_reaches_the_parts_of_its_examples(dpa_run):
    from dpcert.workflows.attack import _retrain_on_target, load_defence_run, touched_models
    from dpcert.workflows.partition import hash_partition

    run = load_defence_run(dpa_run)
    data = load_run_data(run.cfg)
    label, target = int(data.y_test[3]), (int(data.y_test[3]) + 1) % 10
    parts = hash_partition(data.x_train, 20)
    flipped = poison(data, "flip", 3, label, target, 8)
    changed = np.flatnonzero(flipped.y_train != data.y_train)
    assert touched_models("dpa", run.setting, run.cfg, data, flipped).tolist() == sorted(
        set(parts[changed].tolist()))
    inserted = poison(data, "insert", 3, label, target, 8)  # 8 copies: one hash, one part
    assert touched_models("dpa", run.setting, run.cfg, data, inserted).tolist() == [
        int(hash_partition(data.x_test[3:4], 20)[0])]
    # the run's own trainer on the clean data gives back the kept models' scores
    clean = Job("control", 3, "flip", label, target, 1)  # floor(1 / 2) = 0 flips
    again = _retrain_on_target(asdict(run.cfg), asdict(run.setting), "dpa", clean,
                               list(range(20)))
    np.testing.assert_allclose(again, run.scores[:, 3], atol=1e-5)
    np.testing.assert_array_equal(again.argmax(axis=1), run.scores[:, 3].argmax(axis=1))


def test_attack_check_dpa_certified_survive_and_controls_flip(dpa_run):
    certs = np.loadtxt(dpa_run / "certificates.csv", delimiter=",", skiprows=1, dtype=int)
    assert (certs[:, 2] >= 5).sum() >= 10 and ((certs[:, 2] < 5) & (certs[:, 2] >= 0)).sum() >= 10
    lines = []
    text, outcomes = attack_check(dpa_run, 5, targets=10, controls=10, progress=False,
                                  log=lines.append)
    assert "40 attacks (40 to do)" in lines[0]
    certified = [o for o in outcomes if o.group == "certified"]
    control = [o for o in outcomes if o.group == "control"]
    assert len(certified) == 20 and len(control) == 20
    assert not any(o.flipped for o in certified), "a deterministic certificate was broken"
    # the attack is real: it turns correctly predicted points certified below the radius
    assert sum(o.flipped for o in control if o.attack == "flip") >= 1
    # a flip of 2 labels reaches at most 2 parts; 5 copies of one input land in one part
    assert all(1 <= o.retrained <= 2 for o in outcomes if o.attack == "flip")
    assert all(o.retrained == 1 for o in outcomes if o.attack == "insert")
    assert "SOUNDNESS BUG" not in text and "models retrained" in text
    # rerun: every result reused, nothing retrained
    lines.clear()
    assert attack_check(dpa_run, 5, targets=10, controls=10, progress=False,
                        log=lines.append)[0] == text
    assert "(0 to do)" in lines[0] and ": 0 model trainings" in lines[0]


def test_attack_check_reports_a_broken_certificate_loudly(tmp_path, dpa_run):
    """The check can fail: certificates claiming more than the votes give are caught."""
    import shutil

    copy = tmp_path / "overclaimed"
    shutil.copytree(dpa_run, copy, ignore=shutil.ignore_patterns("attack_check_*"))
    _, outcomes = attack_check(copy, 5, targets=0, controls=10, attacks=("flip",),
                               progress=False)
    turned = sorted({o.index for o in outcomes if o.flipped})
    assert turned
    path = copy / "certificates.csv"
    rows = path.read_text().splitlines()
    for i in range(len(rows) - 1):  # claim radius 9 for the points the attack turns only
        index, pred, _, label = rows[1 + i].split(",")
        rows[1 + i] = f"{index},{pred},{9 if i in turned else 0},{label}"
    path.write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(main, ["attack-check", str(copy), "--radius", "5", "--targets",
                                    str(len(turned)), "--controls", "0", "--attacks", "flip",
                                    "--quiet"])
    assert res.exit_code == 1, res.output
    assert "SOUNDNESS BUG" in res.output


def test_attack_check_roe(tmp_path):
    from dpcert.workflows.defence import defence_config, run_defence

    kind, cfg, setting = defence_config({"defence": "roe", "learner": "kernel-ridge",
                                         "models": 20})
    run_defence(kind, setting, cfg, tmp_path, progress=False)
    _, outcomes = attack_check(tmp_path, 5, targets=8, controls=8, attacks=("flip",),
                               progress=False)
    assert not any(o.flipped for o in outcomes if o.group == "certified")
    assert any(o.flipped for o in outcomes if o.group == "control")


def test_attack_check_label_flips_of_partitions(dpa_run):
    text, outcomes = attack_check(dpa_run, 3, targets=8, controls=8, threat="label-flip",
                                  progress=False)
    assert {o.attack for o in outcomes} == {"flip"} and "(label flips)" in text
    assert (dpa_run / "attack_check_label_flip_r3" / "report.md").read_text() == text
    # 3 flipped labels reach at most 3 parts; the white-box certificate survives them
    assert all(1 <= o.retrained <= 3 for o in outcomes)
    assert not any(o.flipped for o in outcomes if o.group == "certified")
    assert sum(o.flipped for o in outcomes if o.group == "control") >= 1


def test_attack_check_label_flips_of_a_dp_run(small_run):
    out, _ = small_run
    flips = np.loadtxt(out / "certificates_label_flip.csv", delimiter=",", skiprows=1,
                       dtype=int)
    assert (flips[:, 2] >= 1).sum() >= 2
    text, outcomes = attack_check(out, 1, targets=2, controls=0, threat="label-flip",
                                  progress=False)
    assert len(outcomes) == 2 and {o.attack for o in outcomes} == {"flip"}
    assert not any(o.flipped for o in outcomes)
    assert "relabel the 1 nearest" in text


def test_attack_check_partition_errors(tmp_path, dpa_run, small_run):
    import shutil

    with pytest.raises(UserError, match="changes labels only"):
        attack_check(dpa_run, 2, attacks=("insert",), threat="label-flip", progress=False)
    with pytest.raises(UserError, match="--data-dir is for partition"):
        attack_check(small_run[0], 2, data_dir="somewhere", progress=False)
    copy = tmp_path / "missing"
    shutil.copytree(dpa_run, copy, ignore=shutil.ignore_patterns("attack_check_*"))
    (copy / "model_000007.npz").unlink()
    res = CliRunner().invoke(main, ["attack-check", str(copy), "--radius", "2"])
    assert res.exit_code == 2 and "model 7 is missing" in res.output
    res = CliRunner().invoke(main, ["attack-check", str(dpa_run), "--radius", "2",
                                    "--threat", "label-flip", "--attacks", "insert"])
    assert res.exit_code == 2 and "changes labels only" in res.output
