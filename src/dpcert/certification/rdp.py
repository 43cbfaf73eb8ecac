"""Rényi divergences of the Sampled Gaussian Mechanism (SGM) for one example and for groups.

Pure numpy/scipy (no torch). All shifts are in units of the clipping norm C, so the noise has
standard deviation ``sigma`` (the noise multiplier); values are per SGM step unless stated.

Group of r changed examples (docs/method.md, section 2). With Poisson sampling at rate q, the number
of the r examples that enter a step is K ~ Binomial(r, q) and moves the clipped sum by at most
K; the worst case aligns all shifts, so one step is dominated by the scalar pair

    P_r = sum_k Binom(k; r, q) N(k, sigma^2)     vs     Q = N(0, sigma^2)

(the vector-to-scalar reduction is Choquette-Choo et al. 2023, Cor. 4.7; r = 1 is the SGM).
Insertions need D_alpha(P_r || Q), deletions D_alpha(Q || P_r); outcome bounds in both
directions need both, so :func:`group_rdp` returns their maximum. The published Theorem 8
(SGM at q_r = 1 - (1-q)^r with the same noise) is :func:`paper_group_rdp` — unsound, kept only
to reproduce the paper.

No library computes D_alpha of a binomial mixture of Gaussians, so it is written here: a
trapezoid rule in log space. In standardised units z = x / sigma the integrand of the moment
E_Q[(P/Q)^alpha] is, for integer alpha, a positive combination of unit-variance Gaussians, for
which the trapezoid rule with step h has relative error below 2 exp(-2 pi^2 / h^2) (< 1e-130
at h = 1/4). Fractional orders use a step scaled to the largest shift (tested against mpmath).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats

#: Orders used by default: fractional near 1 (where small groups are certified) up to 256.
DEFAULT_ORDERS = np.array(
    [1.1, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0,
     14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 56.0, 64.0, 80.0, 96.0, 128.0, 160.0,
     192.0, 256.0]
)

#: Probability mass of the binomial tail that the quadrature drops (handled soundly below).
TAIL_MASS = 1e-18
_MARGIN = 40.0  # standard deviations around the integrand's support; exp(-800) is below float


def binomial_components(r: int, q: float, tail: float = TAIL_MASS) -> tuple[np.ndarray, np.ndarray]:
    """Shifts k and log-weights log Binom(k; r, q) of the head of the group mixture.

    Keeps k = 0 .. k* where P(K > k*) <= ``tail``; components of zero weight are dropped.
    Returns (shifts, log_weights), both shape (K,).
    """
    if r < 0:
        raise ValueError("group size must be >= 0")
    if q >= 1.0:
        return np.array([float(r)]), np.array([0.0])
    k = np.arange(0, r + 1)
    logw = stats.binom.logpmf(k, r, q)
    # log P(K > k) from the pmf itself: scipy's isf/logsf are inaccurate this far in the tail.
    log_sf = np.append(np.logaddexp.accumulate(logw[::-1])[::-1][1:], -np.inf)
    kmax = int(np.argmax(log_sf <= math.log(tail)))
    k, logw = k[: kmax + 1], logw[: kmax + 1]
    keep = np.isfinite(logw)
    return k[keep].astype(float), logw[keep]


#: Largest quadrature (grid points x mixture components) attempted; beyond it the closed-form
#: convexity bounds below are used instead (sound, looser, and only reached where the
#: divergence is already far too large to certify anything).
QUAD_BUDGET = 20_000_000
_CHUNK = 1 << 21


def _log_ratio(z: np.ndarray, s: np.ndarray, logw: np.ndarray) -> np.ndarray:
    """log (P/Q)(z) = logsumexp_k(log w_k + s_k z - s_k^2 / 2), shape z.shape."""
    rows = max(1, _CHUNK // len(s))
    out = np.empty(z.shape)
    for i in range(0, len(z), rows):
        zc = z[i : i + rows]
        terms = np.multiply.outer(zc, s)
        terms += logw - 0.5 * s**2
        top = terms.max(axis=1)
        # A hand-written log-sum-exp: scipy's costs ~0.5 ms per call in array-API dispatch,
        # which dominates the many small calls of the PLD construction.
        np.exp(terms - top[:, None], out=terms)
        out[i : i + rows] = top + np.log(terms.sum(axis=1))
    return out


def _step(alpha: float, smax: float) -> float:
    if float(alpha).is_integer():
        return 0.25
    # log(P/Q)^alpha for fractional alpha has complex singularities at distance ~ pi / smax
    # from the real line; keep the step well inside that strip.
    return min(0.25, 0.25 / max(smax, 1.0))


def _log_trapezoid(logf: np.ndarray, h: float) -> float:
    return float(special.logsumexp(logf) + math.log(h))


def _log_moment_add(alpha: float, s_all: np.ndarray, logw_all: np.ndarray) -> float:
    """Upper bound on log E_Q[(P_r/Q)^alpha] = (alpha-1) D_alpha(P_r || Q).

    Only a head of the components (all k = 0..r are given) is integrated; the rest are added
    back by Minkowski's inequality in L^alpha(Q): ||sum_k w_k P_k/Q|| <= ||head|| + sum_tail
    w_k ||P_k/Q||, with ||P_k/Q||_alpha = exp((alpha-1) s_k^2 / 2). So the result is an upper
    bound up to quadrature error, never an underestimate from truncation.
    """
    c_all = logw_all + 0.5 * (alpha - 1.0) * s_all**2
    # Smallest head whose Minkowski tail is negligible (<= 1e-14 absolute; ||.|| >= 1).
    rev = np.logaddexp.accumulate(c_all[::-1])[::-1]  # rev[i] = log sum_{k >= i} c_k
    n_head = int(np.argmax(np.append(rev, -np.inf) <= math.log(1e-14)))
    n_head = max(n_head, 1)
    s_h, logw_h = s_all[:n_head], logw_all[:n_head]
    log_xi = rev[n_head] if n_head < len(s_all) else -np.inf
    smax = float(s_h.max())
    h = _step(alpha, smax)
    if (alpha * smax + 2 * _MARGIN) / h * n_head > QUAD_BUDGET:
        # Minkowski over every component: ||sum_k w_k P_k/Q||_alpha <= sum_k w_k ||P_k/Q||_alpha.
        return float(alpha * special.logsumexp(c_all))
    z = np.arange(-_MARGIN, alpha * smax + _MARGIN + h, h)
    logf = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) + alpha * _log_ratio(z, s_h, logw_h)
    log_head = _log_trapezoid(logf, h)
    return float(alpha * np.logaddexp(log_head / alpha, log_xi))


def _log_moment_remove(alpha: float, s: np.ndarray, logw: np.ndarray) -> float:
    """log E_Q[(Q/P_r)^(alpha-1)] = (alpha-1) D_alpha(Q || P_r), from the head components.

    Dropping components lowers P_r, which raises Q/P_r: truncation errs on the safe side.
    """
    smin, smax = float(s.min()), float(s.max())
    h = _step(alpha, smax)
    if ((alpha - 1.0) * smin + 2 * _MARGIN) / h * len(s) > QUAD_BUDGET:
        # Jensen for the convex t -> t^(1-alpha) over the normalised head weights, and
        # E_Q[(P_k/Q)^(1-alpha)] = exp(alpha (alpha-1) s_k^2 / 2).
        log_total = special.logsumexp(logw)
        logv = logw - log_total
        return float((1.0 - alpha) * log_total
                     + special.logsumexp(logv + 0.5 * alpha * (alpha - 1.0) * s**2))
    z = np.arange(-(alpha - 1.0) * smin - _MARGIN, _MARGIN + h, h)
    logf = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) + (1.0 - alpha) * _log_ratio(z, s, logw)
    return _log_trapezoid(logf, h)


def group_rdp(
    q: float,
    sigma: float,
    r: int,
    orders: np.ndarray = DEFAULT_ORDERS,
    *,
    steps: int = 1,
    cap: float = math.inf,
) -> np.ndarray:
    """Sound RDP of r changed examples after ``steps`` SGM steps, max over both directions.

    Args:
        q: Poisson sampling rate in (0, 1].
        sigma: noise multiplier.
        r: group size (number of inserted or of deleted examples), r >= 0.
        orders: Rényi orders alpha > 1, shape (A,).
        steps: number of composed steps T.
        cap: total epsilon above which a value is reported as +inf without computing it exactly
            (+inf is always a sound RDP value; it only makes that order unusable).

    Returns:
        eps, shape (A,): T * max(D_alpha(P_r||Q), D_alpha(Q||P_r)) in nats, +inf where >= cap.
    """
    orders = np.asarray(orders, dtype=float)
    if np.any(orders <= 1.0):
        raise ValueError("Rényi orders must be > 1")
    out = np.zeros(orders.shape)
    if r == 0:
        return out
    z_scale = 1.0 / sigma
    k_all = np.arange(0, r + 1, dtype=float)
    if q >= 1.0:
        s_all, logw_all = np.array([r * z_scale]), np.array([0.0])
    else:
        logw_all = stats.binom.logpmf(k_all, r, q)
        s_all = k_all * z_scale
    k_head, logw_head = binomial_components(r, q)
    s_head = k_head * z_scale
    cap_step = cap / steps
    capped = False
    for i in np.argsort(orders):
        alpha = float(orders[i])
        if capped:  # D_alpha is non-decreasing in alpha
            out[i] = np.inf
            continue
        # Each single component is a rigorous lower bound: (alpha-1) D >= alpha * c_k.
        lower = alpha * float(np.max(logw_all + 0.5 * (alpha - 1.0) * s_all**2)) / (alpha - 1.0)
        if lower >= cap_step:
            out[i], capped = np.inf, True
            continue
        add = _log_moment_add(alpha, s_all, logw_all)
        rem = _log_moment_remove(alpha, s_head, logw_head)
        eps = max(add, rem, 0.0) / (alpha - 1.0)
        if eps >= cap_step:
            out[i], capped = np.inf, True
        else:
            out[i] = steps * eps
    return out


def paper_group_rdp(
    q: float, sigma: float, r: int, orders: np.ndarray = DEFAULT_ORDERS, *, steps: int = 1
) -> np.ndarray:
    """The paper's Theorem 8 (UNSOUND, reproduction only): the SGM at q_r = 1-(1-q)^r, same sigma.

    It ignores that several of the r examples can share a batch; see docs/method.md, section 2.
    """
    if r == 0:
        return np.zeros(np.shape(orders))
    q_r = -math.expm1(r * math.log1p(-q)) if q < 1.0 else 1.0
    return group_rdp(q_r, sigma, 1, orders, steps=steps)


def rdp_to_adp_epsilon(eps_rdp: np.ndarray, orders: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(eps, delta)-DP from an RDP curve (Canonne-Kamath-Steinke 2020; Balle et al. 2020 Thm 21).

    eps(delta) = min_alpha eps(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1),
    floored at 0. Shapes: eps_rdp, orders (A,), delta (D,) -> (D,).
    """
    a = np.asarray(orders, dtype=float)[None, :]
    e = np.asarray(eps_rdp, dtype=float)[None, :]
    ld = np.log(np.asarray(delta, dtype=float))[:, None]
    with np.errstate(invalid="ignore"):
        cand = e + np.log1p(-1.0 / a) - (ld + np.log(a)) / (a - 1.0)
    cand = np.where(np.isfinite(e), cand, np.inf)
    return np.maximum(cand.min(axis=1), 0.0)
