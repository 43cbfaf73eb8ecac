"""`dpcert compare` at small scale on digits, the hash partition and the FA structure."""

from dataclasses import replace

import numpy as np
import pytest

from dpcert.certification import baselines
from dpcert.errors import UserError
from dpcert.workflows.compare import CompareConfig, compare, instance_accuracies
from dpcert.workflows.partition import hash_partition, training_indices
from dpcert.workflows.setting import BaselineConfig


def test_hash_partition_depends_only_on_the_example():
    rng = np.random.default_rng(0)
    x = rng.random((50, 1, 4, 4)).astype(np.float32)
    parts = hash_partition(x, 7)
    assert parts.min() >= 0 and parts.max() < 7
    # removing or adding other examples leaves every example's part unchanged
    np.testing.assert_array_equal(hash_partition(x[10:], 7), parts[10:])
    extra = np.concatenate([x, rng.random((5, 1, 4, 4)).astype(np.float32)])
    np.testing.assert_array_equal(hash_partition(extra, 7)[:50], parts)


def test_fa_training_sets_follow_the_spreading_map():
    """Every example trains exactly the d models its bucket is spread to (so one poisoned
    example reaches d models: the premise of the FA certificate), and d = 1 is DPA."""
    rng = np.random.default_rng(1)
    x = rng.random((300, 1, 3, 3)).astype(np.float32)
    bc = BaselineConfig(models=4, spread=3)
    sets = training_indices("fa", bc, x)
    assert len(sets) == 12
    bucket = hash_partition(x, 12)
    of_bucket = baselines.fa_models_of_bucket(12, baselines.fa_shifts(12, 3))
    for e in range(len(x)):
        models = {j for j, s in enumerate(sets) if e in set(s.tolist())}
        assert models == set(of_bucket[bucket[e]].tolist())
    dpa = training_indices("dpa", BaselineConfig(models=5), x)
    parts = hash_partition(x, 5)
    for j, s in enumerate(dpa):  # listed in the order of their content, not the file's
        np.testing.assert_array_equal(np.sort(s), np.flatnonzero(parts == j))


def test_instance_accuracies_blockwise_from_a_memory_map(tmp_path):
    rng = np.random.default_rng(3)
    scores = rng.random((7, 50, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 50)
    want = (scores.argmax(axis=2) == labels).mean(axis=1)
    np.save(tmp_path / "scores.npy", scores)
    mapped = np.load(tmp_path / "scores.npy", mmap_mode="r")
    for values in (1, 3 * 200, 7 * 200, 2**24):  # 1, 3, 7, all instances per block
        np.testing.assert_array_equal(instance_accuracies(mapped, labels, values), want)


def test_compare_small_digits(tmp_path):
    cfg = CompareConfig.from_mapping({
        "methods": ["dp", "dpa", "fa", "bagging"],
        "dp": {"instances": 4, "steps": 10, "workers": 1},
        "dpa": {"models": 5, "epochs": 1},
        "fa": {"models": 3, "spread": 2, "epochs": 1},
        "bagging": {"models": 5, "subsample": 50, "epochs": 1},
    })
    assert cfg.methods == ("dp", "dpa", "fa", "bagging")
    text = compare(cfg, tmp_path, progress=False)
    for name in ("dp (pld, sound)", "dpa (k=5, epochs=1)", "fa (k=3, d=2, epochs=1)",
                 "bagging (N=5, k=50, epochs=1)",
                 "baseline-DP"):
        assert name in text
    assert (tmp_path / "compare.md").exists() and (tmp_path / "compare.png").exists()
    assert len(list((tmp_path / "dpa_k5_epochs1").glob("model_*.npz"))) == 5
    assert len(list((tmp_path / "fa_k3_d2_epochs1").glob("model_*.npz"))) == 6
    rows = (tmp_path / "fa_k3_d2_epochs1" / "certificates.csv").read_text().splitlines()
    assert rows[0] == "index,prediction,radius,label" and len(rows) == 360
    again = compare(cfg, tmp_path, progress=False)  # reuses every trained unit
    assert again == text
    # an existing run directory is reused as the DP method, not retrained
    units = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dp" / "instances").iterdir()}
    reuse = CompareConfig.from_mapping({"dp_run": str(tmp_path / "dp"), "methods": ["dp"]})
    assert reuse.dp["instances"] == 4 and reuse.dp["steps"] == 10
    reused = compare(reuse, tmp_path / "again", progress=False)
    assert reused.splitlines()[6] == text.splitlines()[6]  # the dp row
    assert {p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "dp" / "instances").iterdir()} == units
    with pytest.raises(UserError, match="other training settings"):
        compare(CompareConfig.from_mapping({"dp_run": str(tmp_path / "dp"), "methods": ["dp"],
                                            "dp": {"steps": 11}}), tmp_path / "x",
                progress=False)
    # other training values are another setting, in their own folder
    other = CompareConfig.from_mapping({"dp": {"instances": 4, "steps": 10, "workers": 1},
                                        "methods": ["dpa"], "dpa": {"models": 5, "epochs": 2}})
    assert "Not read by this comparison" not in text
    other_text = compare(other, tmp_path, progress=False)
    assert "dpa (k=5, epochs=2)" in other_text
    # the first config's folders are left alone but reported, with what removing them frees
    unused = other_text.split("Not read by this comparison")[1]
    for folder in ("dp", "dpa_k5_epochs1", "fa_k3_d2_epochs1", "bagging_N5_k50_epochs1"):
        assert f"`{folder}` (" in unused and (tmp_path / folder).is_dir()
    assert "`dpa_k5_epochs2`" not in unused
    assert len(list((tmp_path / "dpa_k5_epochs2").glob("model_*.npz"))) == 5
    # a setting's folder trained on other data is refused, not silently reused
    seeded = CompareConfig.from_mapping({"dp": {"instances": 4, "steps": 10, "workers": 1,
                                                "seed": 3}, "methods": ["dpa"],
                                         "dpa": {"models": 5, "epochs": 1}})
    with pytest.raises(UserError, match="other settings"):
        compare(seeded, tmp_path, progress=False)


def test_roe_reuses_the_dpa_models(tmp_path):
    from dpcert.workflows.run import read_unit

    base = {"dp": {"instances": 4, "steps": 10, "workers": 1}}
    dpa = compare(CompareConfig.from_mapping({**base, "methods": ["dpa"],
                                              "dpa": {"models": 5, "epochs": 1}}),
                  tmp_path, progress=False)
    units = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dpa_k5_epochs1").glob("model_*")}
    text = compare(CompareConfig.from_mapping({**base, "methods": ["dpa", "roe"],
                                               "dpa": {"models": 5, "epochs": 1},
                                               "roe": {"models": 5, "epochs": 1}}),
                   tmp_path, progress=False)
    assert "roe (k=5, epochs=1)" in text and "dpa (k=5, epochs=1)" in text
    assert "dpa (k=5, epochs=1)" in dpa
    assert {p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "dpa_k5_epochs1").glob("model_*")} == units  # not retrained
    folder = tmp_path / "dpa_k5_epochs1"
    scores = np.stack([read_unit(folder / f"model_{i:06d}.npz") for i in range(5)])
    rows = np.loadtxt(folder / "certificates_roe.csv", delimiter=",", skiprows=1,
                      dtype=np.int64)
    pred, radius = baselines.roe_certificate(scores)
    np.testing.assert_array_equal(rows[:, 1], pred)
    np.testing.assert_array_equal(rows[:, 2], radius)


def test_fa_roe_reuses_the_fa_models(tmp_path):
    from dpcert.workflows.run import read_unit

    base = {"dp": {"instances": 4, "steps": 10, "workers": 1}}
    setting = {"models": 4, "spread": 2, "epochs": 1}
    compare(CompareConfig.from_mapping({**base, "methods": ["fa"], "fa": setting}), tmp_path,
            progress=False)
    folder = tmp_path / "fa_k4_d2_epochs1"
    units = {p.name: p.stat().st_mtime_ns for p in folder.glob("model_*")}
    assert len(units) == 2 * 8  # scores and parameters of k d = 8 models
    text = compare(CompareConfig.from_mapping({**base, "methods": ["fa", "fa-roe"],
                                               "fa": setting, "fa-roe": setting}),
                   tmp_path, progress=False)
    assert "fa-roe (k=4, d=2, epochs=1)" in text and "| fa (k=4, d=2, epochs=1)" in text
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("model_*")} == units
    scores = np.stack([read_unit(folder / f"model_{i:06d}.npz") for i in range(8)])
    rows = np.loadtxt(folder / "certificates_fa-roe.csv", delimiter=",", skiprows=1,
                      dtype=np.int64)
    pred, radius = baselines.fa_roe_certificate(scores, 2)
    np.testing.assert_array_equal(rows[:, 1], pred)
    np.testing.assert_array_equal(rows[:, 2], radius)
    with pytest.raises(UserError, match="spread applies to fa and fa-roe"):
        CompareConfig.from_mapping({**base, "methods": ["roe"],
                                    "roe": {"models": 4, "spread": 2}})


def test_compare_parallel_equals_serial_and_calibrates(tmp_path):
    base = {"instances": 4, "steps": 10}
    settings = [{"models": 2, "epochs": 1}, {"models": 6, "epochs": 1}]
    serial = compare(CompareConfig.from_mapping({"dp": {**base, "workers": 1},
                                                 "methods": ["dpa"], "dpa": settings}),
                     tmp_path / "a", progress=False)
    parallel = compare(CompareConfig.from_mapping({"dp": {**base, "workers": 2},
                                                   "methods": ["dpa"], "dpa": settings}),
                       tmp_path / "b", progress=False)
    assert serial == parallel
    assert "dpa (k=2, epochs=1)" in serial and "dpa (k=6, epochs=1)" in serial
    for i in range(6):
        a = np.load(tmp_path / "a" / "dpa_k6_epochs1" / f"model_{i:06d}.npz")["scores"]
        b = np.load(tmp_path / "b" / "dpa_k6_epochs1" / f"model_{i:06d}.npz")["scores"]
        np.testing.assert_allclose(a, b, atol=1e-5)
    text = compare(CompareConfig.from_mapping({"dp": {**base, "workers": 1}, "dpa": settings,
                                               "methods": ["dp", "dpa"], "calibrate": True}),
                   tmp_path / "a", progress=False)
    table = text.split("Calibration")[0]
    # exactly one setting kept
    assert ("dpa (k=2, epochs=1)" in table) != ("dpa (k=6, epochs=1)" in table)
    assert text.count("| yes |") == 1


@pytest.mark.parametrize("bad", [
    {"colour": 1},
    {"methods": ["dp", "magic"]},
    {"methods": []},
    {"methods": "dp"},
    {"dpa": {"partitions": 3}},
    {"dpa": {"models": 0}},
    {"dpa": {"spread": 2}},
    {"dpa": []},
    {"dpa": [3]},
    {"fa": {"models": 2, "spread": "x"}},
    {"bagging": {"lr": -1}},
    {"calibrate": "yes"},
    {"methods": ["dpa"], "calibrate": True},
    {"dp": [1, 2]},
    {"dp_run": 3},
    {"dp_run": "/nonexistent/run"},
    {"roe": {"spread": 2}},
    {"methods": ["dp", ["roe"]]},
])
def test_compare_config_errors(bad):
    with pytest.raises(UserError):
        CompareConfig.from_mapping({"methods": ["dp", "dpa"], **bad})


def test_a_compare_config_must_say_what_it_compares():
    """A config with a dpa section only once trained a default DP run first, silently."""
    with pytest.raises(UserError, match=r"must say what it compares: add methods: .* "
                                        r"\(sections found: dp, dpa\)"):
        CompareConfig.from_mapping({"dp": {"instances": 4}, "dpa": {"models": 5}})


def test_setting_folders_and_identity_keep_old_folders_valid():
    plain = BaselineConfig(models=5, epochs=1)
    assert plain.folder("dpa") == "dpa_k5_epochs1" and plain.name("dpa") == "dpa (k=5, epochs=1)"
    assert BaselineConfig(models=5).folder("dpa") == "dpa_k5"
    assert "learner" not in BaselineConfig(models=5).identity()  # as before the option
    proto = BaselineConfig(models=5, learner="prototype", epochs=3)
    assert proto.folder("dpa") == "dpa_k5_learnerprototype"  # epochs do not matter to it
    assert BaselineConfig(models=5, learner="prototype-cosine").name("roe") == \
        "roe (k=5, learner=prototype-cosine)"
    full = BaselineConfig(models=5, learner="full-batch", steps=50, weight_decay=1e-4)
    assert full.name("fa") == "fa (k=5, d=1, learner=full-batch, steps=50, weight_decay=0.0001)"
    with pytest.raises(UserError, match="learner"):
        BaselineConfig(learner="svm")


def test_prototype_learner_is_the_nearest_class_mean():
    from dpcert.learning.reference import prototype_params

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.choice([0, 2, 3], size=40)  # label 1 absent
    params = prototype_params(x, y, 4)
    test = rng.normal(size=(200, 6)).astype(np.float32) * 2
    pred = np.argmax(test @ params["weight"] + params["bias"], axis=1)
    means = np.stack([x[y == c].mean(axis=0) if np.any(y == c) else np.full(6, np.inf)
                      for c in range(4)])
    dist = ((test[:, None, :] - means[None]) ** 2).sum(axis=2)
    np.testing.assert_array_equal(pred, np.argmin(dist, axis=1))
    assert 1 not in pred
    # by angle: the label whose mean makes the smallest angle with the input
    params = prototype_params(x, y, 4, metric="cosine")
    pred = np.argmax(test @ params["weight"] + params["bias"], axis=1)
    present = np.isfinite(means[:, 0])
    unit = np.where(present[:, None], means, 0) / np.linalg.norm(
        np.where(present[:, None], means, 1), axis=1, keepdims=True)
    cos = (test @ unit.T) / np.linalg.norm(test, axis=1, keepdims=True)
    np.testing.assert_array_equal(pred, np.argmax(np.where(present, cos, -np.inf), axis=1))
    assert 1 not in pred and len(set(pred)) == 3
    with pytest.raises(UserError, match="metric"):
        prototype_params(x, y, 4, metric="manhattan")


def test_translations_move_every_pixel_by_every_offset():
    from dpcert.learning.reference import translations

    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 6, 5)).astype(np.float32)
    t = translations(x, 2)
    assert t.shape == (25 * 3, 2, 6, 5)
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for k, (dy, dx) in enumerate(offsets):
        block = t[3 * k:3 * k + 3]
        for i in range(6):
            for j in range(5):
                si, sj = i - dy, j - dx
                want = x[:, :, si, sj] if 0 <= si < 6 and 0 <= sj < 5 else 0
                np.testing.assert_array_equal(block[:, :, i, j], want)
    np.testing.assert_array_equal(translations(x, 0), x)
    with pytest.raises(UserError, match="translation"):
        translations(x, 5)


def test_scatter_cnn_reads_the_maps_of_any_scatternet_input():
    import torch

    from dpcert.learning.models import build_model, scatter_grid

    # digits (8x8 grey), MNIST (28x28 grey), CIFAR-10 (32x32 RGB)
    for dim, grid in ((324, (81, 2)), (3969, (81, 7)), (15552, (243, 8))):
        assert scatter_grid(dim) == grid
        assert build_model("scatter_cnn", dim, 10)(torch.zeros(2, dim)).shape == (2, 10)
    with pytest.raises(UserError, match="ScatterNet maps"):
        scatter_grid(100)
    with pytest.raises(UserError, match="gradient"):
        BaselineConfig(learner="prototype", augment_shift=1)
    with pytest.raises(UserError, match="augment_shift"):
        BaselineConfig(learner="full-batch", augment_shift=-1)
    cnn = BaselineConfig(models=5, learner="scatter-cnn", steps=50, augment_shift=2)
    assert cnn.name("dpa") == "dpa (k=5, learner=scatter-cnn, steps=50, augment_shift=2)"
    assert cnn.folder("dpa") == "dpa_k5_learnerscatter-cnn_steps50_augment-shift2"
    assert "augment_shift" not in BaselineConfig(models=5).identity()


def test_scatter_cnn_learner_needs_scatternet_features(tmp_path):
    from dpcert.workflows.compare import CompareConfig, compare

    cfg = CompareConfig.from_mapping({"dp": {"instances": 2, "steps": 2}, "methods": ["dpa"],
                                      "dpa": {"models": 3, "learner": "scatter-cnn"}})
    with pytest.raises(UserError, match="ScatterNet maps"):
        compare(cfg, tmp_path, progress=False)


def test_nearest_neighbour_learner_answers_the_label_of_the_nearest_example():
    import torch

    from dpcert.learning.inference import NEAREST, score_instances
    from dpcert.learning.reference import nearest_neighbour_params

    rng = np.random.default_rng(1)
    parts = [(rng.normal(size=(n, 640)).astype(np.float32), rng.choice([0, 2, 3], size=n))
             for n in (7, 1, 0)]  # label 1 never present; the last model has no examples
    params = [nearest_neighbour_params(x, y, rows=9) for x, y in parts]
    stacked = {k: torch.from_numpy(np.stack([p[k] for p in params])) for k in params[0]}
    test = rng.normal(size=(300, 640)).astype(np.float32) * 2
    scores = score_instances(NEAREST, stacked, torch.from_numpy(test), in_channels=640,
                             num_classes=4)
    assert scores.shape == (3, 300, 4)
    np.testing.assert_allclose(scores.sum(axis=2), 1, rtol=1e-5)
    for (x, y), s in zip(parts[:2], scores[:2], strict=True):
        nearest = np.argmin(((test[:, None, :] - x[None]) ** 2).sum(axis=2), axis=1)
        np.testing.assert_array_equal(s.argmax(axis=1), y[nearest])
        assert np.all(s[:, 1] == 0)  # an absent label has probability 0
    assert np.all(scores[2].argmax(axis=1) == 0)  # no examples: label 0, the empty part's vote
    # The padding (set by the largest part, which poisoning another part can change) does not
    # move a single bit of any model's scores.
    wider = [nearest_neighbour_params(x, y, rows=301) for x, y in parts]
    stacked = {k: torch.from_numpy(np.stack([p[k] for p in wider])) for k in wider[0]}
    np.testing.assert_array_equal(
        score_instances(NEAREST, stacked, torch.from_numpy(test), in_channels=640,
                        num_classes=4), scores)
    with pytest.raises(UserError, match="rows"):
        nearest_neighbour_params(parts[0][0], parts[0][1], rows=3)


def test_kernel_ridge_learner_is_scikit_learns_kernel_ridge():
    import torch
    from sklearn.kernel_ridge import KernelRidge

    from dpcert.learning.inference import KERNEL, score_instances, stack_params
    from dpcert.learning.reference import KERNEL_SCALE, kernel_ridge_params

    def scores_of(models, test):
        stacked = {k: torch.from_numpy(v) for k, v in stack_params(models).items()}
        return score_instances(KERNEL, stacked, torch.from_numpy(test), in_channels=64,
                               num_classes=4)

    rng = np.random.default_rng(2)
    parts = [(rng.normal(size=(n, 64)).astype(np.float32) / 8, rng.choice([0, 2, 3], size=n))
             for n in (12, 1, 0)]  # label 1 never present; the last model has no examples
    params = [kernel_ridge_params(x, y, 4, rows=13, gamma=0.7, ridge=0.05) for x, y in parts]
    test = rng.normal(size=(300, 64)).astype(np.float32) / 8
    scores = scores_of(params, test)
    assert scores.shape == (3, 300, 4)
    np.testing.assert_allclose(scores.sum(axis=2), 1, rtol=1e-5)
    for (x, y), s in zip(parts[:2], scores[:2], strict=True):
        fitted = KernelRidge(alpha=0.05, kernel="rbf", gamma=0.7).fit(
            x.astype(np.float64), np.eye(4)[y])
        want = fitted.predict(test.astype(np.float64))
        np.testing.assert_array_equal(s.argmax(axis=1), want.argmax(axis=1))
        # the logits are the regression outputs scaled: their differences match
        logit = np.log(s)
        np.testing.assert_allclose(logit - logit[:, :1], KERNEL_SCALE * (want - want[:, :1]),
                                   atol=2e-3)
    assert np.all(scores[2].argmax(axis=1) == 0)  # no examples: label 0, the empty part's vote
    # Padding rows (their number set by the largest part, which poisoning another part can
    # change) leave every bit of every model's scores as it was.
    wider = [kernel_ridge_params(x, y, 4, rows=301, gamma=0.7, ridge=0.05) for x, y in parts]
    np.testing.assert_array_equal(scores_of(wider, test), scores)
    # the model is a function of its part as a set: listing it in another order changes no bit
    x, y = parts[0]
    flip = np.arange(len(y))[::-1]
    reordered = [kernel_ridge_params(x[flip], y[flip], 4, rows=13, gamma=0.7, ridge=0.05),
                 *params[1:]]
    np.testing.assert_array_equal(scores_of(reordered, test), scores)
    with pytest.raises(UserError, match="rows"):
        kernel_ridge_params(parts[0][0], parts[0][1], 4, rows=3, gamma=0.7, ridge=0.05)
    with pytest.raises(UserError, match="ridge"):
        kernel_ridge_params(parts[0][0], parts[0][1], 4, rows=13, gamma=0.7, ridge=0)


def test_kernel_ridge_setting_names_its_kernel():
    default = BaselineConfig(models=5, learner="kernel-ridge", lr=0.5)
    assert default.name("dpa") == "dpa (k=5, learner=kernel-ridge)"  # lr is not read
    assert default.folder("dpa") == "dpa_k5_learnerkernel-ridge"
    wide = BaselineConfig(models=5, learner="kernel-ridge", gamma=1.0, ridge=0.01)
    assert wide.name("roe") == "roe (k=5, learner=kernel-ridge, gamma=1.0, ridge=0.01)"
    assert wide.folder("dpa") == "dpa_k5_learnerkernel-ridge_gamma1.0_ridge0.01"
    assert "gamma" not in BaselineConfig(models=5).identity()
    for bad in ({"gamma": 0}, {"ridge": -1.0}, {"gamma": float("nan")}, {"ridge": "x"},
                {"gamma": True}):
        with pytest.raises(UserError, match="must be a number > 0"):
            BaselineConfig(learner="kernel-ridge", **bad)
    with pytest.raises(UserError, match="gradient"):
        BaselineConfig(learner="kernel-ridge", augment_shift=1)


def test_choice_and_envelope_by_hand():
    from dpcert.workflows.tuning import choose, envelope

    val = {"a": np.array([0.9, 0.5, 0.0, 0.0]), "b": np.array([0.8, 0.6, 0.3, 0.0])}
    c = choose(val)
    assert c.best == "b"  # mean 0.425 vs 0.35
    assert list(c.per_radius) == ["a", "b", "b", "b"]  # r = 3: nobody certifies -> best
    test = {"a": np.array([0.7, 0.1, 0.0, 0.0]), "b": np.array([0.75, 0.4, 0.2, 0.05])}
    np.testing.assert_allclose(envelope(c.per_radius, test)(np.array([0, 1, 2, 3])),
                               [0.7, 0.4, 0.2, 0.05])  # validation's pick, not test's best
    # beyond the tuned radii the last pick; beyond the test curves (the radius cap) nothing
    np.testing.assert_allclose(envelope(c.per_radius, test)(np.array([3, 4, 9])), [0.05, 0, 0])


def test_tuning_protocol_never_reads_the_test_set(tmp_path, monkeypatch):
    """Choices depend on the training set only: with the test set scrambled, tuning.md is
    the same; only the final certification (compare.md) sees the change. The validation
    certificates are on the last N training examples."""
    from dpcert.learning import data as data_mod

    cfg_values = {
        "dp": {"instances": 4, "steps": 10, "workers": 1, "max_radius": 20},
        "dp_grid": [{"noise_multiplier": 2.0}, {"noise_multiplier": 4.0}],
        "dpa": [{"models": 5, "epochs": 1}, {"models": 5, "learner": "full-batch",
                                             "steps": 20}],
        "validation": 300, "tune_radius": 5, "methods": ["dp", "dpa"]}
    cfg = CompareConfig.from_mapping(cfg_values)
    first = compare(cfg, tmp_path / "a", progress=False)
    real = data_mod.load_dataset_cached("digits")
    rows = np.loadtxt(tmp_path / "a" / "validation" / "dpa_k5_epochs1" / "certificates.csv",
                      delimiter=",", skiprows=1, dtype=np.int64)
    np.testing.assert_array_equal(rows[:, 3], real.y_train[-300:])
    rng = np.random.default_rng(1)
    scrambled = replace(real, x_test=rng.permutation(real.x_test),
                        y_test=rng.permutation(real.y_test))
    monkeypatch.setattr(data_mod, "load_dataset_cached", lambda *a, **k: scrambled)
    second = compare(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "tuning.md").read_text() == (tmp_path / "b" / "tuning.md").read_text()
    assert first != second
    assert "dpa envelope" in first and "envelope of all defences" in first
    assert "Protocol: every setting was trained on the first 1138" in first
    assert "Not read by this comparison" not in first
    # dropping a setting from the config: its validation folder is reported as unused
    dropped = BaselineConfig(models=5, learner="full-batch", steps=20).folder("dpa")
    fewer = CompareConfig.from_mapping({**cfg_values,
                                        "dpa": [{"models": 5, "epochs": 1}]})
    third = compare(fewer, tmp_path / "a", progress=False)
    assert f"`validation/{dropped}` (" in third.split("Not read by this comparison")[1]


def _record_reads(monkeypatch, root) -> list[str]:
    """The folders (relative to root) whose models compare reads, in order."""
    import dpcert.workflows.compare as compare_mod

    reads: list[str] = []
    real = compare_mod.train_models
    monkeypatch.setattr(compare_mod, "train_models",
                        lambda kind, bc, run_cfg, x, folder, progress:
                        reads.append(folder.relative_to(root).as_posix())
                        or real(kind, bc, run_cfg, x, folder, progress))
    return reads


def _report_defences(text: str) -> list[str]:
    """The partition defences of a report's rows, in the order they appear."""
    rows = [line.split(" | ")[0].lstrip("| ").split(" (")[0]
            for line in text.splitlines() if line.startswith("| ") and "(" in line]
    return [r for r in rows if r in ("dpa", "fa", "roe", "fa-roe")]


def test_a_run_off_shares_one_reading_of_its_models(tmp_path, monkeypatch):
    """ROE after DPA on the same models, FA + ROE after FA: each folder's models are read
    (and verified) once per phase, whatever order the config lists the defences in, and the
    report keeps the defences in their usual order."""
    reads = _record_reads(monkeypatch, tmp_path)
    dpa = [{"models": 4, "epochs": 1}, {"models": 6, "epochs": 1}]
    fa = {"models": 3, "spread": 2, "epochs": 1}
    cfg = CompareConfig.from_mapping({
        "dp": {"instances": 4, "steps": 10, "workers": 1, "max_radius": 10},
        "methods": ["fa-roe", "roe", "dpa", "fa"], "dpa": dpa, "roe": dpa, "fa": fa,
        "fa-roe": fa, "validation": 300, "tune_radius": 5})
    text = compare(cfg, tmp_path, progress=False)
    val = [r for r in reads if r.startswith("validation/")]
    assert sorted(val) == sorted(f"validation/{f}" for f in
                                 ("dpa_k4_epochs1", "dpa_k6_epochs1", "fa_k3_d2_epochs1"))
    assert len(reads) - len(val) == len(set(reads) - set(val))  # test phase: once each too
    kinds = _report_defences(text)
    assert kinds == sorted(kinds, key=["dpa", "fa", "roe", "fa-roe"].index) and kinds
    tuning = (tmp_path / "tuning.md").read_text()
    assert tuning.index("| dpa |") < tuning.index("| fa |") < tuning.index("| roe |") \
        < tuning.index("| fa-roe |")


def test_without_tuning_a_run_off_shares_one_reading_too(tmp_path, monkeypatch):
    """The plain comparison (no validation split) also reads each folder's models once, and
    reports the defences in their usual order."""
    reads = _record_reads(monkeypatch, tmp_path)
    dpa = [{"models": 4, "epochs": 1}]
    fa = {"models": 3, "spread": 2, "epochs": 1}
    cfg = CompareConfig.from_mapping({
        "dp": {"instances": 4, "steps": 10, "workers": 1, "max_radius": 10},
        "methods": ["fa-roe", "roe", "dpa", "fa"], "dpa": dpa, "roe": dpa, "fa": fa,
        "fa-roe": fa})
    text = compare(cfg, tmp_path, progress=False)
    assert sorted(reads) == ["dpa_k4_epochs1", "fa_k3_d2_epochs1"]
    assert _report_defences(text) == ["dpa", "fa", "roe", "fa-roe"]
