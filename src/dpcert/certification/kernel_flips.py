"""White-box certificates against label flips for DPA over kernel-ridge parts.

A kernel-ridge model is linear in its labels: with M = K + ridge I (n, n) over its part's
examples and k(x) (n,) the kernel between an input and them, its score for label c is

    s_c(x) = sum_i beta_i(x) Y_ic,     beta(x) = M^-1 k(x)            (n,), Y one-hot (n, L),

and flipping example i's label from y to y' moves beta_i(x) from s_y to s_y'. So the fewest
flips that can make a label b reach the part's vote a at x is bounded below by sorting
per-example gains of the margin s_a - s_b (EnsembleCert, Mohgaonkar et al. 2026, for the
exact version; here a relaxation that is exact per label pair):

* an example of label a:      flipping it to b gains 2 beta_i (useful when beta_i > 0);
* an example of label b:      flipping it to a gains -2 beta_i (useful when beta_i < 0);
* an example of another label: |beta_i| (to b when beta_i > 0, to a when beta_i < 0).

Each example is flipped at most once and contributes at most its best gain, so fewer flips
than :func:`part_flip_costs` gives cannot close the margin (a lower bound on the flips that
turn the part, never an over-statement).

The parts' costs then combine into the ensemble's radius (:func:`ensemble_flip_radius`): the
partition hashes inputs only, so each flip lands in exactly one part, and the attacker's
total is the sum over the parts it turns. Moving a part from the ensemble's label A to b
gains 2 on the vote margin n_A - n_b, any other move 1; a fractional relaxation of that
covering problem (each part's moves priced on their convex hull) gives a sound lower bound on
the flips that change the prediction.

Rounding. The kept models score in float32 (:mod:`dpcert.learning.inference`); the margins
here are those of the exact model in float64. :func:`score_tolerance` bounds, from the
operations that compute a stored model's scores, how far the float32 scores of *any*
relabelling of the part can lie from the exact ones; a margin counts only beyond twice that,
and a part whose vote sits within it costs one flip (the counting certificate's price).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_factor, cho_solve

from dpcert.errors import UserError

#: A part that no number of its own flips can turn to a label (n + 1 flips would be needed
#: from its n examples): a cost larger than any certificate reaches.
NEVER = np.iinfo(np.uint16).max
_EPS32 = 2.0 ** -24
_EPS64 = 2.0 ** -53
#: Safety factor over the first-order rounding bound (second-order terms, the softmax).
_SAFETY = 4.0


def _kernel(x: np.ndarray, e: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma |x - e|^2) (N, n) in float64, by the expansion the models use."""
    x = np.asarray(x, np.float64)
    e = np.asarray(e, np.float64)
    d2 = (x * x).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2 * x @ e.T
    return np.exp(-gamma * np.maximum(d2, 0.0))


@dataclass(frozen=True)
class KernelPart:
    """One part's kernel-ridge system, factorised once: its examples (n, D) in float64, their
    squared norms (n,), labels (n,) and M^-1 (n, n), M = K + ridge I as the training built
    it."""

    examples: np.ndarray
    sq: np.ndarray
    labels: np.ndarray
    inverse: np.ndarray


def kernel_part(examples: np.ndarray, labels: np.ndarray, *, gamma: float, ridge: float
                ) -> KernelPart:
    """The :class:`KernelPart` of a part's examples (as its model keeps them) and labels."""
    e = np.asarray(examples, np.float64)
    n = len(e)
    if n == 0:
        inverse = np.zeros((0, 0))
    else:
        m = _kernel(e, e, gamma) + ridge * np.eye(n)
        inverse = cho_solve(cho_factor(m, lower=True), np.eye(n))
    return KernelPart(e, (e * e).sum(1), np.asarray(labels, np.int64), inverse)


def labels_from_coef(examples: np.ndarray, coef: np.ndarray, *, gamma: float, ridge: float
                     ) -> np.ndarray | None:
    """The labels (n,) a kept kernel-ridge model was fitted to: its coefficients A (n, L)
    solve M A = Y, so M A is one-hot up to the float32 rounding of A. None when some row of
    M A is not one-hot up to that rounding, or A is not M^-1 of those one-hot rows up to
    rounding (the model is not kernel ridge of these examples at this ridge — or its
    coefficients are so large, at a tiny ridge, that float32 hides its labels: no white-box
    certificate from it)."""
    if len(examples) == 0:
        return np.zeros(0, np.int64)
    m = _kernel(examples, examples, gamma) + ridge * np.eye(len(examples))
    coef = np.asarray(coef, np.float64)
    y = m @ coef
    labels = y.argmax(axis=1)
    onehot = np.eye(y.shape[1])[labels]
    # M A is one-hot up to the float32 rounding of A, which grows with |A| (about 1 / ridge)
    slack = 0.25 + 4 * len(examples) * _EPS32 * np.abs(m).max() * np.abs(coef).max()
    if slack >= 0.5 or np.abs(y - onehot).max() > slack:
        return None  # no labels recoverable (or not kernel ridge of these examples)
    # and the kept coefficients are those labels' solution up to their float32 rounding, so
    # the model certified (these examples, these labels) is the model that votes
    exact = cho_solve(cho_factor(m, lower=True), onehot)
    if np.abs(coef - exact).max() > 1e-5 * max(1.0, np.abs(exact).max()):
        return None
    return labels


def score_tolerance(k: np.ndarray, part: KernelPart, x_sq: np.ndarray, *, gamma: float,
                    ridge: float) -> np.ndarray:
    """Bound (N,) on how far the float32 scores of the part's model, under any labels, and the
    float64 quantities computed here can lie from the exact model's, at inputs whose kernel
    with the part is k (N, n) and squared norms x_sq (N,).

    A kept model's score is sum_i k^_i A^_ic, A = M^-1 Y rounded to float32, k^ the float32
    kernel: |k^_i - k_i| <= k_i kappa, kappa = gamma e_d + 2 eps with e_d <= (2D + 6) eps
    (|x|^2 + max |e_i|^2) the error of the expanded squared distance and of gamma times it;
    the rounding of A and the n-term float32 sum add (n + 3) eps. All are relative to
    sum_i k_i |A_ic|, which for every labelling Y in {0, 1}^n is at most
    T(x) = sum_ij k_i |M^-1_ij|. The float64 Cholesky solve adds n cond(M) eps64
    sum_ij |M^-1_ij|, cond(M) <= (n + ridge) / ridge, and the softmax over 10 x the score a few
    float32 ulps. Margins minus gains computed here in float64 move by at most
    3 (n + D) eps64 T. These are first-order bounds (exp(gamma delta) - 1 taken as
    gamma delta), times a safety factor of 4 that covers the second-order terms while
    kappa <= 1/8; beyond that, 2 tol >= 8 T kappa exceeds every margin (|margin| <= T), so
    every part costs one flip, as in counting."""
    n, dim = part.examples.shape
    if n == 0:
        return np.zeros(len(k))
    t = k @ np.abs(part.inverse).sum(axis=1)  # (N,); M^-1 is symmetric
    kappa = gamma * (2 * dim + 6) * _EPS32 * (x_sq + part.sq.max()) + 2 * _EPS32
    relative = kappa + (n + 3) * _EPS32 + 3 * (n + dim) * _EPS64
    solve = n * (n + ridge) / ridge * _EPS64 * np.abs(part.inverse).sum()
    softmax = 16 * _EPS32 * (1.0 + t)
    return _SAFETY * (t * relative + solve + softmax)


def part_flip_costs(x: np.ndarray, examples: np.ndarray, labels: np.ndarray, votes: np.ndarray,
                    *, num_classes: int, gamma: float, ridge: float) -> np.ndarray:
    """Lower bounds (N, L) uint16 on the flips of this part's labels that make label b reach
    the part's vote a = ``votes`` (N,) at each input x (N, D): 0 at b = a, at least 1
    elsewhere, :data:`NEVER` where flipping every label of the part cannot.

    ``examples`` (n, D) and ``labels`` (n,) are the part's training examples (the vectors its
    model keeps) and labels; ``votes`` the labels the kept model votes for (from its float32
    scores)."""
    part = kernel_part(examples, labels, gamma=gamma, ridge=ridge)
    x64 = np.asarray(x, np.float64)
    # the kept model's kernel uses gamma as it stores it, in float32
    k = _kernel(x64, part.examples, float(np.float32(gamma)))
    return _costs(k, part, np.asarray(votes, np.int64), (x64 * x64).sum(1),
                  num_classes=num_classes, gamma=gamma, ridge=ridge)


def _costs(k: np.ndarray, part: KernelPart, votes: np.ndarray, x_sq: np.ndarray, *,
           num_classes: int, gamma: float, ridge: float) -> np.ndarray:
    """:func:`part_flip_costs` from the kernel k (N, n) between the inputs and the part."""
    n_points, n = k.shape
    rows = np.arange(n_points)
    costs = np.full((n_points, num_classes), NEVER, np.uint16)
    costs[rows, votes] = 0
    if n == 0:  # an empty part answers label 0 whatever the labels: no flip turns it
        return costs
    beta = k @ part.inverse  # (N, n); M^-1 is symmetric
    scores = beta @ np.eye(num_classes)[part.labels]  # (N, L), the exact model's
    tol = score_tolerance(k, part, x_sq, gamma=gamma, ridge=ridge)
    # a rival reaches the vote in float32 only once the exact margin is within 2 tol
    margin = scores[rows, votes][:, None] - scores - 2 * tol[:, None]  # (N, L)
    is_a = part.labels[None, :] == votes[:, None]  # (N, n)
    # each example's best gain against a rival b it is not labelled with, and (for an
    # example of label b) flipped to a
    gain = np.where(is_a, np.maximum(2 * beta, 0.0), np.abs(beta))
    towards_a = np.maximum(-2 * beta, 0.0)
    of_b = part.labels[None, None, :] == np.arange(num_classes)[None, :, None]  # (1, L, n)
    g = np.where(of_b, towards_a[:, None, :], gain[:, None, :])  # (N, L, n)
    reach = np.cumsum(-np.sort(-g, axis=2), axis=2)  # best margin closed by 1..n flips
    short = (reach < margin[:, :, None]).sum(axis=2)  # (N, L)
    # a cost of NEVER or more (a part of 65,535 examples) is stored one below it: a smaller
    # lower bound, never "cannot turn"
    cost = np.minimum(np.where(margin <= 0, 1, short + 1), int(NEVER) - 1)
    out = np.where(short >= n, NEVER, cost).astype(np.uint16)
    out[rows, votes] = 0
    return out


def ensemble_flip_radius(costs: np.ndarray, part_votes: np.ndarray, num_classes: int,
                         *, max_radius: int) -> tuple[np.ndarray, np.ndarray]:
    """DPA's (prediction (N,), certified label-flip radius (N,)) from the parts' costs
    (P, N, L) (:func:`part_flip_costs`) and votes (P, N).

    The prediction is the vote's top label (ties to the smaller label, as
    :func:`~dpcert.certification.baselines.dpa_radius`). For each rival b the attacker must
    close the gap G = n_A - n_b + [b > A]: a part voting A gains 2 at cost c(A->b) or 1 at
    c(A->c), so its first unit costs f1 = min(c(A->b), min_c c(A->c)) and two cost
    f2 = c(A->b) — priced on the lower convex hull (f1 and f2 - f1, or f2 / 2 each); a part
    voting c != A, b gains 1 at c(c->b). The G cheapest units (the linear relaxation of
    choosing one move per part) bound the attacker's flips from below; the radius is one
    less than the smallest bound over b, capped at ``max_radius``. Every part costs at least
    one flip per vote it moves, so this is never below DPA's counting certificate."""
    if num_classes < 2:
        raise UserError(f"a certificate needs at least two labels, got {num_classes}")
    p, n_points, _ = costs.shape
    step = max(1, (1 << 22) // max(1, p * num_classes))
    out = [_radius_block(costs[:, i:i + step], np.asarray(part_votes)[:, i:i + step],
                         num_classes, max_radius) for i in range(0, n_points, step)]
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def _radius_block(costs: np.ndarray, part_votes: np.ndarray, num_classes: int,
                  max_radius: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ensemble_flip_radius` on a block of inputs."""
    p, n_points, _ = costs.shape
    rows = np.arange(n_points)
    v = part_votes.T  # (N, P)
    votes = np.zeros((n_points, num_classes), np.int64)
    np.add.at(votes, (np.repeat(rows, p), v.ravel()), 1)
    pred = votes.argmax(axis=1)
    c = np.where(costs == NEVER, np.inf, costs.astype(np.float64)).transpose(1, 0, 2)
    on_a = v == pred[:, None]  # (N, P)
    # the two cheapest moves of each part to a label other than A (used by parts voting A)
    away = c.copy()
    away[rows, :, pred] = np.inf
    order = np.argsort(away, axis=2)[:, :, :2]
    first, second = (np.take_along_axis(away, order[:, :, i:i + 1], 2)[:, :, 0]
                     for i in range(2))
    best = np.full(n_points, np.inf)
    for b in range(num_classes):
        gap = votes[rows, pred] - votes[:, b] + (b > pred)
        other = np.where(order[:, :, 0] == b, second, first)  # cheapest move to neither
        # a part voting A: one unit of gap costs f1 = min(c(A->b), other), two cost
        # f2 = c(A->b); priced on the lower convex hull of (0, f1, f2), the LP relaxation
        f2 = c[:, :, b]
        f1 = np.minimum(f2, other)
        with np.errstate(invalid="ignore"):  # inf - inf where the part cannot move: f2 / 2
            convex = f2 - f1 >= f1
            second_unit = np.where(convex, f2 - f1, f2 / 2)
        first_unit = np.where(convex, f1, f2 / 2)
        price = np.where(on_a, first_unit, np.where(v == b, np.inf, f2))
        units = np.sort(np.concatenate([price, np.where(on_a, second_unit, np.inf)], axis=1),
                        axis=1)  # (N, 2P)
        total = np.cumsum(units, axis=1)
        bound = total[rows, np.clip(gap - 1, 0, 2 * p - 1)]
        best = np.where(pred != b, np.minimum(best, bound), best)
    # flips are whole: the attacker needs at least ceil(bound) (sums of halves are exact)
    flips = np.ceil(best)
    radius = np.where(np.isinf(flips), max_radius, np.minimum(flips - 1, max_radius))
    return pred, radius.astype(np.int64)


#: Example rows whose kernel with a block of inputs is computed in one matrix product.
_ROWS_PER_PRODUCT = 2048


def dpa_kernel_radius(x: np.ndarray, parts: list[KernelPart], part_votes: np.ndarray, *,
                      num_classes: int, gamma: float, max_radius: int, ridge: float,
                      block: int = 2000, tick=None) -> tuple[np.ndarray, np.ndarray]:
    """DPA's white-box (prediction, label-flip radius) (N,) over kernel-ridge parts
    (:func:`kernel_part`) with votes (P, N) on inputs x (N, D), in blocks of ``block``
    inputs (the costs of a block, P x block x L, are held at once). The kernels of a block
    with many parts come from one float64 matrix product. ``tick(parts_done)``, if given, is
    called after each group of parts (a progress bar's update)."""
    preds, radii = [], []
    groups = _groups([len(p.examples) for p in parts])
    for i in range(0, len(x), block):
        xb = np.asarray(x[i:i + block], np.float64)
        x_sq = (xb * xb).sum(1)
        costs = np.empty((len(parts), len(xb), num_classes), np.uint16)
        for group in groups:
            cross = xb @ np.concatenate([parts[p].examples for p in group]).T
            at = 0
            for p in group:
                part = parts[p]
                n = len(part.examples)
                d2 = x_sq[:, None] + part.sq[None, :] - 2 * cross[:, at:at + n]
                at += n
                k = np.exp(-gamma * np.maximum(d2, 0.0))
                costs[p] = _costs(k, part, part_votes[p, i:i + block], x_sq,
                                  num_classes=num_classes, gamma=gamma, ridge=ridge)
            if tick is not None:
                tick(len(group))
        pred, radius = ensemble_flip_radius(costs, part_votes[:, i:i + block], num_classes,
                                            max_radius=max_radius)
        preds.append(pred)
        radii.append(radius)
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(preds), np.concatenate(radii)


def _groups(sizes: list[int]) -> list[list[int]]:
    """Consecutive parts in groups of at most :data:`_ROWS_PER_PRODUCT` example rows."""
    groups: list[list[int]] = [[]]
    rows = 0
    for p, n in enumerate(sizes):
        if groups[-1] and rows + n > _ROWS_PER_PRODUCT:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += n
    return [g for g in groups if g]
