"""Hostile and wrong inputs: every reader, config and command either works or fails with a
one-line UserError (CLI: exit status 2, no traceback, no output file) — never anything else."""

import gzip
import io
import json
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dpcert.certification.mechanism import MechanismRecord
from dpcert.cli import main
from dpcert.errors import UserError
from dpcert.learning import data
from dpcert.workflows.compare import CompareConfig
from dpcert.workflows.run import RunConfig

# DPCERT_FUZZ_EXAMPLES=5000 for a long fuzzing session; CI draws 60 fresh cases per test.
FUZZ = settings(max_examples=int(os.environ.get("DPCERT_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=2))


def ok_or_user_error(fn, *args, **kwargs):
    """Run fn; a UserError is a correct answer to bad input, any other exception is a bug."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return None


# -- configs ------------------------------------------------------------------------------------

RUN_KEYS = ["dataset", "model", "instances", "sample_rate", "noise_multiplier", "steps",
            "clip_norm", "lr", "optimizer", "subset_size", "seed", "eta", "max_radius",
            "workers", "batch_instances", "device", "backend", "gpu_fraction", "data_dir"]


@FUZZ
@given(st.dictionaries(st.sampled_from(RUN_KEYS + ["colour"]), values, max_size=5))
def test_run_config_fuzz(mapping):
    cfg = ok_or_user_error(RunConfig.from_mapping, mapping)
    if cfg is not None:  # an accepted config is well-typed
        assert isinstance(cfg.instances, int) and cfg.instances >= 2
        assert isinstance(cfg.seed, int) and isinstance(cfg.workers, int)
        assert 0 < cfg.eta < 1 and isinstance(cfg.max_radius, int) and cfg.max_radius >= 1
        assert cfg.dataset in ("digits", "mnist", "fashion-mnist", "cifar10", "npz", "folder")
        assert cfg.model in ("digits_cnn", "lenet5", "cifar_cnn", "resnet18_gn")
        assert cfg.data_dir is None or isinstance(cfg.data_dir, str)


@FUZZ
@given(st.dictionaries(st.sampled_from(["dp", "dpa", "fa", "bagging", "methods", "calibrate",
                                        "x"]), values, max_size=4))
def test_compare_config_fuzz(mapping):
    ok_or_user_error(CompareConfig.from_mapping, mapping)


@FUZZ
@given(st.dictionaries(st.sampled_from(["sample_rate", "noise_multiplier", "steps",
                                        "clip_norm", "dataset_size", "sampling",
                                        "subset_size", "extra"]), values, max_size=7))
def test_mechanism_record_fuzz(tmp_path, mapping):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(mapping, allow_nan=True))
    ok_or_user_error(MechanismRecord.load, path)


# -- dataset readers -----------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [data.read_idx, data.read_cifar_batch],
                         ids=["idx", "cifar"])
@FUZZ
@given(st.binary(max_size=200))
def test_readers_on_random_bytes(tmp_path, reader, raw):
    path = tmp_path / "file"
    path.write_bytes(raw)
    ok_or_user_error(reader, path)


@FUZZ
@given(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x01]),
       st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4),
       st.integers(0, 40), st.booleans())
def test_idx_reader_hostile_headers(tmp_path, dtype, dims, body, compress):
    raw = bytes([0, 0, dtype, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    raw += bytes(body)
    path = tmp_path / "f.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    arr = ok_or_user_error(data.read_idx, path)
    if arr is not None:
        assert arr.shape == tuple(dims)


pickled = st.recursive(
    st.one_of(scalars, st.binary(max_size=8),
              hnp.arrays(st.sampled_from([np.uint8, np.int64, np.float32]),
                         hnp.array_shapes(max_dims=2, max_side=4))),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from([b"data", b"labels", "data", 1]),
                                            inner, max_size=3)),
    max_leaves=6)


@FUZZ
@given(pickled, st.integers(0, 5))
def test_cifar_reader_fuzz(tmp_path, obj, protocol):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    ok_or_user_error(data.read_cifar_batch, path)


arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
                    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3),
                    elements=None)


@FUZZ
@given(st.dictionaries(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "z"]),
                       arrays, max_size=5))
def test_npz_reader_fuzz(tmp_path, content):
    path = tmp_path / "d.npz"
    np.savez(path, **content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a silent overflow to inf
        ds = ok_or_user_error(data.load_npz, path)
    if ds is not None:
        assert ds.x_train.ndim == 4 and len(ds.x_train) == len(ds.y_train)
        assert np.all(np.isfinite(ds.x_train)) and ds.y_train.min() >= 0


# -- the command line ----------------------------------------------------------------------------


def invoke(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code in (0, 2), (args, result.output, result.exception)
    if result.exit_code == 2:
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
    return result


@FUZZ
@given(arrays, st.sampled_from(["multinomial", "scores"]),
       st.sampled_from([["--method", "dp"], ["--method", "dpa"],
                        ["--method", "fa", "--spread", "2"],
                        ["--method", "bagging", "--train-size", "100", "--subsample-size", "9"],
                        ["--method", "fa", "--per-model", "--spread", "1", "--num-classes", "3"]]))
def test_certify_command_fuzz(tmp_path, arr, inference, method):
    src = tmp_path / "in.npy"
    np.save(src, arr)
    out = tmp_path / "out.csv"
    out.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent overflow or invalid cast
        res = invoke(["certify", src, "--inference", inference, "--sample-rate", "0.1",
                      "--noise-multiplier", "2", "--steps", "10", "--max-radius", "5",
                      "--output", out, *method])
    assert out.exists() == (res.exit_code == 0)


@FUZZ
@given(st.lists(st.sampled_from(["--sample-rate", "--noise-multiplier", "--steps", "--eta",
                                 "--max-radius", "--dataset-size", "--subset-size"]),
                min_size=1, max_size=3, unique=True),
       st.lists(st.sampled_from(["0", "-1", "nan", "inf", "1e308", "0.5", "x", "3", "1e-320"]),
                min_size=3, max_size=3))
def test_certify_option_fuzz(tmp_path, names, vals):
    src = tmp_path / "v.npy"
    np.save(src, np.array([[8, 2], [5, 5]]))
    out = tmp_path / "out.csv"
    out.unlink(missing_ok=True)
    args = {"--sample-rate": "0.1", "--noise-multiplier": "2", "--steps": "10",
            "--max-radius": "5"}
    args.update(dict(zip(names, vals, strict=False)))
    res = invoke(["certify", src, *[x for kv in args.items() for x in kv], "--output", out])
    assert out.exists() == (res.exit_code == 0)


@pytest.mark.parametrize("content", ["", "[1, 2]", "instances: [", "instances: 1",
                                     "colour: red", "sample_rate: nan", "steps: 1.5",
                                     "dataset: mnist", "workers: -3", "seed: x",
                                     "max_radius: 0", "eta: 2"])
def test_run_command_bad_configs(tmp_path, content):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    res = invoke(["run", cfg, "--output", tmp_path / "out", "--quiet"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()


def test_malformed_npy_files(tmp_path):
    for i, raw in enumerate([b"", b"\x93NUMPY\x01\x00", b"garbage" * 10,
                             np.lib.format.magic(1, 0) + b"\xff\xff{'descr': '<f8'}"]):
        src = tmp_path / f"bad{i}.npy"
        src.write_bytes(raw)
        res = invoke(["certify", src, "--sample-rate", "0.1", "--noise-multiplier", "2",
                      "--steps", "10", "--output", tmp_path / "o.csv"])
        assert res.exit_code == 2
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npy").write_bytes(buf.getvalue())
    res = invoke(["certify", tmp_path / "obj.npy", "--sample-rate", "0.1",
                  "--noise-multiplier", "2", "--steps", "10", "--output", tmp_path / "o.csv"])
    assert res.exit_code == 2 and not (tmp_path / "o.csv").exists()


def test_config_model_names_match_the_builders():
    from dpcert.learning.linear import AVERAGING
    from dpcert.learning.models import MODELS
    from dpcert.workflows.run import AVERAGING_NAMES, MODEL_NAMES

    # scatter_cnn is trained only by the partition defences (compare's learner: scatter-cnn)
    assert tuple(m for m in MODELS if m != "scatter_cnn") == MODEL_NAMES
    assert AVERAGING == (None, *AVERAGING_NAMES)


@FUZZ
@given(arrays)
def test_certify_labels_fuzz(tmp_path, labels):
    votes = tmp_path / "v.npy"
    np.save(votes, np.array([[8, 2], [5, 5], [0, 10]]))
    lab = tmp_path / "l.npy"
    np.save(lab, labels)
    out = tmp_path / "out.csv"
    out.unlink(missing_ok=True)
    res = invoke(["certify", votes, "--method", "dpa", "--labels", lab, "--output", out])
    assert out.exists() == (res.exit_code == 0)
    if res.exit_code == 0:
        assert labels.shape == (3,) and np.issubdtype(labels.dtype, np.integer)
