"""The stacked training engine: clipped sums, the clipping bound, per-instance determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dpcert.learning import philox, stacked
from dpcert.learning.models import build_model


def _gn_model() -> nn.Module:  # not ghost-compatible (GroupNorm): takes the vmap path
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10))


def _strided_model() -> nn.Module:  # strides, asymmetric kernels and padding, no biases
    return nn.Sequential(nn.Conv2d(1, 3, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
                         nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 1 * 3, 10, bias=False))


MODELS = {"lenet5": (lambda: build_model("lenet5", 1, 10), 28),
          "digits_cnn": (lambda: build_model("digits_cnn", 1, 10), 8),
          "strided": (_strided_model, 8),
          "groupnorm": (_gn_model, 8)}


def _data(side: int, n: int = 120, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, side, side, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _reference_sum(model: nn.Module, x, y, clip: float) -> dict[str, torch.Tensor]:
    """Clipped sum from one autograd call per example (the definition)."""
    return _reference_mean_of_copies_sum(model, x[:, None], y, clip)


def _instance(st: stacked.Stacked, model_fn, k: int) -> nn.Module:
    model = model_fn()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(st.params[name][k])
    return model


@pytest.mark.parametrize("impl", ["grouped", "patches", "vmap"])
@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_equals_per_example_autograd(name, impl, monkeypatch):
    monkeypatch.setattr(stacked, "CONV_IMPL", impl)
    model_fn, side = MODELS[name]
    x, y = _data(side)
    st = stacked.init_stacked(model_fn, 3, [0, 1, 2], torch.device("cpu"))
    index, mask = philox.poisson_positions(philox.instance_keys(3, [0, 1, 2], "cpu"), 0,
                                           len(y), 0.1)
    assert not mask.all()  # batches of different sizes: padding is exercised
    clip = 0.5
    got = stacked.clipped_gradient_sum(st, x, y, index, mask, clip)
    for k in range(3):
        rows = index[k][mask[k]]
        ref = _reference_sum(_instance(st, model_fn, k), x[rows], y[rows], clip)
        for key, value in ref.items():
            torch.testing.assert_close(got[key][k], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "patches"])
@pytest.mark.parametrize("name", list(MODELS))
def test_one_example_moves_each_instance_sum_by_at_most_c(name, impl, monkeypatch):
    monkeypatch.setattr(stacked, "CONV_IMPL", impl)
    model_fn, side = MODELS[name]
    x, y = _data(side, n=40, seed=1)
    st = stacked.init_stacked(model_fn, 0, [0, 1], torch.device("cpu"))
    index = torch.arange(40).expand(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    clip = 0.3
    a = stacked.clipped_gradient_sum(st, x, y, index, mask, clip)
    x2, y2 = x.clone(), y.clone()
    x2[5] = 50.0 * torch.randn(x2[5].shape)  # a wild replacement: its gradient is huge
    y2[5] = (y2[5] + 3) % 10
    b = stacked.clipped_gradient_sum(st, x2, y2, index, mask, clip)
    for k in range(2):
        diff = torch.sqrt(sum((a[n][k] - b[n][k]).pow(2).sum() for n in a))
        assert 0 < float(diff) <= 2 * clip + 1e-5  # replace = remove (<= C) + add (<= C)
    mask2 = mask.clone()
    mask2[:, 5] = False  # removal of one example moves the sum by at most C
    c = stacked.clipped_gradient_sum(st, x, y, index, mask2, clip)
    for k in range(2):
        diff = torch.sqrt(sum((a[n][k] - c[n][k]).pow(2).sum() for n in a))
        assert 0 < float(diff) <= clip + 1e-5


def _reference_mean_of_copies_sum(model: nn.Module, copies: torch.Tensor, y, clip: float
                                  ) -> dict[str, torch.Tensor]:
    """The definition with augmentation multiplicity: example i's gradient is the mean of
    one autograd gradient per copy (copies (B, M, ...)), clipped, summed."""
    out = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for xs, yi in zip(copies, y, strict=True):
        per = [torch.autograd.grad(nn.functional.cross_entropy(model(xc[None]), yi[None]),
                                   list(model.parameters())) for xc in xs]
        mean = [sum(gs) / len(per) for gs in zip(*per, strict=True)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in mean))
        for (k, _), g in zip(model.named_parameters(), mean, strict=True):
            out[k] += g * min(1.0, clip / float(norm))
    return out


@pytest.mark.parametrize("impl", ["grouped", "patches", "vmap"])
@pytest.mark.parametrize("name", list(MODELS))
def test_augmented_clipped_sum_clips_the_mean_of_each_examples_copies(name, impl, monkeypatch):
    monkeypatch.setattr(stacked, "CONV_IMPL", impl)
    model_fn, side = MODELS[name]
    x, y = _data(side, n=60)
    keys = philox.instance_keys(3, [0, 1], "cpu")
    st = stacked.init_stacked(model_fn, 3, [0, 1], torch.device("cpu"))
    index, mask = philox.poisson_positions(keys, 2, len(y), 0.1)
    aug = stacked.Augmentation(shift=2, copies=3)
    clip = 0.5
    got = stacked.clipped_gradient_sum(st, x, y, index, mask, clip, aug, keys, step=2)
    copies = stacked.shifted_copies(x[index], keys, 2, aug)  # (K, W M, ...)
    for k in range(2):
        per_slot = copies[k].view(index.shape[1], 3, *x.shape[1:])[mask[k]]
        ref = _reference_mean_of_copies_sum(_instance(st, model_fn, k), per_slot,
                                            y[index[k][mask[k]]], clip)
        for key, value in ref.items():
            torch.testing.assert_close(got[key][k], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "patches", "vmap"])
def test_augmented_example_moves_the_sum_by_at_most_c(impl, monkeypatch):
    # all M copies of an example are one example's contribution: removing it (its slot
    # masked; the other slots keep their copies) moves the sum by <= C, replacing it by 2C
    monkeypatch.setattr(stacked, "CONV_IMPL", impl)
    model_fn, side = MODELS["lenet5"]
    x, y = _data(side, n=30, seed=1)
    keys = philox.instance_keys(0, [0, 1], "cpu")
    st = stacked.init_stacked(model_fn, 0, [0, 1], torch.device("cpu"))
    index = torch.arange(30).expand(2, 30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    aug, clip = stacked.Augmentation(shift=3, copies=4), 0.3
    a = stacked.clipped_gradient_sum(st, x, y, index, mask, clip, aug, keys, 7)
    x2, y2 = x.clone(), y.clone()
    x2[5] = 50.0 * torch.randn(x2[5].shape)
    y2[5] = (y2[5] + 3) % 10
    b = stacked.clipped_gradient_sum(st, x2, y2, index, mask, clip, aug, keys, 7)
    mask2 = mask.clone()
    mask2[:, 5] = False
    c = stacked.clipped_gradient_sum(st, x, y, index, mask2, clip, aug, keys, 7)
    for k in range(2):
        replace = torch.sqrt(sum((a[n][k] - b[n][k]).pow(2).sum() for n in a))
        remove = torch.sqrt(sum((a[n][k] - c[n][k]).pow(2).sum() for n in a))
        assert 0 < float(replace) <= 2 * clip + 1e-5
        assert 0 < float(remove) <= clip + 1e-5
    # a wild example's mean gradient is far above C: its removal moves the sum by C itself
    d = stacked.clipped_gradient_sum(st, x2, y2, index, mask2, clip, aug, keys, 7)
    assert abs(float(torch.sqrt(sum((b[n][0] - d[n][0]).pow(2).sum() for n in b))) - clip) < 1e-4


@pytest.mark.parametrize("method", ["backward_cl", "backward", "ghost"])
@pytest.mark.parametrize("layer", [
    nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0),
                                             bias=False),
    nn.Conv2d(16, 8, 3, stride=2)], ids=["lenet-like", "strided", "wide"])
def test_every_weight_gradient_method_gives_each_examples_own_gradient(layer, method,
                                                                        monkeypatch):
    # the grouped layout's per-example weight gradients, whichever method the shape rule picks
    monkeypatch.setattr(stacked, "CONV_IMPL", "grouped")
    monkeypatch.setattr(stacked, "_weight_grad_method", lambda *_: method)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, layer.in_channels, 11, 9, generator=gen)
    g = torch.randn(2, 3, *layer(a[0]).shape[1:], generator=gen)
    got = stacked._conv_weight_grads(layer, a, g)
    for k in range(2):
        for b in range(3):
            w = layer.weight.detach().clone().requires_grad_(True)
            out = nn.functional.conv2d(a[k, b:b + 1], w, None, layer.stride, layer.padding)
            (want,) = torch.autograd.grad(out, w, g[k, b:b + 1])
            torch.testing.assert_close(got[k, b], want.flatten(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("layer", "shape"), [
    (nn.AvgPool2d(2), (3, 4, 28, 28)), (nn.AvgPool2d(3), (2, 3, 10, 11)),
    (nn.AvgPool2d((2, 3)), (2, 3, 9, 9)), (nn.AvgPool2d(2, stride=1), (2, 3, 6, 6)),
    (nn.AvgPool2d(2, padding=1), (2, 3, 6, 6)), (nn.AvgPool2d(2, ceil_mode=True), (2, 3, 5, 5)),
    (nn.MaxPool2d(2), (2, 3, 6, 6))])
def test_stacked_forward_pools_like_torch(layer, shape):
    # the tiling fast path (or torch's layer where it does not apply): values and gradients
    h = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast = stacked._tiling_avg_pool(layer, h)
    tiles = isinstance(layer, nn.AvgPool2d) and layer.stride == layer.kernel_size \
        and layer.padding == 0 and not layer.ceil_mode
    assert (fast is not None) == tiles
    if fast is None:
        return
    g = torch.randn_like(fast)
    torch.testing.assert_close(fast, layer(h), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(fast, h, g)[0],
                               torch.autograd.grad(layer(h), h, g)[0], rtol=1e-12, atol=1e-12)


def test_shifted_copies_are_translations_uniform_over_offsets():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 50, 1, 9, 9, generator=gen) + 1.0  # > 0 everywhere: zero fill is visible
    keys = philox.instance_keys(1, [0, 1], "cpu")
    aug = stacked.Augmentation(shift=2, copies=8)
    out = stacked.shifted_copies(x, keys, 3, aug).view(2, 50, 8, 1, 9, 9)
    counts = {}
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for k in range(2):
        for j in range(50):
            for m in range(8):
                hits = [(dy, dx) for dy in range(5) for dx in range(5)
                        if torch.equal(out[k, j, m], padded[k, j, :, dy:dy + 9, dx:dx + 9])]
                assert len(hits) == 1  # exactly one translation of its own slot's example
                counts[hits[0]] = counts.get(hits[0], 0) + 1
    assert len(counts) == 25  # all (2 s + 1)^2 offsets occur, about equally often
    from scipy import stats

    assert stats.chisquare(list(counts.values())).pvalue > 1e-3
    # a slot's copies do not depend on the batch width (companions) or on the other slots
    wide = stacked.shifted_copies(torch.cat([x, x], dim=1), keys, 3, aug).view(2, 100, 8, 1, 9, 9)
    assert torch.equal(wide[:, :50], out)
    assert not torch.equal(stacked.shifted_copies(x, keys, 4, aug).view(out.shape), out)


def test_augmented_instance_is_the_same_model_whatever_trains_beside_it():
    model_fn, side = MODELS["digits_cnn"]
    x, y = _data(side, n=200)
    cfg = stacked.DpSgd(0.05, 1.0, 10, 1.0, 0.05, augment_shift=1, augment_copies=2,
                        declared_size=len(y))
    together = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[0, 1, 2])
    alone = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[2])
    plain = stacked.train_stacked(stacked.DpSgd(0.05, 1.0, 10, 1.0, 0.05,
                                                declared_size=len(y)), model_fn, x, y,
                                  seed=4, instances=[2])
    for name, p in together.params.items():
        torch.testing.assert_close(p[2], alone.params[name][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain.params["0.weight"][0], alone.params["0.weight"][0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_instance_is_the_same_model_whatever_trains_beside_it(optimizer):
    model_fn, side = MODELS["digits_cnn"]
    x, y = _data(side, n=200)
    cfg = stacked.DpSgd(0.05, 1.0, 15, 1.0, 0.05, optimizer, declared_size=len(y))
    together = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[0, 1, 2, 3])
    pair = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[3, 1])
    alone = stacked.train_stacked(cfg, model_fn, x, y, seed=4, instances=[1])
    for name, p in together.params.items():
        torch.testing.assert_close(p[1], alone.params[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p[3], pair.params[name][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together.params["0.weight"][0], together.params["0.weight"][1])
    s_all = stacked.predict_stacked(together, x[:50])
    s_one = stacked.predict_stacked(alone, x[:50])
    np.testing.assert_allclose(s_all[1], s_one[0], atol=1e-4)
    assert np.array_equal(s_all[1].argmax(1), s_one[0].argmax(1))
    other = stacked.train_stacked(cfg, model_fn, x, y, seed=5, instances=[1])
    assert not torch.allclose(other.params["0.weight"][0], alone.params["0.weight"][0])


def test_every_convolution_layout_trains_the_same_instances(monkeypatch):
    model_fn, side = MODELS["lenet5"]
    x, y = _data(side, n=150)
    cfg = stacked.DpSgd(0.1, 1.0, 4, 1.0, 0.05, declared_size=len(y))
    runs = {}
    for impl in ("grouped", "patches", "vmap"):
        monkeypatch.setattr(stacked, "CONV_IMPL", impl)
        runs[impl] = stacked.train_stacked(cfg, model_fn, x, y, seed=2, instances=[0, 1])
    for other in ("patches", "vmap"):
        for name, p in runs["grouped"].params.items():
            torch.testing.assert_close(p, runs[other].params[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stacked.predict_stacked(runs[other], x[:20]),
                                   stacked.predict_stacked(runs["grouped"], x[:20]), atol=1e-5)
    monkeypatch.setattr(stacked, "CONV_IMPL", "fast")
    from dpcert.errors import UserError

    with pytest.raises(UserError, match="DPCERT_CONV_IMPL"):
        stacked.train_stacked(cfg, model_fn, x, y, seed=2, instances=[0])


def test_vmap_path_trains_like_the_ghost_path():
    model_fn, side = MODELS["digits_cnn"]
    x, y = _data(side, n=150)
    cfg = stacked.DpSgd(0.1, 1.0, 5, 1.0, 0.05, declared_size=len(y))
    ghost_run = stacked.train_stacked(cfg, model_fn, x, y, seed=2, instances=[0, 1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacked.ghost, "supports", lambda model: False)
        vmap_run = stacked.train_stacked(cfg, model_fn, x, y, seed=2, instances=[0, 1])
        scores = stacked.predict_stacked(vmap_run, x[:20])
    for name, p in ghost_run.params.items():
        torch.testing.assert_close(p, vmap_run.params[name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, stacked.predict_stacked(ghost_run, x[:20]), atol=1e-5)


def test_subset_training_ignores_examples_outside_the_subset():
    model_fn, side = MODELS["digits_cnn"]
    x, y = _data(side, n=200)
    cfg = stacked.DpSgd(0.1, 1.0, 8, 1.0, 0.05, subset_size=50, declared_size=len(y))
    rows = stacked._subset_rows(philox.instance_keys(6, [0], "cpu"), 200, 50)[0]
    assert len(torch.unique(rows)) == 50
    outside = np.setdiff1d(np.arange(200), rows.numpy())
    x2, y2 = x.clone(), y.clone()
    x2[outside] = -x2[outside]
    y2[outside] = (y2[outside] + 1) % 10
    a = stacked.train_stacked(cfg, model_fn, x, y, seed=6, instances=[0])
    b = stacked.train_stacked(cfg, model_fn, x2, y2, seed=6, instances=[0])
    for name, p in a.params.items():
        torch.testing.assert_close(p, b.params[name])
    x2[rows] = -x2[rows]  # the examples inside the subset do matter
    c = stacked.train_stacked(cfg, model_fn, x2, y2, seed=6, instances=[0])
    assert not torch.allclose(a.params["0.weight"], c.params["0.weight"])


def test_learns_digits():
    from dpcert.learning.data import load_dataset

    data = load_dataset("digits")
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    cfg = stacked.DpSgd(0.05, 0.5, 150, 1.0, 0.01, "adam", declared_size=len(y))
    st = stacked.train_stacked(cfg, MODELS["digits_cnn"][0], x, y, seed=0, instances=[0, 1])
    scores = stacked.predict_stacked(st, torch.tensor(data.x_test))
    assert scores.shape == (2, len(data.y_test), 10)
    np.testing.assert_allclose(scores.sum(2), 1.0, atol=1e-5)
    assert (scores.argmax(2) == data.y_test).mean(1).min() > 0.7


def test_library_entry_point_trains_any_model_and_records_the_mechanism():
    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    x, y = _data(8, n=300)
    scores, record = stacked.train_ensemble(
        model_fn, x.numpy(), y.numpy(), x[:40].numpy(), instances=5, sample_rate=0.05,
        noise_multiplier=1.5, steps=12, clip_norm=1.0, seed=3, batch_instances=2,
        declared_size=len(y))
    assert scores.shape == (5, 40, 10) and scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(2), 1.0, atol=1e-5)
    assert (record.sample_rate, record.noise_multiplier, record.steps, record.clip_norm,
            record.dataset_size, record.sampling) == (0.05, 1.5, 12, 1.0, 300, "poisson")
    alone = stacked.train_stacked(stacked.DpSgd(0.05, 1.5, 12, 1.0, 0.1,
                                                declared_size=len(y)), model_fn, x, y,
                                  seed=3, instances=[4])
    np.testing.assert_allclose(scores[4], stacked.predict_stacked(alone, x[:40])[0], atol=1e-5)


@pytest.mark.parametrize("bad", [
    dict(instances=0), dict(optimizer="rmsprop"), dict(batch_instances=0),
    dict(y=np.zeros(299, np.int64)), dict(y=np.full(300, 0.5)), dict(sample_rate=2.0),
    dict(x_eval=np.zeros((4, 1, 9, 9), np.float32)), dict(declared_size=None),
    dict(declared_size=0),
    dict(model_fn=lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                        nn.Linear(4 * 6 * 6, 10))),
])
def test_library_entry_point_rejects_bad_input(bad):
    from dpcert.errors import UserError

    x, y = _data(8, n=300)
    args = dict(x=x.numpy(), y=y.numpy(), x_eval=x[:4].numpy(), instances=2, sample_rate=0.05,
                noise_multiplier=1.0, steps=2, clip_norm=1.0, declared_size=300)
    args.update(bad)
    model_fn = args.pop("model_fn", MODELS["digits_cnn"][0])
    with pytest.raises(UserError):
        stacked.train_ensemble(model_fn, args.pop("x"), args.pop("y"), args.pop("x_eval"),
                               **args)


def test_device_check_script_runs():
    """The GPU check's comparison script stays runnable (on a CPU it compares the CPU with
    itself, so this guards the script, not a device)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, str(root / "scripts" / "device_check.py"), "--device",
                          "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["philox_words_equal"] and result["train_votes_equal"]
