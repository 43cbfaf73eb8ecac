"""Conflicting arguments are errors, suspicious inputs warn with a reason, help states
meaning and default, and config mistakes name the key (one line, exit status 2)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from dpcert import AccountingSpec, MechanismRecord, certify
from dpcert.certification.bounds import vote_bounds
from dpcert.errors import InputWarning, UserError

MECH = MechanismRecord(sample_rate=0.05, noise_multiplier=3.0, steps=300)


def _votes(n=12, p=40, labels=10, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(p, np.r_[0.8, np.full(labels - 1, 0.2 / (labels - 1))])
                     for _ in range(n)])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpcert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_certify_refuses_keywords_that_contradict_the_spec():
    v = _votes()
    with pytest.raises(UserError, match=r"accounting='rdp' \(spec: 'pld'\)"):
        certify(v, MECH, accounting="rdp", spec=AccountingSpec(max_radius=5))
    with pytest.raises(UserError, match="max_radius=7"):
        certify(v, MECH, max_radius=7, spec=AccountingSpec(max_radius=5))
    # agreeing keywords, or the spec alone, are fine and give the same certificates
    a = certify(v, MECH, accounting="pld", spec=AccountingSpec(max_radius=5), cache_dir=None)
    b = certify(v, MECH, spec=AccountingSpec(max_radius=5), cache_dir=None)
    c = certify(v, MECH, max_radius=5, cache_dir=None)
    np.testing.assert_array_equal(a.radius, b.radius)
    np.testing.assert_array_equal(a.radius, c.radius)


def test_transposed_and_uneven_votes_warn_with_a_reason():
    v = _votes(n=30)
    with pytest.warns(InputWarning, match="look transposed"):
        vote_bounds(v.T, 0.01)
    uneven = v.copy()
    uneven[0, 0] += 5
    with pytest.warns(InputWarning, match="different vote totals"):
        vote_bounds(uneven, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vote_bounds(v, 0.01)  # proper votes: silent


def test_cli_prints_warnings_as_one_line(tmp_path):
    np.save(tmp_path / "v.npy", _votes(n=30).T)
    res = _cli("certify", tmp_path / "v.npy", "--sample-rate", "0.05", "--noise-multiplier",
               "3", "--steps", "300", "--max-radius", "5", "--output", tmp_path / "o.csv")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("dpcert: warning:")]
    assert len(lines) == 1 and "transposed" in lines[0] and "Traceback" not in res.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "dpa", "--noise-multiplier", "2"],
     "--method dpa does not use the DP options --noise-multiplier"),
    (["--method", "bagging", "--train-size", "100", "--subsample-size", "10",
      "--accounting", "rdp"], "does not use the DP options --accounting"),
    (["--sample-rate", "0.05", "--noise-multiplier", "3", "--steps", "300",
      "--train-size", "100"], "--train-size applies to --method bagging only, not dp"),
    (["--method", "dpa", "--spread", "2"],
     "--spread applies to --method fa / fa-roe only, not dpa"),
])
def test_options_the_method_ignores_are_errors(tmp_path, args, message):
    np.save(tmp_path / "v.npy", _votes())
    res = _cli("certify", tmp_path / "v.npy", *args, "--output", tmp_path / "o.csv")
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "o.csv").exists()


def test_config_typos_name_the_closest_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("methods: [dpa]\ndp:\n  instances: 4\ndpa:\n  modles: 10\n")
    res = _cli("compare", cfg, "--output", tmp_path / "out")
    assert res.returncode == 2 and "'modles' (did you mean 'models'?)" in res.stderr
    run_cfg = tmp_path / "r.yaml"
    run_cfg.write_text("noise_multiplyer: 2\n")
    res = _cli("run", run_cfg, "--output", tmp_path / "run")
    assert res.returncode == 2 and "did you mean 'noise_multiplier'" in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_yaml_errors_give_the_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("instances: 4\nsteps: [1, 2\nseed: 3\n")
    res = _cli("run", cfg, "--output", tmp_path / "run")
    assert res.returncode == 2 and "is not valid YAML at line" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1


def test_every_run_option_states_meaning_and_default():
    res = _cli("run", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    from dpcert.workflows.runconfig import RunConfig

    defaults = RunConfig()  # the help must state the defaults the code uses
    for name in ("sample_rate", "noise_multiplier", "steps", "clip_norm", "lr", "eta",
                 "max_radius", "instances", "dataset", "model", "device"):
        option = "--" + name.replace("_", "-")
        after = text.split(option + " ", 1)[1].split(" --", 1)[0]
        value = getattr(defaults, name)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"[default: {shown}" in after, (option, after)
    assert "0.5" in text.split("--bias-feature", 1)[1].split(" --", 1)[0]
    res = _cli("compare", "--help")
    for name in ("dpa", "fa", "roe", "bagging", "baseline-DP"):
        assert name in res.stdout
