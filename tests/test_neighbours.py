"""What one example may change: training on a dataset D and on D plus one hostile example.

Every certificate bounds the effect of inserted or deleted training examples through the
training algorithm it accounts for, so between the raw data and the models nothing may be a
statistic of the whole training set. These tests make that a property: for every reader and
every defence, a neighbouring dataset (one example inserted — out of range, with a new label,
or a duplicate — and one deleted) is either refused in one line that names the example, or
changes only what the certificate allows: for a partition defence the kept models of the
touched parts, for a DP run nothing but that example (every other example's input bit for bit,
the label set, the step size's divisor and the instances' initial draws unchanged).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dpcert.errors import UserError
from dpcert.learning import data as data_mod
from dpcert.workflows.compare import CompareConfig, compare
from dpcert.workflows.partition import hash_partition
from dpcert.workflows.runconfig import RunConfig, load_run_data

N_TRAIN, N_TEST = 240, 40


def _digits_split():
    d = data_mod.load_digits()
    return (d.x_train[:N_TRAIN, 0], d.y_train[:N_TRAIN], d.x_test[:N_TEST, 0],
            d.y_test[:N_TEST])


def _insert(arr: np.ndarray, at: int, row: np.ndarray) -> np.ndarray:
    return np.concatenate([arr[:at], np.asarray(row, arr.dtype)[None], arr[at:]])


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# -- readers: a hostile example is refused, naming it ------------------------------------------


@pytest.mark.parametrize("kind", ["float", "uint8", "declared16"])
def test_npz_image_outside_the_declared_scale_is_refused_never_rescaled(tmp_path, kind):
    """The reported hole: one image on 0..255 among images in [0, 1] made the reader divide
    every image by 255. The scale is declared (dtype or raw_max); the example is refused."""
    x, y, xt, yt = _digits_split()
    extra = {}
    if kind == "uint8":
        x, xt = (np.round(x * 255)).astype(np.uint8), (np.round(xt * 255)).astype(np.uint8)
        hostile = np.full(x.shape[1:], 300, np.int16)  # beyond a byte
        x, xt = x.astype(np.int16), xt.astype(np.int16)
    elif kind == "declared16":
        x, xt = (np.round(x * 16)).astype(np.int64), (np.round(xt * 16)).astype(np.int64)
        hostile = np.full(x.shape[1:], 17, np.int64)
        extra = {"raw_max": 16}
    else:
        hostile = x[3] * 255.0  # the same digit on the 0..255 scale
    clean = tmp_path / "clean.npz"
    np.savez(clean, x_train=x, y_train=y, x_test=xt, y_test=yt, **extra)
    base = data_mod.load_npz(clean)
    assert 0 <= base.x_train.min() and base.x_train.max() <= 1
    poisoned = tmp_path / "poisoned.npz"
    np.savez(poisoned, x_train=_insert(x, 57, hostile), y_train=_insert(y, 57, y[3]),
             x_test=xt, y_test=yt, **extra)
    with pytest.raises(UserError) as err:
        data_mod.load_npz(poisoned)
    assert "train example 57 has values outside the declared input range" in _one_line(err)


def test_npz_label_outside_the_declared_set_is_refused(tmp_path):
    x, y, xt, yt = _digits_split()
    for extra in ({"num_classes": 10}, {}):  # declared, or by the test split's labels
        path = tmp_path / "p.npz"
        np.savez(path, x_train=_insert(x, 11, x[0]), y_train=_insert(y, 11, 10), x_test=xt,
                 y_test=yt, **extra)
        with pytest.raises(UserError) as err:
            data_mod.load_npz(path)
        assert "train example 11 has label 10, outside the declared label set 0..9" in \
            _one_line(err)


def test_npz_features_refuse_a_non_finite_example(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    bad = np.full(6, np.inf, np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=_insert(x, 9, bad), y_train=rng.integers(0, 3, 51),
             x_test=x[:5], y_test=np.array([0, 1, 2, 0, 1]))
    with pytest.raises(UserError) as err:
        data_mod.load_npz(path)
    assert "train example 9 has a value that is not a finite number" in _one_line(err)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    codes = {"u1": 0x08, "i2": 0x0B, "f4": 0x0D}
    arr = arr.astype(arr.dtype.newbyteorder(">"))
    header = bytes([0, 0, codes[arr.dtype.str[1:]], arr.ndim]) + b"".join(
        struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def _mnist_folder(folder: Path, x, y, xt, yt) -> Path:
    folder.mkdir()
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", xt), ("t10k-labels-idx1-ubyte", yt)):
        _write_idx(folder / f"{stem}.gz", arr)
    return folder


def test_idx_reader_declares_bytes_and_ten_classes(tmp_path):
    x, y, xt, yt = _digits_split()
    xb, xtb = (np.round(x * 255)).astype(np.uint8), (np.round(xt * 255)).astype(np.uint8)
    yb, ytb = y.astype(np.uint8), yt.astype(np.uint8)
    base = data_mod.load_mnist_like(_mnist_folder(tmp_path / "clean", xb, yb, xtb, ytb))
    assert (base.num_classes, base.raw_max, base.declared_size) == (10, 255, 60_000)
    # a 16-bit IDX file may hold values beyond a byte: refused, not rescaled
    wide = _insert(xb.astype(">i2"), 5, np.full(xb.shape[1:], 999, ">i2"))
    with pytest.raises(UserError) as err:
        data_mod.load_mnist_like(_mnist_folder(tmp_path / "wide", wide,
                                               _insert(yb, 5, 1), xtb, ytb))
    assert "train example 5 has values outside" in _one_line(err)
    with pytest.raises(UserError) as err:
        data_mod.load_mnist_like(_mnist_folder(tmp_path / "label", _insert(xb, 5, xb[0]),
                                               _insert(yb, 5, 12), xtb, ytb))
    assert "train example 5 has label 12" in _one_line(err)
    # a duplicate is an ordinary example: every other example reads bit for bit the same
    dup = data_mod.load_mnist_like(_mnist_folder(tmp_path / "dup", _insert(xb, 5, xb[9]),
                                                 _insert(yb, 5, yb[9]), xtb, ytb))
    np.testing.assert_array_equal(np.delete(dup.x_train, 5, axis=0), base.x_train)
    assert (dup.num_classes, dup.raw_max, dup.declared_size) == (10, 255, 60_000)


def test_cifar_reader_refuses_a_label_outside_its_ten_classes(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 4)]}
        if i == 3:
            batch[b"labels"][2] = 10
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(
        {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}))
    with pytest.raises(UserError) as err:
        data_mod.load_cifar10(tmp_path)
    assert "labels" in _one_line(err)


def test_the_cli_refuses_a_hostile_dataset_in_one_line_with_exit_2(tmp_path):
    from dpcert.cli import main

    x, y, xt, yt = _digits_split()
    path = tmp_path / "p.npz"
    np.savez(path, x_train=_insert(x, 57, x[3] * 255), y_train=_insert(y, 57, y[3]),
             x_test=xt, y_test=yt, train_size=N_TRAIN)
    res = CliRunner().invoke(main, ["run", "--dataset", "npz", "--data-dir", str(path),
                                    "--output", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "train example 57 has values outside" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- defences: only what the certificate allows changes ------------------------------------------


def _features_npz(path: Path, x, y, xt, yt) -> Path:
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
    np.savez(path, x_train=flat(x), y_train=y, x_test=flat(xt), y_test=yt, num_classes=10,
             train_size=N_TRAIN)
    return path


def _neighbour(x, y):
    """D' = D without example 20, with a duplicate of example 100 inserted at 7 and a new
    in-range example at 150 (two insertions and one deletion: radius 3)."""
    rng = np.random.default_rng(5)
    fresh = rng.random(x.shape[1:]).astype(x.dtype)
    x2, y2 = np.delete(x, 20, axis=0), np.delete(y, 20)
    x2, y2 = _insert(x2, 7, x[100]), _insert(y2, 7, y[100])
    x2, y2 = _insert(x2, 150, fresh), _insert(y2, 150, 4)
    return x2, y2, [x[20], x[100], fresh]


def _kept_models(folder: Path) -> list[dict]:
    """Every kept model's content: its arrays and metadata, checksum verified. (The files'
    bytes are not compared: safetensors writes the metadata keys in no fixed order.)"""
    from dpcert.store import load_tensors

    out = []
    for p in sorted(folder.glob("model_*.safetensors")):
        arrays, meta = load_tensors(p)
        out.append({"meta": meta, **{k: (v.dtype.str, v.shape, v.tobytes())
                                     for k, v in arrays.items()}})
    return out


@pytest.mark.parametrize(("kind", "setting", "per_example"), [
    ("dpa", {"models": 12, "learner": "kernel-ridge", "gamma": 0.05}, 1),
    ("dpa", {"models": 12, "learner": "nearest-neighbour"}, 1),
    ("dpa", {"models": 12, "learner": "prototype"}, 1),
    ("dpa", {"models": 6, "learner": "full-batch", "steps": 5}, 1),
    ("fa", {"models": 4, "spread": 3, "learner": "kernel-ridge", "gamma": 0.05}, 3),
])
def test_a_partition_defence_changes_only_the_parts_it_touches(tmp_path, kind, setting,
                                                                 per_example):
    """Kept models of D and D' compared bit for bit: only the parts of the deleted
    and inserted examples differ (FA: their d models each) — in particular not the padding
    of every nearest-neighbour or kernel-ridge model, which once followed the largest part.
    And D in another order gives every model bit for bit, whatever the learner."""
    x, y, xt, yt = _digits_split()
    x2, y2, touched = _neighbour(x, y)
    perm = np.random.default_rng(11).permutation(len(y))
    files = {}
    for name, (a, b) in {"d": (x, y), "d2": (x2, y2), "shuffled": (x[perm], y[perm])}.items():
        npz = _features_npz(tmp_path / f"{name}.npz", a, b, xt, yt)
        cfg = CompareConfig.from_mapping({
            "dp": {"dataset": "npz", "data_dir": str(npz), "model": "linear",
                   "optimizer": "sgd", "workers": 1}, "methods": [kind], kind: setting})
        compare(cfg, tmp_path / name, progress=False)
        (found,) = [p for p in (tmp_path / name).iterdir() if p.name.startswith(kind + "_")]
        files[name] = _kept_models(found)
    assert len(files["d"]) == len(files["d2"]) > 1
    changed = {j for j, (a, b) in enumerate(zip(files["d"], files["d2"], strict=True)) if a != b}
    bc_models = len(files["d"])
    flat = np.stack([t.reshape(-1) for t in touched]).astype(np.float32)
    if kind == "fa":
        from dpcert.certification import baselines

        spread = setting["spread"]
        of_bucket = baselines.fa_models_of_bucket(bc_models, baselines.fa_shifts(bc_models,
                                                                                   spread))
        allowed = {int(j) for b in hash_partition(flat, bc_models) for j in of_bucket[b]}
    else:
        allowed = set(hash_partition(flat, bc_models).tolist())
    assert changed <= allowed and len(allowed) <= len(touched) * per_example
    assert changed, "the touched parts were retrained on other examples"
    # a model is a function of its part as a set: the training set reordered, no model moves
    assert files["shuffled"] == files["d"]


@pytest.mark.parametrize("model", ["digits_cnn", "linear"])
def test_a_dp_run_sees_every_other_example_and_its_configuration_unchanged(tmp_path, model):
    """For DP-SGD the certificate covers one example's gradient: every other example must
    reach the instances bit for bit, and the label set, the step size's divisor and the
    instances' initial draws must not move. (Bagging reads the same dataset: its bags are
    drawn uniformly from the examples present, which is the mechanism its certificate
    accounts for, n and n' = n +- r.)"""
    import torch

    from dpcert.learning.stacked import init_stacked
    from dpcert.workflows.dispatch import _image_training

    x, y, xt, yt = _digits_split()
    x2, y2, _ = _neighbour(x, y)
    keep = np.ones(len(y2), bool)
    keep[[7, 150]] = False  # the inserted examples; D' without them is D without example 20
    loaded = {}
    for name, (a, b) in {"d": (x, y), "d2": (x2, y2)}.items():
        path = tmp_path / f"{name}.npz"
        if model == "linear":
            _features_npz(path, a, b, xt, yt)
        else:
            np.savez(path, x_train=a, y_train=b, x_test=xt, y_test=yt, num_classes=10,
                     train_size=N_TRAIN)
        opts = {"model": "linear", "optimizer": "sgd"} if model == "linear" else {}
        cfg = RunConfig(dataset="npz", data_dir=str(path), **opts)
        loaded[name] = (cfg, load_run_data(cfg))
    (c1, d1), (c2, d2) = loaded["d"], loaded["d2"]
    np.testing.assert_array_equal(d2.x_train[keep], np.delete(d1.x_train, 20, axis=0))
    np.testing.assert_array_equal(d2.y_train[keep], np.delete(d1.y_train, 20))
    assert (d1.num_classes, d1.declared_size, d1.raw_max) == \
        (d2.num_classes, d2.declared_size, d2.raw_max)
    if model == "linear":
        return
    (dp1, fn1), (dp2, fn2) = _image_training(c1, d1), _image_training(c2, d2)
    assert dp1 == dp2 and dp1.declared_size == N_TRAIN
    s1, s2 = init_stacked(fn1, 0, [0, 3], torch.device("cpu")), \
        init_stacked(fn2, 0, [0, 3], torch.device("cpu"))
    for k, v in s1.params.items():
        assert torch.equal(v, s2.params[k])


def test_a_dp_run_without_a_declared_size_is_refused_before_anything_is_written(tmp_path):
    from dpcert.workflows.run import run

    x, y, xt, yt = _digits_split()
    path = tmp_path / "p.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    with pytest.raises(UserError, match="none is declared") as err:
        run(RunConfig(dataset="npz", data_dir=str(path), instances=2, steps=2),
            tmp_path / "run", progress=False)
    _one_line(err)
    assert not (tmp_path / "run").exists()
    # declared in the run's configuration instead: trained, and recorded with the run
    cfg = RunConfig(dataset="npz", data_dir=str(path), instances=2, steps=2, workers=1,
                    max_radius=3, train_size=N_TRAIN)
    run(cfg, tmp_path / "run", progress=False)
    assert load_run_data(cfg).declared_size == N_TRAIN
    assert '"train_size": 240' in (tmp_path / "run" / "config.json").read_text()


def test_an_ensemble_trained_before_the_inputs_were_declared_is_refused(tmp_path):
    """Runs made before the fix on an .npz may have been trained on rescaled images, a label
    set and a step size read off the training data: no certificate covers them."""
    import json

    from dpcert.workflows.ensemble import load_ensemble
    from dpcert.workflows.run import run

    x, y, xt, yt = _digits_split()
    path = tmp_path / "p.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, train_size=N_TRAIN)
    cfg = RunConfig(dataset="npz", data_dir=str(path), instances=2, steps=2, workers=1,
                    max_radius=3)
    run(cfg, tmp_path / "run", progress=False)
    assert load_ensemble(tmp_path / "run").info.declared_inputs
    info = tmp_path / "run" / "ensemble.json"
    d = json.loads(info.read_text())
    del d["declared_inputs"]
    info.write_text(json.dumps(d))
    for attempt in (lambda: load_ensemble(tmp_path / "run"),
                    lambda: run(cfg, tmp_path / "run", progress=False)):
        with pytest.raises(UserError, match="trained by dpcert < 0.3") as err:
            attempt()
        _one_line(err)


def _image_folder(root: Path, x, y, xt, yt) -> Path:
    from PIL import Image

    for split, images, labels in (("train", x, y), ("test", xt, yt)):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            d = root / split / f"class_{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


def test_image_folders_declare_labels_size_and_channels_by_the_test_split(tmp_path):
    """A folder per class: the same digits as the embedded reader gives (to a byte), a
    training class the test split lacks refused, an image of another size resized on its
    own (every other example bit for bit the same), and a partition defence trained on it."""
    x, y, xt, yt = _digits_split()
    root = _image_folder(tmp_path / "digits", x, y, xt, yt)
    d = data_mod.load_dataset("folder", root)
    assert (d.num_classes, d.raw_max, d.declared_size, d.x_train.shape[1:]) == \
        (10, 255, None, (1, 8, 8))
    order = np.argsort(y, kind="stable")  # files are read class by class, then by name
    np.testing.assert_array_equal(d.y_train, y[order])
    np.testing.assert_array_equal(d.x_train[:, 0], (np.round(x[order] * 255) / 255.0)
                                  .astype(np.float32))
    from PIL import Image

    big = np.kron(np.round(x[3] * 255), np.ones((4, 4))).astype(np.uint8)  # 32 x 32
    Image.fromarray(big).save(root / "train" / "class_0" / "0000a.png")
    bigger = data_mod.load_dataset("folder", root)
    assert len(bigger.y_train) == len(y) + 1 and bigger.x_train.shape[1:] == (1, 8, 8)
    names = sorted([f"{i:04d}.png" for i in np.flatnonzero(y == 0)] + ["0000a.png"])
    inserted = names.index("0000a.png")  # class 0 is read first, its files by name
    np.testing.assert_array_equal(np.delete(bigger.x_train, inserted, axis=0), d.x_train)
    (root / "train" / "class_x").mkdir()
    Image.fromarray(big).save(root / "train" / "class_x" / "a.png")
    with pytest.raises(UserError) as err:
        data_mod.load_dataset("folder", root)
    assert "class 'class_x' is not among the test split's classes" in _one_line(err)
    (root / "train" / "class_x" / "a.png").unlink()
    (root / "train" / "class_x").rmdir()
    from dpcert.cli import main

    res = CliRunner().invoke(main, [
        "run", "--dataset", "folder", "--data-dir", str(root), "--defence", "dpa", "--models",
        "10", "--learner", "kernel-ridge", "--output", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, [
        "run", "--dataset", "folder", "--data-dir", str(root), "--instances", "2",
        "--output", str(tmp_path / "dp"), "--quiet"])
    assert res.exit_code == 2 and "--train-size" in res.output


def test_a_feature_too_large_to_square_is_refused_and_cannot_poison_the_clipping(tmp_path):
    """A finite feature of 1e20 overflows its squared norm to inf in float32; when the model
    already fits that example, the gradient norm was inf * 0 = NaN, and the NaN clipping
    factor turned every weight of every instance into NaN. Refused by the readers and the
    library entry points, and harmless to the clipping itself."""
    import torch

    from dpcert.learning import linear

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    huge = np.array([1e20, 0, 0, 0], np.float32)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=_insert(x, 9, huge), y_train=rng.integers(0, 3, 61), x_test=x[:5],
             y_test=np.array([0, 1, 2, 0, 1]))
    with pytest.raises(UserError) as err:
        data_mod.load_npz(path)
    assert "train example 9 has a value that is not a finite number, or too large" in \
        _one_line(err)
    with pytest.raises(UserError, match="training example 9"):
        linear.train_linear_ensemble(_insert(x, 9, huge), rng.integers(0, 3, 61), x[:5],
                                     instances=2, sample_rate=0.5, noise_multiplier=1.0,
                                     steps=2, clip_norm=1.0, lr=0.1, num_classes=3,
                                     declared_size=60)
    # the clipping: an example with an infinite squared norm that the model fits exactly
    xb = torch.tensor(np.stack([x[:3], x[:3]]))  # (K=2, B=3, D=4)
    xb[:, 1] = torch.tensor(huge)
    weight, bias = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    bias[:, 0] = 1e4  # softmax exactly one-hot at label 0: err = 0 for a label-0 example
    onehot = torch.zeros(2, 3, 3)
    onehot[:, :, 0] = 1.0
    sq_norm = xb.pow(2).sum(2) + 1.0
    assert torch.isinf(sq_norm[:, 1]).all()
    gw, gb = linear.clipped_gradient_sum(weight, bias, xb, onehot, sq_norm,
                                         torch.ones(2, 3), 1.0)
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all()


def test_models_kept_by_dpcert_0_1_are_not_resumed_into_a_certificate(tmp_path):
    """A baseline folder without ensemble.json (dpcert 0.1) on an .npz: its models may have
    been trained through the rescaling reader; resuming it is refused, not certified."""
    import json

    from dpcert.workflows.defence import run_defence
    from dpcert.workflows.setting import BaselineConfig

    x, y, xt, yt = _digits_split()
    npz = _features_npz(tmp_path / "d.npz", x, y, xt, yt)
    cfg = RunConfig(dataset="npz", data_dir=str(npz), model="linear", optimizer="sgd",
                    workers=1)
    bc = BaselineConfig(models=5, learner="prototype")
    run_defence("dpa", bc, cfg, tmp_path / "run", progress=False)  # today's: fine
    (tmp_path / "run" / "ensemble.json").unlink()  # as dpcert 0.1 left it
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["kind"] == "dpa"
    with pytest.raises(UserError, match="trained by dpcert < 0.3") as err:
        run_defence("dpa", bc, cfg, tmp_path / "run", progress=False)
    _one_line(err)


def test_dp_ensembles_of_before_0_3_load_only_if_their_steps_used_the_declared_size():
    """Before 0.3 every DP run divided its steps by q times the number of examples present;
    on the fixed readers that equals the declared size only for the standard split."""
    from dpcert.certification.mechanism import MechanismRecord
    from dpcert.workflows.ensemble import check_declared_inputs

    def mech(n, m=None):
        return MechanismRecord(sample_rate=0.05, noise_multiplier=3.0, steps=10,
                               dataset_size=n, subset_size=m)

    check_declared_inputs("digits", 10, False, mech(1438))
    check_declared_inputs("mnist", 10, False, mech(50_000), validation=10_000)
    check_declared_inputs("mnist", 10, False, mech(1000, m=500))  # sub-datasets: m declared
    check_declared_inputs("npz", 10, True, mech(7))  # made by 0.3
    for args in (("mnist", 10, False, mech(1000)), ("npz", 10, False, None),
                 ("digits", 11, False, None)):
        with pytest.raises(UserError, match="trained by dpcert < 0.3"):
            check_declared_inputs(*args)


def test_npz_files_that_are_not_numeric_arrays_or_misspell_a_declaration_are_refused(tmp_path):
    x, y, xt, yt = _digits_split()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, rawmax=16)
    with pytest.raises(UserError) as err:
        data_mod.load_npz(path)
    assert "'rawmax' (did you mean 'raw_max'?)" in _one_line(err)
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=y, x_test=xt,
             y_test=yt)
    with pytest.raises(UserError, match="not numbers"):
        data_mod.load_npz(path)
    path.write_text("plain text")
    with pytest.raises(UserError, match="is not an .npz file") as err:
        data_mod.load_npz(path)
    assert "unsafe" not in str(err.value) and "pickle" not in str(err.value)
