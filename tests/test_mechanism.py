import json

import pytest

from dpcert.certification.mechanism import MechanismRecord
from dpcert.errors import UserError


def test_roundtrip(tmp_path):
    rec = MechanismRecord(
        sample_rate=0.001,
        noise_multiplier=2.0,
        steps=1000,
        clip_norm=1.3,
        dataset_size=60000,
        subset_size=10000,
    )
    path = tmp_path / "mechanism.json"
    rec.save(path)
    data = json.loads(path.read_text())
    assert {
        "sample_rate",
        "noise_multiplier",
        "steps",
        "clip_norm",
        "dataset_size",
        "sampling",
    } <= set(data)
    assert MechanismRecord.load(path) == rec
    assert rec.uses_subsets


def test_accounting_key_ignores_clip_norm_only():
    a = MechanismRecord(sample_rate=0.01, noise_multiplier=1.0, steps=10, clip_norm=1.0)
    b = MechanismRecord(sample_rate=0.01, noise_multiplier=1.0, steps=10, clip_norm=5.0)
    c = MechanismRecord(sample_rate=0.01, noise_multiplier=1.0, steps=11)
    assert a.accounting_key() == b.accounting_key() != c.accounting_key()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sample_rate": 0.0, "noise_multiplier": 1.0, "steps": 1},
        {"sample_rate": 1.1, "noise_multiplier": 1.0, "steps": 1},
        {"sample_rate": float("nan"), "noise_multiplier": 1.0, "steps": 1},
        {"sample_rate": 0.1, "noise_multiplier": 0.0, "steps": 1},
        {"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 0},
        {"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 2.5},
        {"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1, "sampling": "shuffle"},
        {"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1, "subset_size": 10},
        {
            "sample_rate": 0.1,
            "noise_multiplier": 1.0,
            "steps": 1,
            "dataset_size": 5,
            "subset_size": 10,
        },
    ],
)
def test_invalid_records(kwargs):
    with pytest.raises(UserError):
        MechanismRecord(**kwargs)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        MechanismRecord.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        MechanismRecord.load(bad)
    bad.write_text(json.dumps({"sample_rate": 0.1}))
    with pytest.raises(UserError, match="lacks"):
        MechanismRecord.load(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(UserError):
        MechanismRecord.load(bad)


def test_the_record_of_a_training_is_read_off_what_it_runs():
    """A run's mechanism record is never a second construction from the numbers its trainer
    gets: only MechanismRecord.of (from the trainer's configuration), the command line's
    user-given record, the planner's hypothetical mechanisms and the accountant's derived
    inner mechanism construct one."""
    import re
    from pathlib import Path

    import dpcert

    src = Path(dpcert.__file__).parent
    built = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                   if re.search(r"\bMechanismRecord\(", p.read_text()))
    assert built == ["certification/accounting.py", "certification/planning.py", "cli.py"]
    from dpcert.learning.stacked import DpSgd

    cfg = DpSgd(0.01, 2.0, 30, 1.5, 0.1, subset_size=40)
    rec = MechanismRecord.of(cfg, 100)
    assert (rec.sample_rate, rec.noise_multiplier, rec.steps, rec.clip_norm, rec.subset_size,
            rec.dataset_size) == (0.01, 2.0, 30, 1.5, 40, 100)


def test_the_engines_read_their_privacy_settings_off_the_record():
    """A run's engine configuration is built from its mechanism record (never from the same
    numbers a second time)."""
    from dpcert.learning.linear import LinearDpSgd
    from dpcert.learning.stacked import DpSgd
    from dpcert.workflows.dispatch import run_record, trainer_config
    from dpcert.workflows.runconfig import RunConfig, load_run_data

    rec = MechanismRecord(sample_rate=0.02, noise_multiplier=3.0, steps=7, clip_norm=0.5,
                          dataset_size=500, subset_size=100)
    for cfg in (DpSgd.from_record(rec, lr=0.1), LinearDpSgd.from_record(rec, lr=0.1)):
        assert MechanismRecord.of(cfg, 500) == rec
    run_cfg = RunConfig(instances=2, steps=9, noise_multiplier=2.5)
    data = load_run_data(run_cfg)
    assert MechanismRecord.of(trainer_config(run_cfg, data), len(data.y_train)) == \
        run_record(run_cfg, data)
