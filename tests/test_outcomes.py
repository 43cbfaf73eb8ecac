"""Tabulated outcome bounds: validity against exact tradeoffs, chaining, inversion."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from dpcert.certification import outcomes, pld, rdp
from dpcert.certification.accounting import EPS_GRID
from dpcert.certification.outcomes import GRID


def gaussian_bound(mu):
    """Exact mu-GDP outcome bounds: p' in [Phi(Phi^-1(p) - mu), Phi(Phi^-1(p) + mu)]."""
    z = stats.norm.ppf(GRID)
    return stats.norm.cdf(z - mu), stats.norm.cdf(z + mu)


def gauss_profile_bound(mu):
    d = stats.norm.cdf(-EPS_GRID / mu + mu / 2) - np.exp(EPS_GRID) * stats.norm.cdf(
        -EPS_GRID / mu - mu / 2
    )
    return outcomes.from_profile(EPS_GRID, np.clip(d, 0, 1))


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 2.0])
def test_profile_bounds_are_valid_and_tight_for_gaussian(mu):
    lo, hi = gaussian_bound(mu)
    b = gauss_profile_bound(mu)
    assert np.all(b.upper >= hi - 1e-12) and np.all(b.lower <= lo + 1e-12)
    mid = (GRID > 0.01) & (GRID < 0.99)
    assert np.max(b.upper[mid] - hi[mid]) < 0.01
    assert np.max(lo[mid] - b.lower[mid]) < 0.01


@pytest.mark.parametrize("r,sigma", [(1, 2.0), (3, 3.0), (6, 8.0)])
def test_pld_certificate_never_beats_exact_gaussian_tradeoff_at_q1(r, sigma):
    """At q = 1 the exact condition is Phi^-1(p1) - Phi^-1(p2) > 2 r sqrt(T) / sigma."""
    steps = 4
    b = outcomes.from_profile(EPS_GRID, pld.group_privacy_profile(1.0, sigma, r, steps, EPS_GRID))
    p1 = np.linspace(0.5, 0.999, 60)
    p2 = np.linspace(0.001, 0.5, 60)
    P1, P2 = np.meshgrid(p1, p2)
    ours = b.lower_at(P1.ravel()) > b.upper_at(P2.ravel())
    exact = stats.norm.ppf(P1.ravel()) - stats.norm.ppf(P2.ravel()) > 2 * r * np.sqrt(steps) / sigma
    assert not np.any(ours & ~exact)
    assert ours.sum() >= 0.9 * exact.sum()  # and it is not vacuous


@pytest.mark.parametrize("q,sigma,r", [(0.01, 1.0, 1), (0.05, 2.0, 4), (0.3, 1.5, 2)])
def test_pld_and_rdp_bounds_hold_for_threshold_events(q, sigma, r):
    """Exact outcome probabilities of one step for events {x > t} lie inside the bounds."""
    k = np.arange(r + 1)
    w = stats.binom.pmf(k, r, q)
    b_pld = outcomes.from_profile(EPS_GRID, pld.group_privacy_profile(q, sigma, r, 1, EPS_GRID))
    b_rdp = outcomes.from_rdp(rdp.DEFAULT_ORDERS, rdp.group_rdp(q, sigma, r))
    for t in np.linspace(-3, 3 + r, 25) * sigma:
        p_clean = stats.norm.sf(t / sigma)
        p_pois = float(np.sum(w * stats.norm.sf((t - k) / sigma)))
        for b in (b_pld, b_rdp):
            # insertion: clean Q, poisoned P_r; deletion: the other way round
            for p, pp in ((p_clean, p_pois), (p_pois, p_clean)):
                assert b.lower_at(np.array([p]))[0] <= pp + 1e-12
                assert b.upper_at(np.array([p]))[0] >= pp - 1e-12


def test_chain_of_gaussians_is_valid_and_close_to_exact():
    a, b = gauss_profile_bound(0.4), gauss_profile_bound(0.7)
    c = outcomes.chain(a, b)
    lo, hi = gaussian_bound(1.1)  # Gaussian tradeoffs compose exactly along a path
    assert np.all(c.upper >= hi - 1e-12) and np.all(c.lower <= lo + 1e-12)
    mid = (GRID > 0.01) & (GRID < 0.99)
    assert np.max(c.upper[mid] - hi[mid]) < 0.02


def test_reverse_inverts_a_symmetric_bound():
    b = gauss_profile_bound(0.8)
    rb = outcomes.reverse(b)
    # For a Gaussian, p >= L(p') gives p' <= L^-1(p) = U(p): the reversal recovers U,
    # conservatively, and p <= U(p') gives p' >= U^-1(p) = L(p).
    lo, hi = gaussian_bound(0.8)
    assert np.all(rb.upper >= hi - 1e-12) and np.all(rb.lower <= lo + 1e-12)
    mid = (GRID > 0.01) & (GRID < 0.99)
    assert np.max(rb.upper[mid] - hi[mid]) < 0.01
    assert np.max(lo[mid] - rb.lower[mid]) < 0.01


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.05, 2.0))
def test_inverse_roundtrip(x, mu):
    """K(K^-1(x)) = x up to the conservative grid rounding, in the safe direction."""
    b = gauss_profile_bound(mu)
    rb = outcomes.reverse(b)
    y = rb.upper_at(np.array([x]))[0]  # an upper bound on K^-1(x) for K = lower
    assert (
        b.lower_at(np.array([y]))[0]
        >= outcomes.GRID[outcomes.floor_index(np.array([x]))[0]] - 1e-12
        or y == 1.0
    )


def test_mixture_assigns_missing_mass_trivially():
    b = outcomes.mixture(np.array([0.5, 0.3]), [outcomes.identity(), outcomes.identity()])
    np.testing.assert_allclose(b.upper, np.minimum(0.8 * GRID + 0.2, 1.0), atol=1e-12)
    np.testing.assert_allclose(b.lower, 0.8 * GRID, atol=1e-12)


def test_conservative_evaluation_rounds_the_safe_way():
    b = outcomes.identity()
    p = np.array([0.123456789, 1e-7 * 1.2345, 0.5])
    assert np.all(b.upper_at(p) >= p) and np.all(b.lower_at(p) <= p)


def test_rdp_bounds_skip_infinite_orders():
    b = outcomes.from_rdp(np.array([2.0, 3.0]), np.array([np.inf, np.inf]))
    assert np.all(b.upper == 1) and np.all(b.lower == 0)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**32 - 1), st.booleans())
def test_envelope_of_lines_picks_a_minimal_line(n, seed, ties):
    """The lower envelope of lines equals evaluating every line everywhere (up to rounding in
    the chosen line's own value), with repeated slopes and intercepts in the mix."""
    rng = np.random.default_rng(seed)
    slopes = rng.exponential(3.0, n) * rng.choice([-1.0, 1.0], n)
    intercepts = rng.uniform(-1, 1, n)
    if ties and n > 2:
        slopes[1] = slopes[0]
        intercepts[2] = intercepts[0]
    x = np.concatenate([GRID, rng.uniform(0, 1, 50)])
    i = outcomes._min_line_index(slopes, intercepts, x)
    brute = np.min(slopes[None, :] * x[:, None] + intercepts[None, :], axis=1)
    np.testing.assert_allclose(slopes[i] * x + intercepts[i], brute, rtol=0, atol=1e-12)


@pytest.mark.parametrize("r", [1, 20, 300])
def test_profile_bounds_equal_every_line_evaluated(r):
    """from_profile's envelope gives exactly the min / max over every (eps, delta) line."""
    d = pld.group_privacy_profile(0.001, 2.0, r, 200, EPS_GRID)
    b = outcomes.from_profile(EPS_GRID, d, complements=False)
    ok = d < 1
    e, dd = EPS_GRID[ok][None, :], d[ok][None, :]
    p = GRID[:, None]
    ref = outcomes.regularise(outcomes.OutcomeBound(
        np.max(np.exp(-e) * (p - dd), axis=1), np.min(np.exp(e) * p + dd, axis=1)))
    np.testing.assert_array_equal(b.upper, ref.upper)
    np.testing.assert_array_equal(b.lower, ref.lower)
