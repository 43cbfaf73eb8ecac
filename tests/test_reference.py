"""DP-SGD mechanics: Poisson sampling, clipping for every model, noise scale, determinism."""

import numpy as np
import pytest
import torch

from dpcert.learning import ghost
from dpcert.learning.models import build_model
from dpcert.learning.reference import (
    TrainConfig,
    _seeded_model,
    clipped_gradient_sum,
    instance_generator,
    poisson_batch,
    train_instance,
)

torch.set_num_threads(1)


def test_poisson_sampling_statistics():
    n, q, steps = 400, 0.03, 3000
    gen = instance_generator(7, 0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(steps):
        idx = poisson_batch(n, q, gen).numpy()
        counts[idx] += 1
        sizes.append(len(idx))
    sizes = np.array(sizes)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / steps)
    assert abs(sizes.var() / var - 1) < 0.1
    # every example is included ~ Binomial(steps, q), independently of the others
    z = (counts - steps * q) / np.sqrt(steps * q * (1 - q))
    assert abs(z.mean()) < 4 / np.sqrt(n) and abs(z.std() - 1) < 0.15
    assert np.mean(sizes == 0) == pytest.approx((1 - q) ** n, abs=0.01)


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("lenet5", (1, 28, 28)),
                                        ("cifar_cnn", (3, 32, 32)), ("resnet18_gn", (3, 32, 32))])
def test_clipping_bound_holds_for_every_model(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape[0], 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, *shape) * 5
    y = torch.tensor([1, 2, 3])
    clip = 0.1
    total = clipped_gradient_sum(model, params, x, y, clip)
    singles = [clipped_gradient_sum(model, params, x[i: i + 1], y[i: i + 1], clip)
               for i in range(3)]
    for s in singles:
        norm = torch.sqrt(sum(v.pow(2).sum() for v in s.values()))
        assert norm <= clip * (1 + 1e-5)
    for k in total:
        torch.testing.assert_close(total[k], sum(s[k] for s in singles), rtol=1e-4, atol=1e-6)


def test_unclipped_gradient_equals_autograd():
    torch.manual_seed(1)
    model = build_model("digits_cnn", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([4])
    ours = clipped_gradient_sum(model, params, x, y, clip=1e9)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-6)


def test_empty_batch_gives_zero_sum():
    model = build_model("digits_cnn", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = clipped_gradient_sum(model, params, torch.zeros(0, 1, 8, 8),
                               torch.zeros(0, dtype=torch.long), 1.0)
    assert all(float(v.abs().sum()) == 0.0 for v in out.values())


def test_noise_scale_is_sigma_c_over_expected_batch():
    """One SGD step with lr 1 and negligible gradients moves each parameter by
    N(0, (sigma C / (q n))^2)."""
    x = torch.randn(200, 1, 8, 8)
    y = torch.randint(0, 10, (200,))
    sigma, clip, q = 1e4, 1e-3, 0.1
    cfg = TrainConfig(q, sigma, 1, clip, lr=1.0, optimizer="sgd", model="digits_cnn",
                      declared_size=len(y))
    torch.manual_seed(0)
    trained = train_instance(cfg, x, y, 10, seed=3, instance=0)
    # the initial weights train_instance started from
    init = _seeded_model("digits_cnn", 1, 10, instance_generator(3, 0))
    with torch.no_grad():
        delta = torch.cat([(p0 - p1).flatten() for p0, p1 in
                           zip(init.parameters(), trained.parameters(), strict=True)])
    z = delta * (q * 200) / (sigma * clip)
    assert abs(float(z.std()) - 1) < 0.05
    assert abs(float(z.mean())) < 0.05


def test_same_seed_same_model_different_instance_different_model():
    x = torch.randn(100, 1, 8, 8)
    y = torch.randint(0, 10, (100,))
    cfg = TrainConfig(0.1, 1.0, 5, 1.0, lr=0.01, optimizer="adam", subset_size=60,
                      model="digits_cnn", declared_size=len(y))
    a = train_instance(cfg, x, y, 10, seed=1, instance=2)
    b = train_instance(cfg, x, y, 10, seed=1, instance=2)
    c = train_instance(cfg, x, y, 10, seed=1, instance=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(),
                                                         strict=True))


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("lenet5", (1, 28, 28)),
                                        ("cifar_cnn", (3, 32, 32))])
@pytest.mark.parametrize("clip", [1e-3, 1.0, 1e6])
def test_ghost_clipping_equals_vmap(name, shape, clip):
    torch.manual_seed(0)
    model = build_model(name, shape[0], 10)
    assert ghost.supports(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(9, *shape) * 3, torch.randint(0, 10, (9,))
    ref = clipped_gradient_sum(model, params, x, y, clip)
    ours = ghost.clipped_gradient_sum(model, x, y, clip)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stride,padding,size", [(1, 0, 9), (2, 1, 9), (2, 0, 10), (3, 2, 11)])
def test_conv_per_example_weight_grads(stride, padding, size):
    """Against autograd, one example at a time, including strides that leave a remainder."""
    torch.manual_seed(1)
    layer = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    a = torch.randn(5, 3, size, size)
    out = layer(a)
    g = torch.randn_like(out)
    for method in (ghost.conv_weight_grads_grouped, ghost.conv_weight_grads_patches):
        got = method(layer, a, g)
        for i in range(len(a)):
            (ref,) = torch.autograd.grad(layer(a[i: i + 1]), layer.weight, g[i: i + 1])
            torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5)


def test_ghost_declines_unsupported_models():
    assert not ghost.supports(build_model("resnet18_gn", 3, 10))
    assert not ghost.supports(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)))
