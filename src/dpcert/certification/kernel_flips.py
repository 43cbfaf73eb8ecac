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
covering problem (each part's gain priced at its cheapest cost per unit) gives a sound lower
bound on the flips that change the prediction.

Rounding. The kept models score in float32 (:mod:`dpcert.learning.inference`); the margins
here are those of the exact model in float64. :func:`score_tolerance` bounds, from the
operations that compute a stored model's scores, how far the float32 scores of *any*
relabelling of the part can lie from the exact ones; a margin counts only beyond twice that,
and a part whose vote sits within it costs one flip (the counting certificate's price).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cho_factor, cho_solve

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


def _factor(examples: np.ndarray, gamma: float, ridge: float):
    """Cholesky factor of M = K + ridge I (the training's system) and M^-1 (n, n)."""
    n = len(examples)
    m = _kernel(examples, examples, gamma) + ridge * np.eye(n)
    factor = cho_factor(m, lower=True)
    return factor, cho_solve(factor, np.eye(n))


def labels_from_coef(examples: np.ndarray, coef: np.ndarray, *, gamma: float, ridge: float
                     ) -> np.ndarray | None:
    """The labels (n,) a kept kernel-ridge model was fitted to: its coefficients A (n, L)
    solve M A = Y, so M A is one-hot up to the float32 rounding of A. None when some row of
    M A is not within 0.25 of a one-hot row (the model is not kernel ridge of these
    examples at this ridge: no white-box certificate for it)."""
    if len(examples) == 0:
        return np.zeros(0, np.int64)
    m = _kernel(examples, examples, gamma) + ridge * np.eye(len(examples))
    y = m @ np.asarray(coef, np.float64)
    labels = y.argmax(axis=1)
    onehot = np.eye(y.shape[1])[labels]
    if np.abs(y - onehot).max() > 0.25:
        return None
    return labels


def score_tolerance(x: np.ndarray, examples: np.ndarray, inverse: np.ndarray, *,
                    gamma: float, ridge: float) -> np.ndarray:
    """Bound (N,) on |float32 score - exact score| of the part's model, under any labels.

    The float32 score is sum_i k^_i A^_ic with A = M^-1 Y rounded to float32 and k^ the
    float32 kernel: |k^_i - k_i| <= k_i (gamma e_d + 2 eps) with e_d <= (2D + 4) eps
    (|x|^2 + |e_i|^2) the error of the expanded squared distance, the rounding of A and the
    n-term float32 sum add (n + 3) eps of sum_i k_i |A_ic|; and sum_i k_i |A_ic| <=
    sum_j sum_i |M^-1_ij| = S for every labelling Y in {0, 1}^n (k <= 1). The float64 solve
    adds cond(M) eps64 S, cond(M) <= (n + ridge) / ridge. The softmax over scale * score adds
    a few float32 ulps of the logits. All times a safety factor of 4."""
    n, dim = examples.shape
    if n == 0:
        return np.zeros(len(x))
    s = np.abs(inverse).sum()
    norms = (np.asarray(x, np.float64) ** 2).sum(1) + (np.asarray(examples, np.float64)
                                                       ** 2).sum(1).max()
    kernel_rel = gamma * (2 * dim + 4) * _EPS32 * norms + 2 * _EPS32
    relative = kernel_rel + (n + 3) * _EPS32 + (n + ridge) / ridge * _EPS64
    softmax = 16 * _EPS32 * (1.0 + s)
    return _SAFETY * (s * relative + softmax)


def part_flip_costs(x: np.ndarray, examples: np.ndarray, labels: np.ndarray, votes: np.ndarray,
                    *, num_classes: int, gamma: float, ridge: float) -> np.ndarray:
    """Lower bounds (N, L) uint16 on the flips of this part's labels that make label b reach
    the part's vote a = ``votes`` (N,) at each input x (N, D): 0 at b = a, at least 1
    elsewhere, :data:`NEVER` where flipping every label of the part cannot.

    ``examples`` (n, D) and ``labels`` (n,) are the part's training examples (the vectors its
    model keeps) and labels; ``votes`` the labels the kept model votes for (from its float32
    scores)."""
    x = np.asarray(x)
    votes = np.asarray(votes, np.int64)
    n_points, n = len(x), len(examples)
    costs = np.full((n_points, num_classes), NEVER, np.uint16)
    if n == 0:  # an empty part answers label 0 whatever the labels: no flip turns it
        costs[np.arange(n_points), votes] = 0
        return costs
    labels = np.asarray(labels, np.int64)
    _, inverse = _factor(examples, gamma, ridge)
    beta = _kernel(x, examples, gamma) @ inverse  # (N, n); M is symmetric
    scores = beta @ np.eye(num_classes)[labels]  # (N, L), the exact model's
    tol = score_tolerance(x, examples, inverse, gamma=gamma, ridge=ridge)
    rows = np.arange(n_points)
    # a rival reaches the vote in float32 only once the exact margin is within 2 tol
    margin = scores[rows, votes][:, None] - scores - 2 * tol[:, None]
    is_a = labels[None, :] == votes[:, None]  # (N, n)
    # best gain per example against any b whose label the example does not carry
    gain = np.where(is_a, np.maximum(2 * beta, 0.0), np.abs(beta))
    towards_a = np.maximum(-2 * beta, 0.0)  # an example of label b flipped to a
    for b in range(num_classes):
        g = np.where((labels == b)[None, :], towards_a, gain)
        g = -np.sort(-g, axis=1)  # largest gains first
        reach = np.cumsum(g, axis=1)  # (N, n): the best margin closed by 1..n flips
        short = (reach < margin[:, b:b + 1]).sum(axis=1)
        cost = np.where(margin[:, b] <= 0, 1, short + 1)
        costs[:, b] = np.where(short >= n, NEVER, cost).astype(np.uint16)
    costs[rows, votes] = 0
    return costs


def ensemble_flip_radius(costs: np.ndarray, part_votes: np.ndarray, num_classes: int,
                         *, max_radius: int) -> tuple[np.ndarray, np.ndarray]:
    """DPA's (prediction (N,), certified label-flip radius (N,)) from the parts' costs
    (P, N, L) (:func:`part_flip_costs`) and votes (P, N).

    The prediction is the vote's top label (ties to the smaller label, as
    :func:`~dpcert.certification.baselines.dpa_radius`). For each rival b the attacker must
    close the gap G = n_A - n_b + [b > A]: a part voting A gains up to 2 at cost c(A->b)
    (gain 2) or c(A->c) (gain 1), priced per unit at min(c(A->b) / 2, min_c c(A->c)); a part
    voting c != A, b gains 1 at c(c->b). The G cheapest units bound the attacker's flips from
    below; the radius is one less than the smallest bound over b, capped at ``max_radius``.
    Every part costs at least one flip per vote it moves, so this is never below DPA's
    counting certificate."""
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
        price = np.where(on_a, np.minimum(c[:, :, b] / 2, other),
                         np.where(v == b, np.inf, c[:, :, b]))
        units = np.sort(np.concatenate([price, np.where(on_a, price, np.inf)], axis=1),
                        axis=1)  # (N, 2P): a part leaving A for b moves the gap by 2
        total = np.cumsum(units, axis=1)
        bound = total[rows, np.clip(gap - 1, 0, 2 * p - 1)]
        best = np.where(pred != b, np.minimum(best, bound), best)
    # flips are whole: the attacker needs at least ceil(bound) (sums of halves are exact)
    flips = np.ceil(best)
    radius = np.where(np.isinf(flips), max_radius, np.minimum(flips - 1, max_radius))
    return pred, radius.astype(np.int64)


def dpa_kernel_radius(x: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]],
                      part_votes: np.ndarray, *, num_classes: int, gamma: float, ridge: float,
                      max_radius: int, block: int = 2000, tick=None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """DPA's white-box (prediction, label-flip radius) (N,) over kernel-ridge parts: each
    part's (examples (n, D), labels (n,)) with its votes (P, N) on inputs x (N, D), in blocks
    of ``block`` inputs (the costs of a block, P x block x L, are held at once). ``tick``,
    if given, is called once per part and block (a progress bar's update)."""
    preds, radii = [], []
    for i in range(0, len(x), block):
        xb = x[i:i + block]
        costs = np.empty((len(parts), len(xb), num_classes), np.uint16)
        for p, (examples, labels) in enumerate(parts):
            costs[p] = part_flip_costs(xb, examples, labels, part_votes[p, i:i + block],
                                       num_classes=num_classes, gamma=gamma, ridge=ridge)
            if tick is not None:
                tick()
        pred, radius = ensemble_flip_radius(costs, part_votes[:, i:i + block], num_classes,
                                            max_radius=max_radius)
        preds.append(pred)
        radii.append(radius)
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(preds), np.concatenate(radii)
