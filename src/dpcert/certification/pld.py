"""Exact privacy profiles (privacy loss distributions) of the SGM for groups of r examples.

The r-group step is the scalar pair P_r = sum_k Binom(k; r, q) N(k, sigma^2) vs Q = N(0, sigma^2)
(see :mod:`dpcert.certification.rdp`). Its privacy profile delta(eps) = sup_E P(E) - e^eps Q(E),
composed over T steps and maximised over both directions, is the tightest outcome guarantee the
mechanism allows: p' <= e^eps p + delta(eps) and p' >= e^-eps (p - delta(eps)) for every eps.

Composition and delta(eps) come from Google's dp-accounting (``DensePLDPmf``, FFT composition,
pessimistic tail truncation). Only the single-step distribution is built here: dp-accounting's
own ``from_mixture_gaussian_mechanism`` builds the same object but takes seconds to minutes
per r (a scalar bisection per loss bucket), while here the inversion is vectorised.
The discretisation is dp-accounting's pessimistic Connect-the-Dots, fed with the exact
single-step hockey-stick divergences, so the delta we return is an upper bound on the true
profile (tested against dp-accounting's own mixture PLD and the q = 1 analytic Gaussian).
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution
from scipy import special, stats

from dpcert.certification.rdp import _log_ratio, binomial_components

#: Default loss discretisation (dp-accounting's default).
DEFAULT_DISCRETIZATION = 1e-4
#: Output mass (per step, per side) left outside the explicit support; it goes to +inf loss.
_EDGE_MASS = 1e-17
_Z_EDGE = 8.6  # Phi(-8.6) < 1e-17
_INVERSION_GRID = 20_001
FFT_ALLOWANCE = 1e-11


def _right_edge(s: np.ndarray, logw: np.ndarray) -> float:
    """z (standardised) with P_head(Z > z) <= _EDGE_MASS: the first point of a 1/64 grid
    where the mixture tail is that small (the tail decreases in z; overshooting the exact
    crossing by less than 1/64 only widens the explicit support)."""
    z = np.arange(0.0, float(s.max()) + 12.0 + 1 / 64, 1 / 64)
    tail = special.logsumexp(logw[None, :] + special.log_ndtr(s[None, :] - z[:, None]), axis=1)
    return float(z[np.argmax(tail <= math.log(_EDGE_MASS))])


def _invert_log_ratio(levels: np.ndarray, s: np.ndarray, logw: np.ndarray,
                      z_lo: float, z_hi: float) -> np.ndarray:
    """z with log(P_head/Q)(z) = level, for ascending levels inside the range on [z_lo, z_hi].

    The log-ratio is a log-sum-exp of affine functions: convex and increasing. A chord inverse
    on a dense grid, polished by Newton steps (derivative = posterior mean shift), reaches
    machine precision; delta is then evaluated at z, where an error dz costs O(dz^2) only.
    Newton stops once no point moves by more than 1e-13 (at most 6 steps; from the chord
    start two or three suffice).
    """
    zg = np.linspace(z_lo, z_hi, _INVERSION_GRID)
    z = np.interp(levels, _log_ratio(zg, s, logw), zg)
    offset = logw - 0.5 * s**2
    for _ in range(6):
        terms = np.multiply.outer(z, s)
        terms += offset
        top = terms.max(axis=1)
        np.exp(terms - top[:, None], out=terms)
        total = terms.sum(axis=1)
        slope = (terms @ s) / total
        step = (top + np.log(total) - levels) / np.maximum(slope, 1e-300)
        z = np.clip(z - step, z_lo, z_hi)
        if float(np.max(np.abs(step), initial=0.0)) < 1e-13:
            break
    return z


def _ctd_pmf(lo: int, hi: int, deltas: np.ndarray, interval: float) -> pld_pmf.PLDPmf:
    # Hockey-stick divergences are non-increasing in eps; enforce it against rounding by a
    # running max from the right, which only raises values (pessimistic).
    deltas = np.clip(np.maximum.accumulate(deltas[::-1])[::-1], 0.0, 1.0)
    return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(interval, lo, hi, deltas)


def group_step_pld(q: float, sigma: float, r: int, *,
                   interval: float = DEFAULT_DISCRETIZATION) -> PrivacyLossDistribution:
    """Pessimistic PLD of one SGM step for a group of r >= 1 examples, both directions.

    'add' direction: upper = P_r, lower = Q (insertions); 'remove': upper = Q, lower = P_r.
    Both are built with dp-accounting's Connect-the-Dots discretisation from exact
    hockey-stick divergences delta(eps) on the loss grid. Binomial components beyond the
    head (mass tau <= 1e-18) are handled soundly: 'add' gains +tau on every delta, 'remove'
    uses the unnormalised head P_h <= P_r, which can only raise Q(E) - e^eps P(E).
    """
    if r < 1:
        raise ValueError("group size must be >= 1")
    k, logw = binomial_components(r, q)
    s = k / sigma
    w = np.exp(logw)
    tau = max(0.0, 1.0 - float(w.sum()))
    z_hi = _right_edge(s, logw)

    def tail_p(z: np.ndarray) -> np.ndarray:  # P_head(Z > z), shape z
        return np.sum(w[None, :] * stats.norm.sf(z[:, None] - s[None, :]), axis=1)

    def head_p(z: np.ndarray) -> np.ndarray:  # P_head(Z <= z)
        return np.sum(w[None, :] * stats.norm.cdf(z[:, None] - s[None, :]), axis=1)

    # add: loss l(z) = log(P/Q)(z) increasing; delta(eps) = P(Z > z_eps) - e^eps Q(Z > z_eps).
    l_lo, l_hi = _log_ratio(np.array([-_Z_EDGE, z_hi]), s, logw)
    lo, hi = math.floor(l_lo / interval), math.ceil(l_hi / interval)
    eps = interval * np.arange(lo, hi + 1)
    z_lo, z_top = -_Z_EDGE - 1.0, z_hi + 1.0
    z = _invert_log_ratio(eps, s, logw, z_lo, z_top)
    # Where the optimum lies beyond the clipped range, the value at the clip point is short of
    # the supremum by at most the P-mass beyond it: add that mass everywhere.
    edge = float(tail_p(np.array([z_top]))[0] + np.sum(w * stats.norm.cdf(z_lo - s)))
    d_add = tail_p(z) - np.exp(eps) * stats.norm.sf(z) + tau + edge
    pmf_add = _ctd_pmf(lo, hi, d_add, interval)

    # remove: loss -l(z) decreasing; delta(eps) = Q(Z < z) - e^eps P_h(Z < z), l(z) = -eps.
    top = -logw[0] if k[0] == 0 else np.inf  # sup of the loss, reached as z -> -inf
    l_lo, l_hi = _log_ratio(np.array([-_Z_EDGE, _Z_EDGE]), s, logw)
    lo, hi = math.floor(-l_hi / interval), math.ceil(min(top, -l_lo) / interval)
    eps = interval * np.arange(lo, hi + 1)
    z_lo, z_top = -_Z_EDGE - 1.0 - float(s.min()), _Z_EDGE + 1.0
    z = _invert_log_ratio(-eps[::-1], s, logw, z_lo, z_top)[::-1]
    edge = float(stats.norm.cdf(z_lo) + stats.norm.sf(z_top))  # as above, for Q
    d_rem = stats.norm.cdf(z) - np.exp(eps) * head_p(z) + edge
    pmf_rem = _ctd_pmf(lo, hi, d_rem, interval)
    return PrivacyLossDistribution(pmf_remove=pmf_rem, pmf_add=pmf_add)


def _hockey_stick(pmf: pld_pmf.PLDPmf, eps: np.ndarray) -> np.ndarray:
    """delta(eps) of a composed dense PMF for ascending eps >= 0, in O(support + E).

    dp-accounting's vectorised version costs O(support x E) (seconds for the supports of
    composed group PLDs). Here: delta(eps) = m_inf + S1(i) - e^eps S2(i) with suffix sums
    S1 = sum_{l_j > eps} p_j, S2 = sum_{l_j > eps} p_j e^-l_j. A rounding allowance of
    support x 2^-50 x S1 is added so cancellation can only raise delta (tested against
    dp-accounting's ``get_delta_for_epsilon``).
    """
    dense = pmf.to_dense_pmf()
    # pylint: disable=protected-access  (pinned dp-accounting==0.6.0; checked in tests)
    probs = np.asarray(dense._probs, dtype=float)
    losses = (np.arange(probs.size) + dense._lower_loss) * dense._discretization
    m_inf = float(dense._infinity_mass)
    keep = losses > eps[0]
    probs, losses = probs[keep], losses[keep]
    s1 = np.append(np.cumsum(probs[::-1])[::-1], 0.0)
    s2 = np.append(np.cumsum((probs * np.exp(-losses))[::-1])[::-1], 0.0)
    idx = np.searchsorted(losses, eps, side="right")
    delta = s1[idx] - np.exp(eps) * s2[idx]
    return m_inf + np.maximum(delta, 0.0) + probs.size * 2.0**-50 * s1[idx]


def group_privacy_profile(q: float, sigma: float, r: int, steps: int, epsilons: np.ndarray, *,
                          interval: float = DEFAULT_DISCRETIZATION) -> np.ndarray:
    """delta_r(eps) after ``steps`` SGM steps, max over insertion/deletion; shape (E,).

    ``epsilons`` must be ascending and >= 0. r = 0 gives zeros. Values are clipped to [0, 1].
    """
    eps = np.asarray(epsilons, dtype=float)
    if np.any(np.diff(eps) < 0) or eps[0] < 0:
        raise ValueError("epsilons must be ascending and non-negative")
    if r == 0:
        return np.zeros(eps.shape)
    composed = group_step_pld(q, sigma, r, interval=interval).self_compose(steps)
    # pylint: disable=protected-access
    d = np.maximum(_hockey_stick(composed._pmf_add, eps), _hockey_stick(composed._pmf_remove, eps))
    # FFT composition carries absolute rounding errors of order 1e-13 (seen against
    # dp-accounting's own mixture PLD); a 1e-11 allowance keeps every value an upper bound.
    return np.clip(d + FFT_ALLOWANCE, 0.0, 1.0)
