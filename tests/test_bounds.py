"""Confidence bounds: exact values on hand cases and Monte Carlo coverage."""

import numpy as np
import pytest
from scipy import stats

from dpcert.certification.bounds import score_bounds, vote_bounds
from dpcert.errors import UserError


def test_simuem_is_clopper_pearson_at_eta_over_l_plus_2():
    counts = np.array([[700, 200, 100]])
    b = vote_bounds(counts, eta=0.05)  # one-sided level 0.05 / (3 + 2) = 0.01 per bound
    lo = stats.binomtest(700, 1000).proportion_ci(confidence_level=1 - 2 * 0.01, method="exact").low
    hi = (
        stats.binomtest(200, 1000).proportion_ci(confidence_level=1 - 2 * 0.01, method="exact").high
    )
    assert b.prediction[0] == 0
    assert b.p_lower[0] == pytest.approx(lo, rel=1e-9)
    assert b.p_upper[0] == pytest.approx(min(hi, 1 - lo), rel=1e-9)


def test_unanimous_votes():
    b = vote_bounds(np.array([[0, 1000, 0]]), eta=1e-3)
    assert b.prediction[0] == 1
    # Clopper-Pearson lower bound of 1000 successes in 1000 at level a: a^(1/1000)
    assert b.p_lower[0] == pytest.approx((1e-3 / 5) ** (1 / 1000), rel=1e-9)
    assert b.p_upper[0] == pytest.approx(1 - (1e-3 / 5) ** (1 / 1000), rel=1e-9)


def test_two_labels_need_only_the_lower_bounds():
    b = vote_bounds(np.array([[30, 70]]), eta=0.1)
    lo = stats.binomtest(70, 100).proportion_ci(confidence_level=1 - 2 * 0.05, method="exact").low
    assert b.prediction[0] == 1
    assert b.p_lower[0] == pytest.approx(lo, rel=1e-9)
    assert b.p_upper[0] == 1 - b.p_lower[0]


@pytest.mark.parametrize(("p0", "n", "eta"), [(0.5, 100, 0.2), (0.5, 1000, 0.05),
                                              (0.7, 300, 0.1)])
def test_two_label_coverage_exact(p0, n, eta):
    counts = np.stack([np.arange(n + 1), n - np.arange(n + 1)], axis=1)
    b = vote_bounds(counts, eta)
    truth = np.array([p0, 1 - p0])
    fail = (b.p_lower > truth[b.prediction]) | (b.p_upper < truth[1 - b.prediction])
    failure = stats.binom.pmf(counts[fail, 0], n, p0).sum()
    assert failure <= eta
    assert failure > eta / 4  # eta / 2 per lower bound is not wastefully small here


def _exact_failure_probability(probs, n, eta):
    """P(p_lower > p_top or p_upper < max other p) over every vote outcome of n instances
    with three labels, summed exactly from the multinomial pmf."""
    probs = np.asarray(probs)
    c1, c2 = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = c1 + c2 <= n
    counts = np.stack([c1[keep], c2[keep], n - c1[keep] - c2[keep]], axis=1)
    b = vote_bounds(counts, eta)
    top = b.prediction
    other = np.array([np.max(np.delete(probs, t)) for t in range(3)])[top]
    fail = (b.p_lower > probs[top]) | (b.p_upper < other)
    return stats.multinomial.pmf(counts[fail], n, probs).sum()


@pytest.mark.parametrize(("probs", "n", "eta"), [((0.4, 0.4, 0.2), 200, 0.2),
                                                  ((0.4, 0.4, 0.2), 500, 0.2),
                                                  ((0.4, 0.4, 0.2), 300, 0.1),
                                                  ((0.35, 0.35, 0.3), 200, 0.3)])
def test_simuem_coverage_exact(probs, n, eta):
    # Bonferroni over the L labels only (eta / 3 per bound) fails the first three cases:
    # 0.208, 0.212 and 0.1004 (the top label is picked from the same votes).
    assert _exact_failure_probability(probs, n, eta) <= eta


def test_ties_go_to_smallest_label():
    assert vote_bounds(np.array([[3, 5, 5]]), eta=0.1).prediction[0] == 1


def _coverage_failures(draw, truth_top, truth_other, method, eta, trials, rng):
    fails = 0
    for _ in range(trials):
        b = draw(rng)
        if b.p_lower[0] > truth_top or b.p_upper[0] < truth_other:
            fails += 1
    return fails


@pytest.mark.parametrize("probs", [[0.6, 0.3, 0.1], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]])
def test_simuem_coverage_monte_carlo(probs):
    rng = np.random.default_rng(0)
    eta, trials, n = 0.1, 2000, 200
    counts = rng.multinomial(n, probs, size=trials)
    fails = 0
    for row in counts:
        b = vote_bounds(row[None, :], eta)
        top = b.prediction[0]
        other = max(p for i, p in enumerate(probs) if i != top)
        fails += b.p_lower[0] > probs[top] or b.p_upper[0] < other
    # failure rate <= eta up to Monte Carlo error (binomial tail at 4 sd)
    assert fails <= trials * eta + 4 * np.sqrt(trials * eta * (1 - eta))


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
@pytest.mark.parametrize("conc", [[5.0, 2.0, 1.0], [50.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
def test_score_bounds_coverage_monte_carlo(method, conc):
    rng = np.random.default_rng(1)
    eta, trials, n_inst = 0.1, 1500, 60
    mean = np.array(conc) / np.sum(conc)
    fails = 0
    for _ in range(trials):
        s = rng.dirichlet(conc, size=(n_inst, 1))
        b = score_bounds(s, eta, method)
        top = b.prediction[0]
        other = np.max(np.delete(mean, top))
        fails += b.p_lower[0] > mean[top] or b.p_upper[0] < other
    assert fails <= trials * eta + 4 * np.sqrt(trials * eta * (1 - eta))


def test_score_half_widths_at_eta_over_l_plus_2():
    rng = np.random.default_rng(3)
    s = rng.dirichlet([4.0, 2.0, 1.0], size=(50, 1))
    eta, a = 0.01, 0.01 / 5
    h = score_bounds(s, eta, "hoeffding")
    mean = s.mean(axis=0)[0]
    assert h.p_lower[0] == pytest.approx(mean[0] - np.sqrt(np.log(1 / a) / 100), rel=1e-12)
    b = score_bounds(s, eta, "bernstein")
    var = s.var(axis=0, ddof=1)[0]
    half = np.sqrt(2 * var * np.log(2 / a) / 50) + 7 * np.log(2 / a) / (3 * 49)
    assert b.p_lower[0] == pytest.approx(mean[0] - half[0], rel=1e-12)
    assert b.p_upper[0] == pytest.approx(min(mean[1] + half[1], 1 - b.p_lower[0]), rel=1e-12)


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan, np.inf])
def test_scores_outside_unit_interval_are_refused(bad):
    # The library entry points check what the bounds assume (the CLI checks more: sums to 1).
    s = np.full((5, 2, 3), 1 / 3)
    s[3, 1, 2] = bad
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        score_bounds(s, 0.1)


@pytest.mark.parametrize("bad", [-1.0, 2.5, np.nan, np.inf])
def test_votes_that_are_not_counts_are_refused(bad):
    counts = np.array([[5.0, 3.0, 2.0], [1.0, 0.0, 9.0]])
    counts[1, 1] = bad
    with pytest.raises(UserError, match="non-negative integers"):
        vote_bounds(counts, 0.1)


def test_bernstein_beats_hoeffding_on_confident_points():
    rng = np.random.default_rng(2)
    s = rng.dirichlet([200.0, 1.0, 1.0], size=(1000, 5))
    h = score_bounds(s, 1e-3, "hoeffding")
    b = score_bounds(s, 1e-3, "bernstein")
    assert np.all(b.p_lower > h.p_lower)


def test_paper_vote_bound_is_less_conservative_than_simuem():
    """The public code's normal interval has no correction over classes: on near-uniform votes
    over many classes it fails to cover the truth more often than eta allows; SimuEM does not."""
    rng = np.random.default_rng(3)
    eta, trials, n_labels, n = 0.2, 1000, 10, 1000
    probs = np.full(n_labels, 1 / n_labels)
    fails = {"paper": 0, "simuem": 0}
    for row in rng.multinomial(n, probs, size=trials):
        for method in fails:
            b = vote_bounds(row[None, :], eta, method)
            fails[method] += b.p_lower[0] > 0.1 or b.p_upper[0] < 0.1
    slack = 4 * np.sqrt(trials * eta * (1 - eta))
    assert fails["simuem"] <= eta * trials + slack
    assert fails["paper"] > eta * trials + slack


def test_bad_inputs():
    with pytest.raises(UserError):
        vote_bounds(np.array([1, 2, 3]), 0.1)
    with pytest.raises(UserError):
        vote_bounds(np.array([[0, 0]]), 0.1)
    with pytest.raises(UserError):
        vote_bounds(np.array([[1, 2]]), 1.5)
    with pytest.raises(UserError):
        score_bounds(np.ones((1, 2, 3)) / 3, 0.1)


def test_subnormal_eta_is_refused():
    from dpcert.certification.bounds import vote_bounds

    with pytest.raises(UserError, match="eta"):
        vote_bounds(np.array([[5, 5]]), 1e-320)
    vote_bounds(np.array([[5, 5]]), 1e-300)


@pytest.mark.parametrize("chunk_values", [1, 7, 2**24])
def test_score_statistics_by_blocks_equal_numpy(chunk_values):
    # blocks of instances (any size) give numpy's mean and unbiased variance, also where the
    # variance is tiny next to the mean (a sum-of-squares formula would cancel to garbage)
    from dpcert.certification.bounds import _mean_and_variance

    rng = np.random.default_rng(0)
    scores = rng.random((9, 5, 3)).astype(np.float32)
    scores[:, 0, 0] = np.float32(0.999) + rng.integers(0, 3, 9) * np.float32(2**-23)
    mean, var = _mean_and_variance(scores, True, chunk_values=chunk_values)
    wide = scores.astype(np.float64)
    np.testing.assert_allclose(mean, wide.mean(axis=0), rtol=1e-14, atol=0)
    np.testing.assert_allclose(var, wide.var(axis=0, ddof=1), rtol=1e-9, atol=0)
    assert var[0, 0] > 0


def test_score_bounds_read_a_memory_mapped_file(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.dirichlet(np.ones(4), size=(30, 6)).astype(np.float32)
    np.save(tmp_path / "scores.npy", scores)
    mapped = np.load(tmp_path / "scores.npy", mmap_mode="r")
    for method in ("bernstein", "hoeffding", "paper"):
        a, b = score_bounds(mapped, 1e-3, method), score_bounds(scores.astype(float), 1e-3, method)
        np.testing.assert_array_equal(a.prediction, b.prediction)
        np.testing.assert_allclose(a.p_lower, b.p_lower, rtol=1e-12)
        np.testing.assert_allclose(a.p_upper, b.p_upper, rtol=1e-12)
