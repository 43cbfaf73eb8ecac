"""Batched linear DP-SGD (dpcert.learning.linear): clipping, sampling, per-instance determinism."""

import numpy as np
import pytest
import torch
from scipy import stats

from dpcert.errors import UserError
from dpcert.learning import linear


def _data(n=400, dim=12, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


CFG = linear.LinearDpSgd(sample_rate=0.05, noise_multiplier=1.0, steps=40, clip_norm=0.7, lr=0.5,
                         declared_size=400)


@pytest.mark.parametrize("s", [1.0, 0.5, 0.0])
def test_clipped_sum_equals_autograd_per_example_gradients_clipped(s):
    """Against torch autograd: every example's own gradient of its cross-entropy with respect
    to (W, beta), logits x W + s beta, clipped to C and summed — for K = 2 models, with
    padding masked out. The engine returns beta's part divided by s."""
    torch.manual_seed(1)
    k, b, dim, classes, clip = 2, 5, 7, 4, 0.3
    weight = torch.randn(k, classes, dim)
    beta = torch.randn(k, classes)
    xb = torch.randn(k, b, dim) * 2
    yb = torch.randint(0, classes, (k, b))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    got_w, got_b = linear.clipped_gradient_sum(
        weight, s * beta, xb, torch.eye(classes)[yb], xb.pow(2).sum(2) + s * s, mask, clip)
    clipped = []
    for j in range(k):
        want_w, want_beta = torch.zeros(classes, dim), torch.zeros(classes)
        for i in range(b):
            if mask[j, i] == 0:
                continue
            w = weight[j].clone().requires_grad_(True)
            bb = beta[j].clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy((xb[j, i] @ w.T + s * bb)[None],
                                                     yb[j, i][None])
            gw, gb = torch.autograd.grad(loss, (w, bb))
            norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
            clipped.append(bool(norm > clip))
            want_w += gw * min(1.0, clip / float(norm))
            want_beta += gb * min(1.0, clip / float(norm))
        torch.testing.assert_close(got_w[j], want_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s * got_b[j], want_beta, rtol=1e-5, atol=1e-6)
    assert any(clipped) and not all(clipped)  # both regimes are exercised


@pytest.mark.parametrize("s", [1.0, 0.5, 0.0, 3.0])
def test_one_example_moves_the_clipped_sum_by_at_most_c(s):
    """The sensitivity the mechanism record claims: adding any example (huge features, any
    label) to a batch changes the clipped sum by at most C in L2 over all parameters (W,
    beta), whatever the bias feature s (beta's sum is s times the engine's bias part)."""
    torch.manual_seed(2)
    weight, bias = torch.randn(1, 3, 6), torch.randn(1, 3)
    for scale in (0.01, 1.0, 1e4):
        xb = torch.randn(1, 9, 6) * scale
        onehot = torch.eye(3)[torch.randint(0, 3, (1, 9))]
        sq = xb.pow(2).sum(2) + s * s
        with_all = linear.clipped_gradient_sum(weight, bias, xb, onehot, sq, torch.ones(1, 9),
                                               0.5)
        mask = torch.ones(1, 9)
        mask[0, 4] = 0  # the same batch without example 4
        without = linear.clipped_gradient_sum(weight, bias, xb, onehot, sq, mask, 0.5)
        diff = torch.sqrt((with_all[0] - without[0]).pow(2).sum()
                          + s * s * (with_all[1] - without[1]).pow(2).sum())
        assert float(diff) <= 0.5 * (1 + 1e-5)
        if scale == 0.01 and s > 0:  # small features: the bias part is most of the norm
            assert float(diff) > 0.1


def test_instance_is_independent_of_its_batch_companions():
    x, y = _data()
    together_w, together_b = linear.train_linear(CFG, x, y, 3, seed=7, instances=[0, 1, 2])
    alone_w, alone_b = linear.train_linear(CFG, x, y, 3, seed=7, instances=[2])
    pair_w, _ = linear.train_linear(CFG, x, y, 3, seed=7, instances=[1, 2])
    torch.testing.assert_close(together_w[2], alone_w[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together_b[2], alone_b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together_w[1], pair_w[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together_w[0], together_w[1])  # instances differ
    other_seed, _ = linear.train_linear(CFG, x, y, 3, seed=8, instances=[2])
    assert not torch.allclose(other_seed[0], alone_w[0])


def test_poisson_indices_are_bernoulli_q_per_example():
    n, q, draws = 200, 0.03, 4000
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = linear.poisson_indices(n, q, rng)
        assert np.all(np.diff(idx) > 0) and (idx.size == 0 or (idx[0] >= 0 and idx[-1] < n))
        counts[idx] += 1
        sizes.append(idx.size)
    # every example's inclusion count is Binomial(draws, q): a chi-square test over examples
    expected = draws * q
    chi2 = float(np.sum((counts - expected) ** 2 / (expected * (1 - q))))
    assert stats.chi2.sf(chi2, n) > 1e-4
    # batch sizes are Binomial(n, q), empty batches included
    sizes = np.array(sizes)
    observed = np.bincount(sizes, minlength=n + 1)[:16]
    probs = stats.binom.pmf(np.arange(16), n, q)
    assert observed[0] > 0
    assert stats.chisquare(np.append(observed, draws - observed.sum()),
                           np.append(probs, 1 - probs.sum()) * draws).pvalue > 1e-4
    assert np.array_equal(linear.poisson_indices(5, 1.0, rng), np.arange(5))


def test_subset_training_ignores_examples_outside_the_subset():
    x, y = _data()
    cfg = linear.LinearDpSgd(sample_rate=0.1, noise_multiplier=1.0, steps=20, clip_norm=1.0,
                             lr=0.5, subset_size=100, declared_size=len(y))
    subset = linear._numpy_stream(3, 0).choice(len(y), 100, replace=False)
    outside = np.setdiff1d(np.arange(len(y)), subset)
    x2, y2 = x.clone(), y.clone()
    x2[outside] = -x2[outside]
    y2[outside] = (y2[outside] + 1) % 3
    a, _ = linear.train_linear(cfg, x, y, 3, seed=3, instances=[0])
    b, _ = linear.train_linear(cfg, x2, y2, 3, seed=3, instances=[0])
    torch.testing.assert_close(a, b)
    x2[subset[0]] = -x2[subset[0]]  # an example inside the subset does matter
    c, _ = linear.train_linear(cfg, x2, y2, 3, seed=3, instances=[0])
    assert not torch.allclose(a, c)


def _plain_linear_dp_sgd(cfg, x, y, classes, seed, instances):
    """The engine's algorithm written out plainly: fresh tensors every step, the same batched
    products (so the same rounding), every instance drawing from its own streams."""
    rngs = [linear._numpy_stream(seed, i) for i in instances]
    gens = [linear._torch_stream(seed, i, x.device) for i in instances]
    n, dim, k = len(y), x.shape[1], len(instances)
    rows = None
    if cfg.subset_size is not None:
        rows = np.stack([np.sort(r.choice(n, cfg.subset_size, replace=False)) for r in rngs])
        n = cfg.subset_size
    s = cfg.bias_feature
    w = torch.zeros(k, classes, dim)
    b = torch.zeros(k, classes)
    beta = torch.zeros(k, classes)  # s != 1: b = s beta, DP-SGD on (w, beta)
    avg_w, avg_b, count = torch.zeros_like(w), torch.zeros_like(b), 0
    size = cfg.lr / (cfg.sample_rate * (cfg.subset_size or cfg.declared_size))
    for step in range(cfg.steps):
        picks = [linear.poisson_indices(n, cfg.sample_rate, r) for r in rngs]
        width = max(1, *(len(p) for p in picks))
        index = torch.zeros(k, width, dtype=torch.int64)
        mask = torch.zeros(k, width)
        for j, p in enumerate(picks):
            index[j, :len(p)] = torch.from_numpy(p if rows is None else rows[j, p])
            mask[j, :len(p)] = 1.0
        gw, gb = linear.clipped_gradient_sum(w, b, x[index], torch.eye(classes)[y[index]],
                                             x.pow(2).sum(1)[index] + s * s, mask,
                                             cfg.clip_norm)
        noise = torch.stack([torch.randn(classes * (dim + 1), generator=g) for g in gens])
        noise = noise * (cfg.noise_multiplier * cfg.clip_norm)
        gw = gw + noise[:, :classes * dim].view_as(gw)
        w = w - size * gw
        if s == 1.0:
            b = b - size * (gb + noise[:, classes * dim:])
        else:
            beta = beta - size * (s * gb + noise[:, classes * dim:])
            b = s * beta
        if cfg.averaging == "tail" and step >= cfg.steps // 2:
            count += 1
            avg_w = avg_w + (w - avg_w) / count
            avg_b = avg_b + (b - avg_b) / count
    if cfg.averaging == "tail":
        w, b = avg_w, avg_b
    return w.transpose(1, 2), b


@pytest.mark.parametrize(("subset", "averaging"), [(None, None), (150, None), (None, "tail")])
def test_engine_equals_the_plain_algorithm_bit_for_bit(subset, averaging):
    # The engine reuses its buffers across steps (and gathers, draws and updates in place);
    # that may not change a single bit. (Other batch companions change the rounding of the
    # batched products only: test_instance_is_independent_of_its_batch_companions.)
    x, y = _data()
    cfg = linear.LinearDpSgd(0.02, 1.0, 25, 0.7, 0.5, subset, averaging, declared_size=len(y))
    got = linear.train_linear(cfg, x, y, 3, seed=5, instances=[2, 0, 7])
    want = _plain_linear_dp_sgd(cfg, x, y, 3, seed=5, instances=[2, 0, 7])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("s", "averaging"), [(0.5, None), (2.0, "tail"), (0.0, None)])
def test_bias_feature_is_dp_sgd_on_the_weights_and_beta(s, averaging):
    """With bias feature s the engine runs DP-SGD on (W, beta), b = s beta: the plain
    algorithm written that way agrees (up to float rounding: the engine updates b directly),
    and s = 0 trains no bias at all."""
    x, y = _data()
    cfg = linear.LinearDpSgd(0.02, 1.0, 25, 0.7, 0.5, None, averaging, s, declared_size=len(y))
    got = linear.train_linear(cfg, x, y, 3, seed=5, instances=[2, 0])
    want = _plain_linear_dp_sgd(cfg, x, y, 3, seed=5, instances=[2, 0])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    if s == 0.0:
        assert not got[1].any()
    else:
        assert got[1].abs().min() > 0
    plain = linear.train_linear(linear.LinearDpSgd(0.02, 1.0, 25, 0.7, 0.5, None, averaging,
                                                   declared_size=len(y)),
                                x, y, 3, seed=5, instances=[2, 0])
    assert not torch.allclose(got[0], plain[0])  # s does change the learner


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "1", True])
def test_bad_bias_feature_is_a_user_error(bad):
    with pytest.raises(UserError):
        linear.LinearDpSgd(0.1, 1.0, 10, 1.0, 0.1, bias_feature=bad)


def test_tail_averaging_is_the_mean_of_the_second_half_of_the_iterates():
    x, y = _data()
    steps = 6
    iterates = []
    for t in range(1, steps + 1):
        cfg = linear.LinearDpSgd(0.05, 1.0, t, 0.7, 0.5, declared_size=len(y))
        iterates.append(linear.train_linear(cfg, x, y, 3, seed=1, instances=[4]))
    avg = linear.train_linear(linear.LinearDpSgd(0.05, 1.0, steps, 0.7, 0.5, averaging="tail",
                                                 declared_size=len(y)),
                              x, y, 3, seed=1, instances=[4])
    want_w = torch.stack([w for w, _ in iterates[steps // 2:]]).mean(0)
    want_b = torch.stack([b for _, b in iterates[steps // 2:]]).mean(0)
    torch.testing.assert_close(avg[0], want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(avg[1], want_b, rtol=1e-5, atol=1e-6)


def test_learns_a_separable_problem_and_predicts_distributions():
    x, y = _data(n=600, dim=8, classes=2, seed=4)
    y = (x[:, 0] > 0).long()
    cfg = linear.LinearDpSgd(0.2, 0.5, 150, 1.0, 2.0, declared_size=len(y))
    w, b = linear.train_linear(cfg, x, y, 2, seed=0, instances=[0, 1])
    scores = linear.predict_linear(w, b, x)
    assert scores.shape == (2, 600, 2)
    np.testing.assert_allclose(scores.sum(2), 1.0, rtol=1e-5)
    assert (scores.argmax(2) == y.numpy()).mean() > 0.9


def test_bad_averaging_is_a_user_error():
    with pytest.raises(UserError):
        linear.LinearDpSgd(0.1, 1.0, 10, 1.0, 0.1, averaging="ema")


def test_library_entry_point_trains_scores_and_records_the_mechanism():
    """The README's example: own features in, scores and the mechanism record out, certified."""
    from dpcert import certify
    from dpcert.certification.aggregation import tally_votes

    x, y = _data(n=300, dim=10, classes=3, seed=5)
    scores, record = linear.train_linear_ensemble(
        x.numpy(), y.numpy(), x[:20].numpy(), instances=7, sample_rate=0.1,
        noise_multiplier=1.5, steps=25, clip_norm=1.0, lr=0.5, batch_instances=3,
        num_classes=3, declared_size=300)
    assert scores.shape == (7, 20, 3)
    assert (record.sample_rate, record.noise_multiplier, record.steps, record.dataset_size,
            record.sampling) == (0.1, 1.5, 25, 300, "poisson")
    w, b = linear.train_linear(linear.LinearDpSgd(0.1, 1.5, 25, 1.0, 0.5, declared_size=300),
                               x, y, 3, seed=0, instances=[4])
    np.testing.assert_allclose(scores[4], linear.predict_linear(w, b, x[:20])[0], atol=1e-5)
    cert = certify(tally_votes(scores), record, cache_dir=None, max_radius=5)
    assert cert.radius.shape == (20,)
    common = dict(instances=2, sample_rate=0.1, noise_multiplier=1.0, steps=2, clip_norm=1.0,
                  lr=0.1)
    with pytest.raises(UserError):
        linear.train_linear_ensemble(x.numpy(), y.numpy(), x[:, :3].numpy(), num_classes=3,
                                     declared_size=300, **common)
    # the label set and the step size's divisor are declared, never read off (x, y)
    with pytest.raises(UserError, match=r"example 299 has label 3, outside the declared "
                                        r"label set 0\.\.2"):
        linear.train_linear_ensemble(x.numpy(), np.r_[y.numpy()[:-1], 3], x[:5].numpy(),
                                     num_classes=3, declared_size=300, **common)
    with pytest.raises(UserError, match="none is declared"):
        linear.train_linear_ensemble(x.numpy(), y.numpy(), x[:5].numpy(), num_classes=3,
                                     declared_size=None, **common)


def test_instances_that_fit_fill_the_given_share_of_memory():
    fit = linear.instances_that_fit
    n, dim, classes, q = 60_000, 3969, 10, 0.001
    small, big = fit(n, dim, classes, q, 4 * 2**30), fit(n, dim, classes, q, 16 * 2**30)
    assert 1 <= small < big <= 1000
    assert fit(n, dim, classes, q, 10**6 * 2**30) == 1000  # capped
    assert fit(n, dim, classes, q, 1) == 1  # never zero
    # per instance: at least its weights, gradient and noise and its share of a batch of the
    # expected size, in float32; so K of them need at least K times that
    floor = 4 * (3 * classes * (dim + 1) + q * n * dim)
    assert small * floor <= 0.5 * 4 * 2**30


def test_auto_batch_on_cpu_keeps_the_measured_linear_default():
    from dpcert.workflows.dispatch import resolve_batch_instances
    from dpcert.workflows.runconfig import RunConfig

    cfg = RunConfig(dataset="digits", model="linear", features="scatter", optimizer="sgd",
                    batch_instances="auto")
    assert resolve_batch_instances(cfg, 1000) == 100
    assert resolve_batch_instances(cfg, 30) == 30


def test_progress_reports_every_step():
    x, y = _data()
    seen = []
    linear.train_linear(linear.LinearDpSgd(0.05, 1.0, 7, 0.7, 0.5,
                                           declared_size=len(y)), x, y, 3, seed=0,
                        instances=[0, 1], progress=seen.append)
    assert seen == list(range(1, 8))
