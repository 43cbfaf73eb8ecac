"""The `dpcert certify` command: outputs, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpcert.certification.mechanism import MechanismRecord

MECH_ARGS = ["--sample-rate", "0.01", "--noise-multiplier", "2", "--steps", "100"]


def run(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "dpcert.cli", "certify", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


@pytest.fixture
def votes(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.multinomial(500, [0.85, 0.1, 0.05], size=12)
    path = tmp_path / "votes.npy"
    np.save(path, v)
    np.save(tmp_path / "labels.npy", np.zeros(12, dtype=np.int64))
    return path


def test_certify_writes_csv_and_report(votes, tmp_path):
    out = tmp_path / "out.csv"
    res = run(
        votes,
        *MECH_ARGS,
        "--output",
        out,
        "--labels",
        tmp_path / "labels.npy",
        "--max-radius",
        "30",
    )
    assert res.returncode == 0, res.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "index,prediction,radius,label"
    assert len(lines) == 13
    rows = [list(map(int, line.split(","))) for line in lines[1:]]
    assert [r[0] for r in rows] == list(range(12))
    assert all(r[2] >= 1 for r in rows)
    assert "median certified radius" in res.stdout


def test_mechanism_file_gives_same_result_as_options(votes, tmp_path):
    mech = tmp_path / "mechanism.json"
    MechanismRecord(sample_rate=0.01, noise_multiplier=2.0, steps=100).save(mech)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(votes, *MECH_ARGS, "--output", a, "--max-radius", "30").returncode == 0
    assert run(votes, "--mechanism", mech, "--output", b, "--max-radius", "30").returncode == 0
    assert a.read_text() == b.read_text()
    assert a.read_text().splitlines()[0] == "index,prediction,radius"


def _bad_cases(tmp_path: Path):
    good = tmp_path / "good.npy"
    np.save(good, np.array([[90, 10], [80, 20]]))
    cases = {}

    def arr(name, a):
        p = tmp_path / name
        np.save(p, a)
        return p

    cases["wrong shape"] = [arr("w.npy", np.array([1, 2, 3])), *MECH_ARGS]
    cases["negative counts"] = [arr("n.npy", np.array([[5, -1]])), *MECH_ARGS]
    cases["float counts"] = [arr("f.npy", np.array([[5.5, 1.0]])), *MECH_ARGS]
    cases["empty"] = [arr("e.npy", np.zeros((0, 3), dtype=int)), *MECH_ARGS]
    cases["scores out of range"] = [
        arr("s1.npy", np.full((3, 2, 2), 1.5)),
        *MECH_ARGS,
        "--inference",
        "scores",
    ]
    cases["scores not summing to 1"] = [
        arr("s2.npy", np.full((3, 2, 2), 0.2)),
        *MECH_ARGS,
        "--inference",
        "scores",
    ]
    cases["scores nan"] = [
        arr("s3.npy", np.full((3, 2, 2), np.nan)),
        *MECH_ARGS,
        "--inference",
        "scores",
    ]

    def mech(q, sigma, steps="10"):
        return ["--sample-rate", q, "--noise-multiplier", sigma, "--steps", steps]

    cases["q zero"] = [good, *mech("0", "1")]
    cases["q above one"] = [good, *mech("1.5", "1")]
    cases["sigma zero"] = [good, *mech("0.1", "0")]
    cases["sigma negative"] = [good, *mech("0.1", "-1")]
    cases["eta zero"] = [good, *MECH_ARGS, "--eta", "0"]
    cases["eta one"] = [good, *MECH_ARGS, "--eta", "1"]
    cases["missing file"] = [tmp_path / "nope.npy", *MECH_ARGS]
    cases["missing steps"] = [good, "--sample-rate", "0.1", "--noise-multiplier", "1"]
    cases["pickled object array"] = [arr("o.npy", np.array([{"a": 1}], dtype=object)), *MECH_ARGS]
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY garbage")
    cases["corrupt npy"] = [junk, *MECH_ARGS]
    cases["labels wrong length"] = [good, *MECH_ARGS, "--labels", arr("l.npy", np.zeros(5, int))]
    bad_mech = tmp_path / "m.json"
    bad_mech.write_text(
        json.dumps({"sample_rate": 0.1, "noise_multiplier": 1, "steps": 5, "colour": "red"})
    )
    cases["unknown mechanism key"] = [good, "--mechanism", bad_mech]
    cases["paper pld"] = [good, *MECH_ARGS, "--group", "paper"]
    return cases


def test_bad_inputs_fail_cleanly(tmp_path):
    for name, args in _bad_cases(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}.csv"
        res = run(*args, "--output", out)
        assert res.returncode == 2, (name, res.stderr)
        err = res.stderr.strip()
        assert "Traceback" not in err, (name, err)
        assert len(err.splitlines()) <= 3, (name, err)  # click usage errors carry a usage line
        assert not out.exists(), name
        assert not list(tmp_path.glob(f".out-{name.replace(' ', '_')}*")), name


def test_run_command_errors(tmp_path):
    def run_cli(*args):
        return subprocess.run([sys.executable, "-m", "dpcert.cli", "run", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: red\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1, 2\n")
    cases = [
        [bad],
        [broken],
        [tmp_path / "missing.yaml"],
        ["--dataset", "mnist", "--output", tmp_path / "r1"],
        ["--dataset", "mnist", "--data-dir", tmp_path / "nodata", "--output", tmp_path / "r2"],
        ["--sample-rate", "3", "--output", tmp_path / "r3"],
        ["--instances", "1", "--output", tmp_path / "r4"],
    ]
    for args in cases:
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))  # nothing left behind
    res = run_cli("--batch-instances", "lots", "--output", tmp_path / "r5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "neither a positive integer nor auto" in res.stderr
    assert not (tmp_path / "r5").exists()


@pytest.mark.parametrize("args,expect", [
    (["--method", "dpa"], [3, 0]),
    (["--method", "fa", "--spread", "2"], [1, 0]),
])
def test_certify_peer_methods(tmp_path, args, expect):
    v = tmp_path / "v.npy"
    np.save(v, np.array([[10, 4, 1], [3, 5, 5]]))
    out = tmp_path / "o.csv"
    res = run(v, *args, "--output", out)
    assert res.returncode == 0, res.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == expect


def test_certify_bagging_and_its_errors(tmp_path):
    v = tmp_path / "v.npy"
    np.save(v, np.array([[990, 5, 5], [400, 390, 210]]))
    out = tmp_path / "o.csv"
    res = run(v, "--method", "bagging", "--train-size", "1000", "--subsample-size", "30",
              "--output", out)
    assert res.returncode == 0, res.stderr
    radius = [int(line.split(",")[2]) for line in out.read_text().splitlines()[1:]]
    assert radius[0] > 10 and radius[1] == -1
    out.unlink()
    for args in (["--method", "bagging"], ["--method", "fa"],
                 ["--method", "fa", "--spread", "0"]):
        res = run(v, *args, "--output", out)
        assert res.returncode == 2 and "Traceback" not in res.stderr and not out.exists()


def test_certify_fa_per_model(tmp_path):
    from dpcert.certification import baselines

    preds = np.array([[0, 1, 0, 2] * 3, [1] * 12])
    p = tmp_path / "p.npy"
    np.save(p, preds)
    out = tmp_path / "o.csv"
    res = run(p, "--method", "fa", "--per-model", "--spread", "2", "--num-classes", "3",
              "--shifts", "0,1", "--output", out)
    assert res.returncode == 0, res.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    expect = baselines.fa_certificate(preds, 3, 2, np.array([0, 1]))
    assert [int(r[1]) for r in rows] == expect[0].tolist() == [0, 1]
    assert [int(r[2]) for r in rows] == expect[1].tolist()
    out.unlink()
    for args in (["--per-model", "--spread", "2"],  # no --num-classes
                 ["--per-model", "--spread", "2", "--num-classes", "3", "--shifts", "0,x"],
                 ["--per-model", "--spread", "2", "--num-classes", "3", "--shifts", "0,99"],
                 ["--per-model", "--spread", "2", "--num-classes", "2"]):  # label 2 >= L
        res = run(p, "--method", "fa", *args, "--output", out)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert not out.exists()
    res = run(p, "--method", "dpa", "--per-model", "--output", out)
    assert res.returncode == 2 and not out.exists()


def test_certify_roe_from_per_model_scores(tmp_path):
    from dpcert.certification import baselines

    rng = np.random.default_rng(3)
    scores = rng.dirichlet([1.0, 1.0, 1.0], size=(9, 5)).astype(np.float32)  # (k, N, L)
    s = tmp_path / "s.npy"
    np.save(s, scores)
    out = tmp_path / "o.csv"
    res = run(s, "--method", "roe", "--output", out)
    assert res.returncode == 0, res.stderr
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    pred, radius = baselines.roe_certificate(scores)
    assert [int(r[1]) for r in rows] == pred.tolist()
    assert [int(r[2]) for r in rows] == radius.tolist()
    out.unlink()
    np.save(s, np.zeros((9, 5)))  # votes, not per-model scores
    res = run(s, "--method", "roe", "--output", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr and not out.exists()


def test_certify_fa_roe_from_per_model_scores(tmp_path):
    from dpcert.certification import baselines

    rng = np.random.default_rng(4)
    scores = rng.dirichlet([2.0, 1.0, 1.0], size=(12, 6)).astype(np.float32)  # (k d, N, L)
    s = tmp_path / "s.npy"
    np.save(s, scores)
    out = tmp_path / "o.csv"
    for extra, shifts in (([], None), (["--shifts", "0,5,7"], np.array([0, 5, 7]))):
        res = run(s, "--method", "fa-roe", "--spread", "3", *extra, "--output", out)
        assert res.returncode == 0, res.stderr
        rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
        pred, radius = baselines.fa_roe_certificate(scores, 3, shifts)
        assert [int(r[1]) for r in rows] == pred.tolist()
        assert [int(r[2]) for r in rows] == radius.tolist()
        out.unlink()
    for args in (["--method", "fa-roe"], ["--method", "fa-roe", "--spread", "13"],
                 ["--method", "fa-roe", "--spread", "2", "--shifts", "0,12"],
                 ["--method", "roe", "--spread", "2"]):
        res = run(s, *args, "--output", out)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (args, res.stderr)
        assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("args", [
    ["run", "--device", "cuda", "--instances", "2"],
    ["compare", "configs/compare_digits.yaml", "--device", "cuda"],
    ["attack-check", "no-such-run", "--radius", "1", "--device", "cuda"],
])
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, args):
    res = subprocess.run([sys.executable, "-m", "dpcert.cli", *args, *(
        ["--output", str(tmp_path / "o")] if args[0] != "attack-check" else [])],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("dpcert: error: --device cuda asked for, but no CUDA "
                                  "device is available")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_compare_config_asking_for_cuda_without_cuda_is_a_one_line_error(tmp_path):
    import yaml

    cfg = yaml.safe_load(open("configs/compare_digits.yaml"))
    cfg["dp"] = {**cfg.get("dp", {}), "device": "cuda"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "dpcert.cli", "compare", str(path), "--output",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no CUDA device" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_certify_resolution_and_workers(votes, tmp_path):
    """Table-building processes change nothing; a coarse table ladder only lowers radii; both
    options are DP options."""
    outs = {}
    for name, extra in (("serial", ["--workers", "1", "--resolution", "0"]),
                        ("parallel", ["--workers", "2", "--resolution", "0"]),
                        ("coarse", ["--workers", "2", "--resolution", "3"])):
        outs[name] = tmp_path / f"{name}.csv"
        res = run(votes, *MECH_ARGS, "--max-radius", "40", "--output", outs[name],
                  "--cache-dir", tmp_path / name, *extra)
        assert res.returncode == 0, res.stderr
    radius = {k: np.loadtxt(p, delimiter=",", skiprows=1, dtype=np.int64)[:, 2]
              for k, p in outs.items()}
    np.testing.assert_array_equal(radius["serial"], radius["parallel"])
    assert np.all(radius["coarse"] <= radius["serial"]) and radius["serial"].max() > 3
    res = run(votes, "--method", "dpa", "--resolution", "3", "--output", tmp_path / "d.csv")
    assert res.returncode == 2 and "--resolution" in res.stderr
