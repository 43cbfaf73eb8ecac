"""A kept ensemble refuses, in one line and before any work a claimed size would take, every
damaged or edited file that its own records can catch: descriptions that disagree with the
settings they were trained with, models moved between slots or linked from outside, weights
that are not the model's (non-finite, other dtype, missing or other shapes), and counts that
the directory does not hold. (A forged record consistent across every file is caught only by
comparing the export's digest with one recorded at training.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dpcert.errors import UserError
from dpcert.learning.data import load_digits
from dpcert.store import atomic_save_tensors, load_tensors
from dpcert.workflows.ensemble import load_ensemble
from dpcert.workflows.run import RunConfig, run

X = load_digits().x_test[:6]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dp"
    run(RunConfig(instances=4, steps=5, workers=1, max_radius=5), out, progress=False)
    load_ensemble(out).certify(X)  # the untouched run is fine
    return out


def _copy(clean_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(clean_run, out, symlinks=True)
    return out


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    for key, value in changes.items():
        target = d
        *parents, last = key.split("__")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(d))


def _refused(path, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        load_ensemble(path).certify(X)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 500


@pytest.mark.parametrize(("edit", "match"), [
    ({"eta": 0.3}, "eta = 0.3, config.json 0.001"),
    ({"instances": 2}, "instances"),
    ({"instances": 0}, "instances 0"),
    ({"num_classes": 1}, "num_classes 1"),
    ({"input__raw_max": 255}, "raw_max 255 for digits"),
    ({"max_radius": -3}, "max_radius -3"),
])
def test_an_edit_of_the_description_alone_is_refused(clean_run, tmp_path, edit, match):
    out = _copy(clean_run, tmp_path)
    _edit_json(out / "ensemble.json", **edit)
    _refused(out, match)


def test_a_mechanism_edited_in_both_records_disagrees_with_what_was_trained(clean_run,
                                                                           tmp_path):
    out = _copy(clean_run, tmp_path)
    _edit_json(out / "ensemble.json", mechanism__sample_rate=1e-6)
    _edit_json(out / "mechanism.json", sample_rate=1e-6)
    _refused(out, "sample_rate 1e-06 is not the training's 0.05")


def test_a_claimed_size_the_directory_does_not_hold_is_refused_before_any_work(clean_run,
                                                                              tmp_path):
    out = _copy(clean_run, tmp_path)
    _edit_json(out / "ensemble.json", instances=300_000, training__instances=300_000)
    _edit_json(out / "config.json", instances=300_000)
    _refused(out, "describes 300000 models but holds 4 model files")


def test_models_are_bound_to_their_slots_and_their_directory(clean_run, tmp_path):
    out = _copy(clean_run, tmp_path)
    inst = out / "instances"
    shutil.copy(inst / "inst_000000.safetensors", inst / "inst_000001.safetensors")
    _refused(out, "holds the model of slot '000000', not '000001'")
    out2 = tmp_path / "linked"
    shutil.copytree(clean_run, out2)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(out2 / "instances" / "inst_000002.safetensors", outside)
    (out2 / "instances" / "inst_000002.safetensors").unlink()
    (out2 / "instances" / "inst_000002.safetensors").symlink_to(outside)
    _refused(out2, "is a link or lies outside")


@pytest.mark.parametrize("kind", ["nan", "float64", "missing", "shape"])
def test_weights_that_are_not_the_models_are_refused_even_with_their_checksum(clean_run,
                                                                             tmp_path, kind):
    out = _copy(clean_run, tmp_path)
    path = out / "instances" / "inst_000003.safetensors"
    arrays, meta = load_tensors(path)
    name = sorted(arrays)[0]
    if kind == "nan":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif kind == "float64":
        arrays[name] = arrays[name].astype(np.float64)
    elif kind == "missing":
        del arrays[sorted(arrays)[-1]]
    else:  # swapped dimensions of a weight matrix
        name = next(n for n in sorted(arrays) if arrays[n].ndim >= 2)
        arrays[name] = np.ascontiguousarray(arrays[name].reshape(arrays[name].shape[::-1]))
    atomic_save_tensors(path, arrays, {"instance": meta["instance"]})  # a fresh checksum
    assert load_tensors(path) is not None
    _refused(out, {"nan": "non-finite", "float64": "not float32", "missing": "parameter",
                   "shape": "parameter|shapes"}[kind])


def test_damaged_certificates_or_labels_are_refused(clean_run, tmp_path):
    out = _copy(clean_run, tmp_path)
    (out / "certificates.csv").write_text("index,prediction,radius,label\nx,y\n")
    with pytest.raises(UserError, match="certificates.csv is missing or damaged"):
        load_ensemble(out)
    out2 = tmp_path / "labels"
    shutil.copytree(clean_run, out2)
    (out2 / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        load_ensemble(out2)


def test_an_export_with_checksums_that_are_not_a_list_is_refused(clean_run, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from dpcert.workflows.ensemble import _header_digest, export_ensemble

    export_ensemble(clean_run, tmp_path / "e.safetensors")
    with safe_open(str(tmp_path / "e.safetensors"), framework="numpy") as f:
        meta = dict(f.metadata())
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["instance_sha256"] = json.dumps({"0": "x"})
    meta["header_sha256"] = _header_digest(meta["dpcert"], meta["instance_sha256"])
    save_file(arrays, str(tmp_path / "forged.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="not a list of strings"):
        load_ensemble(tmp_path / "forged.safetensors")


def test_the_command_line_refuses_with_exit_status_2(clean_run, tmp_path):
    from click.testing import CliRunner

    from dpcert.cli import main

    out = _copy(clean_run, tmp_path)
    _edit_json(out / "ensemble.json", eta=0.3)
    np.save(tmp_path / "x.npy", X)
    res = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "x.npy"), "--output",
                                    str(tmp_path / "p.csv"), "--quiet"])
    assert res.exit_code == 2 and "damaged or altered" in res.output
    assert not (tmp_path / "p.csv").exists()


def test_a_whole_ensemble_of_models_of_another_shape_is_refused(clean_run, tmp_path):
    """Every model altered the same way passes the stacking; the model's own shapes do not."""
    out = _copy(clean_run, tmp_path)
    for path in sorted((out / "instances").glob("*.safetensors")):
        arrays, meta = load_tensors(path)
        name = next(n for n in sorted(arrays) if arrays[n].ndim >= 2)
        arrays[name] = np.ascontiguousarray(arrays[name].reshape(arrays[name].shape[::-1]))
        atomic_save_tensors(path, arrays, {"instance": meta["instance"]})
    _refused(out, "not that of a digits_cnn model")


def test_a_pinned_digest_catches_a_forged_record_consistent_across_files(clean_run, tmp_path):
    """A run and its export have one digest; an edit made consistently in every file passes
    the local checks, but not a pinned digest."""
    from click.testing import CliRunner

    from dpcert.cli import main
    from dpcert.workflows.ensemble import export_ensemble

    pinned = load_ensemble(clean_run).digest()
    export_ensemble(clean_run, tmp_path / "e.safetensors")
    assert load_ensemble(tmp_path / "e.safetensors").digest() == pinned
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "e.safetensors"), "--digest",
                                    pinned, "--quiet"])
    assert res.exit_code == 0 and f"digest {pinned}" in res.output
    out = _copy(clean_run, tmp_path)
    _edit_json(out / "ensemble.json", eta=0.3)
    _edit_json(out / "config.json", eta=0.3)
    load_ensemble(out).certify(X)  # consistent in every file: nothing local can tell
    with pytest.raises(UserError, match="not the pinned"):
        load_ensemble(out, digest=pinned)
    np.save(tmp_path / "x.npy", X)
    res = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "x.npy"), "--digest",
                                    pinned, "--output", str(tmp_path / "p.csv"), "--quiet"])
    assert res.exit_code == 2 and "not the pinned" in res.output


def test_a_directory_is_not_resumed_on_other_data(tmp_path):
    from dpcert.workflows.defence import run_defence
    from dpcert.workflows.setting import BaselineConfig

    d = load_digits()
    for name, order in (("a", slice(None)), ("b", slice(None, None, -1))):
        np.savez(tmp_path / f"{name}.npz", x_train=d.x_train[order], y_train=d.y_train[order],
                 x_test=d.x_test, y_test=d.y_test)
    bc = BaselineConfig(models=5, learner="prototype")
    run_defence("dpa", bc, RunConfig(dataset="npz", data_dir=str(tmp_path / "a.npz")),
                tmp_path / "run", progress=False)
    with pytest.raises(UserError, match="trained on other data"):
        run_defence("dpa", bc, RunConfig(dataset="npz", data_dir=str(tmp_path / "b.npz")),
                    tmp_path / "run", progress=False)


def test_a_rerun_interrupted_between_its_two_records_resumes(clean_run, tmp_path):
    """A rerun with another eta writes config.json, then ensemble.json; killed between the
    two, the directory is refused as inconsistent until the rerun completes it."""
    out = _copy(clean_run, tmp_path)
    _edit_json(out / "config.json", eta=0.01)  # as the interrupted rerun left it
    _refused(out, "eta = 0.001, config.json 0.01")
    run(RunConfig(instances=4, steps=5, workers=1, max_radius=5, eta=0.01), out,
        progress=False)
    assert load_ensemble(out).info.eta == 0.01


def test_a_baseline_runs_certification_settings_are_bound_too(tmp_path):
    """Bagging's certificate reads eta: an edit of ensemble.json alone once certified larger
    radii; its folder keeps the certification settings in a second record."""
    from dpcert.workflows.defence import defence_config, run_defence

    kind, cfg, bc = defence_config({"defence": "bagging", "models": 6, "subsample": 100,
                                    "learner": "prototype"})
    run_defence(kind, bc, cfg, tmp_path / "bag", progress=False)
    load_ensemble(tmp_path / "bag").certify(X)
    _edit_json(tmp_path / "bag" / "ensemble.json", eta=0.5)
    _refused(tmp_path / "bag", "eta = 0.5, certification.json 0.001")


def test_a_partition_run_records_each_parts_data_fingerprint(tmp_path):
    """A DPA run's description carries one fingerprint per model: of its part's examples and
    labels as a set. Recomputed from the data they match; on a neighbouring dataset (one
    example deleted, one label flipped) exactly the touched parts' fingerprints change; and
    they are bound into the ensemble's digest."""
    from click.testing import CliRunner

    from dpcert.cli import main
    from dpcert.learning.data import part_fingerprints
    from dpcert.workflows.partition import training_indices
    from dpcert.workflows.setting import BaselineConfig

    out = tmp_path / "dpa"
    res = CliRunner().invoke(main, ["run", "--defence", "dpa", "--models", "20", "--learner",
                                    "prototype", "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    recorded = json.loads((out / "ensemble.json").read_text())["part_sha256"]
    data = load_digits()
    bc = BaselineConfig(models=20, learner="prototype")
    parts = training_indices("dpa", bc, data.x_train)
    assert part_fingerprints(data.x_train, data.y_train, parts) == recorded
    x, y = np.delete(data.x_train, 7, axis=0), np.delete(data.y_train, 7)
    y[100] = (y[100] + 1) % 10
    changed = part_fingerprints(x, y, training_indices("dpa", bc, x))
    touched = {int(np.flatnonzero([7 in p for p in parts])[0]),
               int(np.flatnonzero([100 + (100 >= 7) in p for p in parts])[0])}
    assert {i for i in range(20) if changed[i] != recorded[i]} == touched
    ens = load_ensemble(out)
    before = ens.digest()
    info = json.loads((out / "ensemble.json").read_text())
    info["part_sha256"][0] = "0" * 64
    (out / "ensemble.json").write_text(json.dumps(info))
    assert load_ensemble(out).digest() != before
