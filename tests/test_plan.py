"""`dpcert plan`: the radius a mechanism certifies at given vote shares, before training."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dpcert import MechanismRecord, certify
from dpcert.certification.planning import SHARES, epsilon_at, plan
from dpcert.errors import UserError

MECH = dict(sample_rate=0.01, steps=100, instances=300)


def test_plan_radius_is_what_certify_gives_those_votes():
    rows = plan(noise_multipliers=[2.0, 4.0], accounting="rdp", max_radius=200, **MECH)
    assert len(rows) == 2 * len(SHARES)
    for sigma in (2.0, 4.0):
        sel = [r for r in rows if r["noise_multiplier"] == sigma]
        # votes built here independently of the planner: s P on one label, the rest on another
        votes = np.zeros((len(SHARES), 10), int)
        for i, s in enumerate(SHARES):
            votes[i, 3] = int(round(s * 300))
            votes[i, 7] = 300 - votes[i, 3]
        cert = certify(votes, MechanismRecord(sample_rate=0.01, noise_multiplier=sigma,
                                              steps=100), accounting="rdp", max_radius=200,
                       cache_dir=None)
        assert [r["radius"] for r in sel] == cert.radius.tolist()
        radii = [r["radius"] for r in sel]
        assert radii == sorted(radii, reverse=True) and radii[0] > 0  # more agreement, more r
    top = {r["noise_multiplier"]: r["radius"] for r in rows if r["vote_share"] == 1.0}
    assert top[4.0] > top[2.0]  # more noise, larger radius


def test_epsilon_matches_dp_accounting_up_to_the_grid():
    dpa = pytest.importorskip("dp_accounting")
    for sigma in (1.0, 3.0):
        ev = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(
            0.001, dpa.GaussianDpEvent(sigma)), 1000)
        acc = dpa.pld.PLDAccountant()
        acc.compose(ev)
        ref = acc.get_epsilon(1e-5)
        ours = epsilon_at(MechanismRecord(sample_rate=0.001, noise_multiplier=sigma,
                                          steps=1000), 1e-5)
        assert ref - 1e-3 <= ours <= ref + 0.01, (sigma, ours, ref)  # conservative, on a grid


def test_plan_refuses_bad_values():
    with pytest.raises(UserError):
        plan(noise_multipliers=[2.0], shares=(1.2,), **MECH)
    with pytest.raises(UserError):
        plan(noise_multipliers=[-1.0], **MECH)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpcert", "plan", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_plan_json_and_errors():
    res = _cli("--sample-rate", 0.01, "--noise-multiplier", "2,4", "--steps", 100,
               "--instances", 300, "--accounting", "rdp", "--max-radius", 200, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {"noise_multiplier", "sample_rate", "steps", "instances", "vote_share",
            "radius"} <= set(rows[0])
    assert rows == plan(noise_multipliers=[2.0, 4.0], accounting="rdp", max_radius=200,
                        **MECH)
    res = _cli("--sample-rate", 0.01, "--noise-multiplier", "2,x", "--steps", 100,
               "--instances", 300)
    assert res.returncode == 2 and "comma" in res.stderr and "Traceback" not in res.stderr
    res = _cli("--sample-rate", 2, "--noise-multiplier", "2", "--steps", 100,
               "--instances", 300)
    assert res.returncode == 2 and "sample rate" in res.stderr


def test_plan_for_partition_defences_and_bagging_matches_their_certificates():
    """The planned radius is the certificate of the planned votes: DPA's floor((gap - 1)/2)
    when the runner-up wins ties, FA's count-only bound, Bagging's by its own function."""
    from click.testing import CliRunner

    from dpcert.certification import baselines
    from dpcert.certification.planning import plan_baseline
    from dpcert.cli import main

    rows = plan_baseline(defence="dpa", models=1200)
    assert [r["radius"] for r in rows] == [599, 587, 539, 479, 359]  # (2 s k - k - 1) // 2
    fa = plan_baseline(defence="fa", models=300, spread=4)
    assert [r["radius"] for r in fa] == [(2 * round(s * 1200) - 1200 - 1) // 8 for s in
                                         (1.0, 0.99, 0.95, 0.9, 0.8)]
    bag = plan_baseline(defence="bagging", models=1000, train_size=60000, subsample=100)
    votes = np.array([[0, 1000 - round(s * 1000), round(s * 1000)] + [0] * 7
                      for s in (1.0, 0.99, 0.95, 0.9, 0.8)])
    _, want = baselines.bagging_radius(votes, train_size=60000, subsample_size=100, eta=1e-3)
    assert [r["radius"] for r in bag] == want.tolist()
    res = CliRunner().invoke(main, ["plan", "--defence", "dpa", "--models", "1200"])
    assert res.exit_code == 0 and "| dpa | 599 | 587 | 539 | 479 | 359 |" in res.output
    for args, message in ((["--defence", "dpa", "--models", "9", "--steps", "3"],
                           "--steps: DP-SGD option, not of dpa"),
                          (["--defence", "bagging", "--models", "9"], "--train-size"),
                          (["--defence", "dpa"], "needs --models"),
                          (["--instances", "9"], "needs --sample-rate")):
        res = CliRunner().invoke(main, ["plan", *args])
        assert res.exit_code == 2 and message in res.output, res.output
