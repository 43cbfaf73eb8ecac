"""Group privacy profiles against dp-accounting and the analytic Gaussian."""

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as dpa_pld
from scipy import stats

from dpcert.certification import pld, rdp

EPS = np.linspace(0.0, 8.0, 81)


def gaussian_delta(mu, eps):
    return stats.norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


def test_single_example_matches_dp_accounting_pld_accountant():
    q, sigma, steps = 0.001, 1.0, 1000
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    ours = pld.group_privacy_profile(q, sigma, 1, steps, EPS)
    for eps, d in zip(EPS, ours, strict=True):
        ref = acc.get_delta(eps)
        if ref > 1e-12:
            assert ref * (1 - 1e-6) <= d <= ref * 1.05 + 1e-9


@pytest.mark.parametrize("q,sigma,r,steps", [(0.001, 1.0, 5, 1000), (0.01, 2.0, 3, 100)])
def test_group_matches_dp_accounting_mixture(q, sigma, r, steps):
    k = np.arange(r + 1)
    ref = (
        dpa_pld.from_mixture_gaussian_mechanism(sigma, k.astype(float), stats.binom.pmf(k, r, q))
        .self_compose(steps)
        .get_delta_for_epsilon(EPS)
    )
    ours = pld.group_privacy_profile(q, sigma, r, steps, EPS)
    # both carry FFT rounding noise of order 1e-13 absolute; ours adds a 1e-11 allowance
    assert np.all(ours >= ref * (1 - 1e-6))
    sel = ref > 1e-8
    assert np.max(ours[sel] / ref[sel]) <= 1.05


@pytest.mark.parametrize("r,sigma,steps", [(1, 1.0, 1), (3, 2.0, 10), (10, 4.0, 4)])
def test_full_batch_is_pessimistic_and_tight_against_analytic_gaussian(r, sigma, steps):
    mu = r * np.sqrt(steps) / sigma
    exact = gaussian_delta(mu, EPS)
    ours = pld.group_privacy_profile(1.0, sigma, r, steps, EPS)
    assert np.all(ours >= exact - 1e-12)
    assert np.all(ours <= exact * 1.01 + 1e-9)


def test_own_hockey_stick_matches_dp_accounting():
    composed = pld.group_step_pld(0.01, 1.5, 4).self_compose(50)
    ref = composed.get_delta_for_epsilon(EPS)
    ours = np.maximum(
        pld._hockey_stick(composed._pmf_add, EPS), pld._hockey_stick(composed._pmf_remove, EPS)
    )
    assert np.all(ours >= ref - 1e-15)
    np.testing.assert_allclose(ours, ref, atol=1e-8)


def test_pld_is_tighter_than_rdp_conversion():
    q, sigma, r, steps = 0.001, 2.0, 8, 1000
    deltas = np.array([1e-3, 1e-5, 1e-8])
    eps_rdp = rdp.rdp_to_adp_epsilon(
        rdp.group_rdp(q, sigma, r, steps=steps), rdp.DEFAULT_ORDERS, deltas
    )
    prof = pld.group_privacy_profile(q, sigma, r, steps, eps_rdp)
    assert np.all(prof <= deltas)


def test_profile_monotone_in_r_and_eps():
    prev = np.zeros_like(EPS)
    for r in [1, 2, 5, 20]:
        d = pld.group_privacy_profile(0.001, 2.0, r, 1000, EPS)
        assert np.all(np.diff(d) <= 1e-15)
        assert np.all(d >= prev - 1e-9)
        prev = d


def test_rejects_unsorted_eps():
    with pytest.raises(ValueError):
        pld.group_privacy_profile(0.1, 1.0, 1, 1, np.array([1.0, 0.5]))
