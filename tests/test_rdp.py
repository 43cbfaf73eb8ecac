"""RDP of the SGM and of r-groups against independent computations."""

import math

import mpmath as mp
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp

from dpcert.certification import rdp

INT_ORDERS = np.array([2.0, 3.0, 4.0, 5.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])


def dp_accounting_rdp(q, sigma, orders, steps=1):
    acc = dpa_rdp.RdpAccountant(orders=list(orders))
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return np.array(acc._rdp)


def mp_group_rdp(q, sigma, r, alpha, direction):
    """D_alpha per step of the binomial mixture vs N(0, sigma^2) by mpmath quadrature."""
    mp.mp.dps = 40
    w = [mp.binomial(r, k) * mp.mpf(q) ** k * (1 - mp.mpf(q)) ** (r - k) for k in range(r + 1)]
    s2 = mp.mpf(sigma) ** 2

    def ratio(x):
        return sum(w[k] * mp.exp((2 * k * x - k * k) / (2 * s2)) for k in range(r + 1))

    power = alpha if direction == "add" else 1 - alpha
    f = lambda x: mp.npdf(x, 0, sigma) * ratio(x) ** power  # noqa: E731
    pts = [-mp.inf, -10 * sigma, 0, r / 2, r, alpha * r, alpha * r + 10 * sigma, mp.inf]
    return float(mp.log(mp.quad(f, sorted(set(pts)))) / (alpha - 1))


@pytest.mark.parametrize(
    "q,sigma", [(0.001, 1.0), (0.01, 2.0), (0.1, 0.8), (0.5, 3.0), (0.02, 0.7)]
)
def test_sgm_integer_orders_match_dp_accounting(q, sigma):
    ours = rdp.group_rdp(q, sigma, 1, INT_ORDERS, steps=7)
    ref = dp_accounting_rdp(q, sigma, INT_ORDERS, steps=7)
    finite = np.isfinite(ref) & (ref < 1e6)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-8)


def test_sgm_matches_opacus():
    from opacus.accountants.analysis.rdp import compute_rdp

    for q, sigma in [(0.001, 1.0), (0.004, 1.3), (0.05, 2.0)]:
        ref = compute_rdp(q=q, noise_multiplier=sigma, steps=1000, orders=list(INT_ORDERS))
        ours = rdp.group_rdp(q, sigma, 1, INT_ORDERS, steps=1000)
        ok = np.asarray(ref) < 1e5
        np.testing.assert_allclose(ours[ok], np.asarray(ref)[ok], rtol=1e-8)


@pytest.mark.parametrize(
    "q,sigma,alpha",
    [(0.01, 2.0, 1.1), (0.01, 2.0, 1.5), (0.1, 0.8, 1.25), (0.001, 1.0, 2.5), (0.05, 0.5, 3.5)],
)
def test_sgm_fractional_orders_match_mpmath(q, sigma, alpha):
    ours = rdp.group_rdp(q, sigma, 1, np.array([alpha]))[0]
    assert ours == pytest.approx(mp_group_rdp(q, sigma, 1, alpha, "add"), rel=1e-7)
    # dp-accounting's fractional-order series is an upper bound; ours is the exact value.
    assert ours <= dp_accounting_rdp(q, sigma, [alpha])[0] * (1 + 1e-9)


@pytest.mark.parametrize(
    "q,sigma,r", [(0.01, 1.0, 3), (0.1, 2.0, 5), (0.3, 3.0, 4), (0.05, 0.7, 2)]
)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 8.0])
def test_group_mixture_matches_mpmath_both_directions(q, sigma, r, alpha):
    add = mp_group_rdp(q, sigma, r, alpha, "add")
    rem = mp_group_rdp(q, sigma, r, alpha, "remove")
    ours = rdp.group_rdp(q, sigma, r, np.array([alpha]))[0]
    assert ours == pytest.approx(max(add, rem), rel=1e-6)


@pytest.mark.parametrize("r", [1, 2, 7, 40])
def test_full_batch_group_is_the_gaussian_mechanism(r):
    orders = np.array([1.25, 2.0, 5.0, 32.0])
    sigma = 3.0
    ours = rdp.group_rdp(1.0, sigma, r, orders, steps=10)
    np.testing.assert_allclose(ours, 10 * orders * r**2 / (2 * sigma**2), rtol=1e-9)
    # The paper's Theorem 8 claims the one-example value at q = 1.
    paper = rdp.paper_group_rdp(1.0, sigma, r, orders, steps=10)
    np.testing.assert_allclose(paper, 10 * orders / (2 * sigma**2), rtol=1e-9)


def test_design_counterexample():
    sound = rdp.group_rdp(0.001, 1.0, 5, np.array([8.0]))[0]
    paper = rdp.paper_group_rdp(0.001, 1.0, 5, np.array([8.0]))[0]
    assert 55 < sound < 65
    assert 1.5e-4 < paper < 2.5e-4


def test_sound_dominates_paper():
    orders = rdp.DEFAULT_ORDERS
    for q, sigma, r in [(0.001, 1.0, 3), (0.01, 2.0, 10), (0.001, 3.0, 50)]:
        assert np.all(
            rdp.group_rdp(q, sigma, r, orders)
            >= rdp.paper_group_rdp(q, sigma, r, orders) * (1 - 1e-9)
        )


def test_large_groups_and_orders_are_stable_and_monotone():
    orders = np.array([1.1, 2.0, 16.0, 64.0, 256.0])
    prev = np.zeros(len(orders))
    for r in [1, 10, 100, 500, 2000]:
        eps = rdp.group_rdp(0.001, 3.0, r, orders)
        assert not np.any(np.isnan(eps))
        assert np.all(eps >= 0)
        assert np.all(np.diff(eps) >= -1e-12)  # non-decreasing in alpha
        assert np.all(eps >= prev * (1 - 1e-9))  # non-decreasing in r
        prev = eps


def test_cap_reports_inf_only_above_cap():
    orders = rdp.DEFAULT_ORDERS
    exact = rdp.group_rdp(0.001, 1.0, 20, orders, steps=1000)
    capped = rdp.group_rdp(0.001, 1.0, 20, orders, steps=1000, cap=60.0)
    fin = np.isfinite(capped)
    np.testing.assert_allclose(capped[fin], exact[fin])
    assert np.all(exact[~fin] >= 60.0)


def test_closed_form_fallback_is_an_upper_bound(monkeypatch):
    orders = np.array([1.5, 2.0, 4.0])
    exact = rdp.group_rdp(0.05, 1.0, 30, orders)
    monkeypatch.setattr(rdp, "QUAD_BUDGET", 1)
    bound = rdp.group_rdp(0.05, 1.0, 30, orders)
    assert np.all(bound >= exact * (1 - 1e-12))


def test_rdp_to_adp_conversion_matches_dp_accounting():
    orders = rdp.DEFAULT_ORDERS
    eps_rdp = rdp.group_rdp(0.01, 1.1, 1, orders, steps=500)
    ours = rdp.rdp_to_adp_epsilon(eps_rdp, orders, np.array([1e-5]))[0]
    ref, _ = dpa_rdp.compute_epsilon(orders, eps_rdp, 1e-5)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_binomial_components_tail():
    k, logw = rdp.binomial_components(1000, 0.001)
    assert k[0] == 0 and len(k) < 40
    assert 1 - math.fsum(np.exp(logw)) <= 1e-17
