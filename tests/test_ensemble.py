"""Kept ensembles: models stored with each unit, loaded again, run on new inputs, certified.

The central property: certifying a run's own test set through the loaded (or exported)
ensemble reproduces the run's certificates.csv and votes.npy exactly."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_digits

from dpcert.errors import UserError
from dpcert.learning.data import load_digits
from dpcert.learning.inputs import InputSpec, read_inputs
from dpcert.workflows import ensemble as ensemble_mod
from dpcert.workflows.ensemble import export_ensemble, load_ensemble
from dpcert.workflows.run import RunConfig, run

CNN = dict(instances=30, steps=150, sample_rate=0.05, noise_multiplier=2.0, workers=2,
           eta=0.05, max_radius=20)
LINEAR = dict(CNN, model="linear", features="scatter", optimizer="sgd", lr=0.5, steps=150,
              bias_feature=0.5, batch_instances=12)


def _certs(run_dir):
    rows = np.loadtxt(run_dir / "certificates.csv", delimiter=",", skiprows=1, dtype=np.int64)
    return rows[:, 1], rows[:, 2]


@pytest.fixture(scope="module", params=["cnn", "linear"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = RunConfig(**(CNN if request.param == "cnn" else LINEAR))
    run(cfg, out, progress=False)
    return out, cfg


def test_a_run_keeps_every_model_with_a_description(trained):
    run_dir, cfg = trained
    for i in range(cfg.instances):
        assert (run_dir / "instances" / f"inst_{i:06d}.safetensors").stat().st_size > 0
    info = json.loads((run_dir / "ensemble.json").read_text())
    assert info["model"] == cfg.model and info["instances"] == cfg.instances
    assert info["input"]["shape"] == [1, 8, 8] and info["input"]["raw_max"] == 16
    assert info["mechanism"] == json.loads((run_dir / "mechanism.json").read_text())


def test_loaded_ensemble_reproduces_the_runs_certificates(trained, monkeypatch):
    run_dir, _ = trained
    x_test = load_digits().x_test
    prediction, radius = _certs(run_dir)
    assert (radius >= 1).mean() > 0.1  # a run that certifies: the comparison has teeth
    ens = load_ensemble(run_dir)
    cert, pred = ens.certify_with_votes(x_test)
    np.testing.assert_array_equal(pred.votes, np.load(run_dir / "votes.npy"))
    np.testing.assert_array_equal(cert.prediction, prediction)
    np.testing.assert_array_equal(cert.radius, radius)
    # streamed one instance at a time: the same answer
    monkeypatch.setattr(ensemble_mod, "BLOCK_BYTES", 1)
    np.testing.assert_array_equal(load_ensemble(run_dir).predict(x_test).votes, pred.votes)
    # the mean scores are the run's stored scores averaged over instances
    np.testing.assert_allclose(pred.mean_scores, np.load(run_dir / "scores.npy").mean(0),
                               atol=1e-5)


def test_raw_pixels_are_converted_as_the_reader_converts_them(trained):
    run_dir, _ = trained
    data = load_digits()
    raw = sk_digits().images.astype(np.uint8)  # 0..16, as the reader reads them
    test_rows = _digits_test_rows(raw, data.x_test)
    ens = load_ensemble(run_dir)
    a = ens.predict(data.x_test[:40])
    b = ens.predict(raw[test_rows[:40]])  # (N, H, W) uint8
    np.testing.assert_array_equal(a.votes, b.votes)
    np.testing.assert_array_equal(a.mean_scores, b.mean_scores)


def _digits_test_rows(raw, x_test):
    flat = (raw / 16.0).astype(np.float32).reshape(len(raw), -1)
    index = {row.tobytes(): i for i, row in enumerate(flat)}
    return np.array([index[r.reshape(-1).tobytes()] for r in x_test])


def test_exported_file_reproduces_the_run_and_refuses_tampering(trained, tmp_path):
    run_dir, cfg = trained
    x_test = load_digits().x_test
    out = tmp_path / "ens.safetensors"
    digest = export_ensemble(run_dir, out)
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    ens = load_ensemble(out)
    assert ens.info.test_curve is not None and ens.info.test_curve["ca"][0] > 0
    prediction, radius = _certs(run_dir)
    cert = ens.certify(x_test)
    np.testing.assert_array_equal(cert.prediction, prediction)
    np.testing.assert_array_equal(cert.radius, radius)
    # one flipped weight byte: refused when that instance is read, never used
    blob = bytearray(out.read_bytes())
    blob[-3] ^= 0x40
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="fails its checksum"):
        load_ensemble(bad).predict(x_test[:2])
    # a truncated file is not an ensemble
    (tmp_path / "short.safetensors").write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(UserError):
        load_ensemble(tmp_path / "short.safetensors").predict(x_test[:2])
    # an altered description (say, a larger noise multiplier) fails the header checksum
    header = out.read_bytes()
    n = int.from_bytes(header[:8], "little")
    text = header[8:8 + n].decode()
    sigma = f'\\"noise_multiplier\\": {cfg.noise_multiplier}'
    assert sigma in text
    forged = text.replace(sigma, f'\\"noise_multiplier\\": {cfg.noise_multiplier + 1:.1f}')
    forged = forged[:n].ljust(n)
    (tmp_path / "forged.safetensors").write_bytes(header[:8] + forged.encode()
                                                  + header[8 + n:])
    with pytest.raises(UserError, match="checksum"):
        load_ensemble(tmp_path / "forged.safetensors")


def test_a_damaged_model_file_is_refused_and_retrained(trained, tmp_path):
    run_dir, cfg = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    model = copy / "instances" / "inst_000002.safetensors"
    original = model.read_bytes()
    blob = bytearray(original)
    blob[-5] ^= 0x01
    model.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="instance 2 .*checksum"):
        load_ensemble(copy).predict(load_digits().x_test[:3])
    # resuming the run retrains exactly that instance, to the same model
    unit = copy / "instances" / "inst_000000.npz"
    before = unit.stat().st_mtime_ns
    run(cfg, copy, progress=False)
    assert unit.stat().st_mtime_ns == before
    from dpcert.store import load_tensors

    again, _ = load_tensors(model)
    kept, _ = load_tensors(run_dir / "instances" / "inst_000002.safetensors")
    for name in kept:
        np.testing.assert_allclose(again[name], kept[name], atol=1e-5)


def test_runs_without_models_still_certify_but_cannot_predict(trained, tmp_path):
    run_dir, cfg = trained
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "ensemble.json").unlink()
    for f in (old / "instances").glob("*.safetensors"):
        f.unlink()
    units = {f: f.stat().st_mtime_ns for f in (old / "instances").glob("*.npz")}
    with pytest.raises(UserError, match="kept no models"):
        load_ensemble(old)
    run(cfg, old, progress=False)  # resumes as it was: nothing retrained, no models made
    assert {f: f.stat().st_mtime_ns for f in (old / "instances").glob("*.npz")} == units
    assert not list((old / "instances").glob("*.safetensors"))
    assert (old / "certificates.csv").read_text() == (run_dir / "certificates.csv").read_text()


@pytest.mark.parametrize(("x", "message"), [
    (np.zeros((2, 1, 9, 8), np.float32), "shape"),
    (np.zeros((0, 8, 8), np.float32), "empty"),
    (np.full((2, 8, 8), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((2, 8, 8), np.nan, np.float32), "finite"),
    (np.full((2, 8, 8), 17, np.uint8), "0..16"),
    (np.array([["a"] * 8] * 8)[None], "numbers"),
])
def test_bad_inputs_are_one_clear_error(x, message):
    spec = InputSpec((1, 8, 8), raw_max=16)
    with pytest.raises(UserError, match=message):
        spec.to_model_input(x)


def test_image_files_and_folders_are_read_and_resized(tmp_path):
    from PIL import Image

    spec = InputSpec((1, 8, 8), raw_max=16)
    img = np.zeros((32, 32), np.uint8)
    img[8:24, 14:18] = 255
    Image.fromarray(img).save(tmp_path / "b.png")
    Image.fromarray(img).convert("RGB").save(tmp_path / "a.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    x, names = read_inputs(tmp_path, spec)
    assert names == ["a.jpg", "b.png"] and x.shape == (2, 1, 8, 8)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert x[1, 0, 4, 3:5].min() > 0.4 and x[1, 0, :, 0].max() == 0  # the bar stays put
    np.testing.assert_allclose(x[0], x[1], atol=0.02)  # grey JPEG and PNG alike
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(UserError, match="not a readable image"):
        read_inputs(tmp_path / "broken.png", spec)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpcert", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_predict_and_export(trained, tmp_path):
    run_dir, _ = trained
    x = load_digits().x_test[:25]
    np.save(tmp_path / "x.npy", x)
    res = _cli("predict", run_dir, tmp_path / "x.npy", "--output", tmp_path / "p.csv", "--quiet")
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == ("index,name,prediction,radius,top_label,top_votes,runner_up,"
                        "runner_up_votes,p_lower,p_upper")
    cert, pred = load_ensemble(run_dir).certify_with_votes(x)
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[2]) for r in rows] == cert.prediction.tolist()
    assert [int(r[3]) for r in rows] == cert.radius.tolist()
    assert [int(r[5]) for r in rows] == pred.votes.max(1).tolist()
    # export, then predict from the file: the same rows
    res = _cli("export", run_dir, tmp_path / "e.safetensors", "--quiet")
    assert res.returncode == 0 and "sha256" in res.stdout
    res = _cli("predict", tmp_path / "e.safetensors", tmp_path / "x.npy", "--output",
               tmp_path / "q.csv", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "q.csv").read_text() == (tmp_path / "p.csv").read_text()


@pytest.mark.parametrize("bad", ["shape", "corrupt", "missing", "old-run"])
def test_cli_predict_errors_exit_2_without_output(trained, tmp_path, bad):
    run_dir, _ = trained
    target, inputs = run_dir, tmp_path / "x.npy"
    if bad == "shape":
        np.save(inputs, np.zeros((3, 7, 7), np.float32))
    elif bad == "corrupt":
        inputs = tmp_path / "x.png"
        inputs.write_bytes(b"definitely not a png")
    elif bad == "missing":
        inputs = tmp_path / "nothing.npy"
    else:
        np.save(inputs, load_digits().x_test[:2])
        target = tmp_path / "old"
        shutil.copytree(run_dir, target)
        (target / "ensemble.json").unlink()
    res = _cli("predict", target, inputs, "--output", tmp_path / "out.csv")
    assert res.returncode == 2
    assert res.stderr.startswith("dpcert: error:") and "Traceback" not in res.stderr
    assert not (tmp_path / "out.csv").exists()


def test_python_api_names(trained):
    import dpcert

    run_dir, _ = trained
    ens = dpcert.load_ensemble(run_dir)
    assert isinstance(ens.certify(load_digits().x_test[:3]), dpcert.Certificates)
    assert "instances" in repr(ens) or "x" in repr(ens)


def test_png_bytes_decode_like_files(tmp_path):
    from PIL import Image

    from dpcert.learning.inputs import decode_image

    img = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    got = decode_image(buf.getvalue(), InputSpec((1, 8, 8), raw_max=16))
    np.testing.assert_array_equal(got[0], (img / 255.0).astype(np.float32))


def test_baseline_models_are_kept_and_certify_with_their_own_certificate(tmp_path):
    from dpcert.workflows.compare import CompareConfig, compare

    cfg = CompareConfig.from_mapping({
        "dp": {"instances": 4, "steps": 10, "workers": 2},
        "methods": ["dpa", "roe", "fa", "fa-roe", "bagging"],
        "dpa": {"models": 12, "epochs": 3}, "roe": {"models": 12, "epochs": 3},
        "fa": {"models": 6, "spread": 2, "epochs": 3},
        "fa-roe": {"models": 6, "spread": 2, "epochs": 3},
        "bagging": {"models": 10, "subsample": 120, "epochs": 3}})
    compare(cfg, tmp_path, progress=False)
    x_test = load_digits().x_test
    for folder, csv, certify in (
            ("dpa_k12_epochs3", "certificates.csv", lambda e: e.certify(x_test)),
            ("dpa_k12_epochs3", "certificates_roe.csv", lambda e: e.certify_roe(x_test)),
            ("fa_k6_d2_epochs3", "certificates.csv", lambda e: e.certify(x_test)),
            ("fa_k6_d2_epochs3", "certificates_fa-roe.csv", lambda e: e.certify_roe(x_test)),
            ("bagging_N10_k120_epochs3", "certificates.csv", lambda e: e.certify(x_test))):
        rows = np.loadtxt(tmp_path / folder / csv, delimiter=",", skiprows=1, dtype=np.int64)
        ens = load_ensemble(tmp_path / folder)
        assert ens.info.defence == folder.split("_")[0] and ens.info.mechanism is None
        cert = certify(ens)
        np.testing.assert_array_equal(cert.prediction, rows[:, 1], err_msg=f"{folder} {csv}")
        np.testing.assert_array_equal(cert.radius, rows[:, 2], err_msg=f"{folder} {csv}")
        if folder.startswith("dpa"):
            assert (rows[:, 2] >= 1).mean() > 0.2  # certificates with teeth
    with pytest.raises(UserError, match="takes its own certificate"):
        load_ensemble(tmp_path / "dpa_k12_epochs3").certify(x_test[:2], accounting="rdp")
    # `dpcert predict` on every kind of baseline (a partition's votes have no bounds to print)
    from click.testing import CliRunner

    from dpcert.cli import main

    np.save(tmp_path / "new.npy", x_test[:20])
    for folder in ("dpa_k12_epochs3", "fa_k6_d2_epochs3", "bagging_N10_k120_epochs3"):
        out = tmp_path / f"{folder}.csv"
        res = CliRunner().invoke(main, ["predict", str(tmp_path / folder),
                                        str(tmp_path / "new.npy"), "--output", str(out),
                                        "--quiet"])
        assert res.exit_code == 0, res.output
        rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
        want = np.loadtxt(tmp_path / folder / "certificates.csv", delimiter=",", skiprows=1,
                          dtype=np.int64)[:20]
        assert [int(r[3]) for r in rows] == want[:, 2].tolist()
        if folder.startswith(("dpa", "fa")):
            assert all(r[-2:] == ["", ""] for r in rows)
    # exported, a baseline ensemble certifies the same way
    export_ensemble(tmp_path / "fa_k6_d2_epochs3", tmp_path / "fa.safetensors")
    again = load_ensemble(tmp_path / "fa.safetensors").certify(x_test)
    rows = np.loadtxt(tmp_path / "fa_k6_d2_epochs3" / "certificates.csv", delimiter=",", skiprows=1,
                      dtype=np.int64)
    np.testing.assert_array_equal(again.radius, rows[:, 2])


def test_your_own_feature_vectors_train_certify_and_serve(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 3
    y_train, y_test = rng.integers(0, 3, 600), rng.integers(0, 3, 80)
    x_train = (centres[y_train] + rng.normal(size=(600, 16))).astype(np.float32)
    x_test = (centres[y_test] + rng.normal(size=(80, 16))).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test, train_size=600)
    cfg = RunConfig(dataset="npz", data_dir=str(tmp_path / "mine.npz"), model="linear",
                    optimizer="sgd", lr=0.5, instances=30, steps=100, sample_rate=0.05,
                    noise_multiplier=2.0, eta=0.05, max_radius=20, workers=1)
    run(cfg, tmp_path / "run", progress=False)
    prediction, radius = _certs(tmp_path / "run")
    assert (radius >= 1).mean() > 0.5  # separable clusters: most points certify
    ens = load_ensemble(tmp_path / "run")
    assert ens.info.input.shape is None and ens.info.input.feature_dim == 16
    cert = ens.certify(x_test)
    np.testing.assert_array_equal(cert.radius, radius)
    with pytest.raises(UserError, match=r"feature vectors of shape \(N, 16\)"):
        ens.certify(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(UserError, match="linear model needs feature vectors|feature"):
        RunConfig(model="linear", optimizer="sgd")  # digits images, no feature map
    with pytest.raises(UserError, match="holds feature vectors"):
        run(RunConfig(dataset="npz", data_dir=str(tmp_path / "mine.npz"), instances=2,
                      steps=2), tmp_path / "cnn", progress=False)


def test_scatter_cnn_models_trained_on_translations_reproduce_their_certificates(tmp_path):
    """DPA over small CNNs on ScatterNet maps, each trained on every translation of its own
    part's images: the kept models (family scatter_cnn, fed the feature vectors) certify the
    test set exactly as the comparison did."""
    from dpcert.learning.data import load_dataset_cached
    from dpcert.workflows.compare import CompareConfig, compare

    setting = {"models": 12, "learner": "scatter-cnn", "steps": 40, "lr": 0.003,
               "weight_decay": 0.001, "augment_shift": 1}
    cfg = CompareConfig.from_mapping({
        "dp": {"model": "linear", "features": "scatter", "optimizer": "sgd", "instances": 2,
               "steps": 2, "workers": 1},
        "methods": ["dpa"], "dpa": setting})
    compare(cfg, tmp_path, progress=False)
    folder = tmp_path / ("dpa_k12_learnerscatter-cnn_steps40_lr0.003_weight-decay0.001"
                         "_augment-shift1")
    rows = np.loadtxt(folder / "certificates.csv", delimiter=",", skiprows=1, dtype=np.int64)
    ens = load_ensemble(folder)
    assert ens.info.model == "scatter_cnn"
    cert = ens.certify(load_dataset_cached("digits", None, "scatter").x_test)
    np.testing.assert_array_equal(cert.prediction, rows[:, 1])
    np.testing.assert_array_equal(cert.radius, rows[:, 2])
    assert np.mean(rows[:, 1] == rows[:, 3]) > 0.5 and rows[:, 2].max() >= 2
    # raw images go through the run's feature map first, as for the linear models
    np.testing.assert_array_equal(ens.certify(load_digits().x_test[:20]).radius, rows[:20, 2])


@pytest.mark.parametrize("learner", ["prototype", "prototype-cosine", "nearest-neighbour",
                                     "kernel-ridge"])
def test_prototype_baseline_models_reproduce_their_certificates(tmp_path, learner):
    """A DPA setting with a learner that fits no parameters keeps models whose loaded
    ensemble certifies the test set exactly as the comparison did (which scored them in
    chunks of 50 models, the ensemble in blocks of its own)."""
    from dpcert.learning.data import load_dataset_cached
    from dpcert.workflows.compare import CompareConfig, compare

    cfg = CompareConfig.from_mapping({
        "dp": {"model": "linear", "features": "scatter", "optimizer": "sgd", "instances": 2,
               "steps": 2, "workers": 1},
        "methods": ["dpa"], "dpa": {"models": 60, "learner": learner}})
    compare(cfg, tmp_path, progress=False)
    folder = tmp_path / f"dpa_k60_learner{learner}"
    rows = np.loadtxt(folder / "certificates.csv",
                      delimiter=",", skiprows=1, dtype=np.int64)
    features = load_dataset_cached("digits", None, "scatter").x_test
    cert = load_ensemble(folder).certify(features)
    np.testing.assert_array_equal(cert.prediction, rows[:, 1])
    np.testing.assert_array_equal(cert.radius, rows[:, 2])
    assert rows[:, 2].max() >= 3 and np.mean(rows[:, 1] == rows[:, 3]) > 0.8
