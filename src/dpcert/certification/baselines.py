"""Certificates of the peer defences, from vote counts (radius = insertions + deletions).

* DPA (Levine & Feizi, ICLR 2021): k models on a deterministic hash partition; each poisoned
  example changes one partition, i.e. at most one vote, moving the gap by at most 2:
  radius = floor((n_c - max_{c' != c} (n_c' + [c' < c])) / 2).
* Finite Aggregation (Wang, Levine, Feizi, ICML 2022): every example is hashed into one of
  k d buckets; bucket h is spread to the d models (h + s) mod kd, s in a fixed set of d shifts,
  so one poisoned example reaches the d models of one bucket. Full certificate (their Thm. 2):
  against rival c', poisoning bucket h can lower the gap by
  delta_h(c') = sum over its models m of (1 + [f_m = c] - [f_m = c']), and the prediction c is
  certified for t buckets iff the t largest delta_h(c') sum to at most
  n_c - n_c' - [c' < c], for every c'. With counts alone (no per-model votes) the sound
  bound replaces every delta_h by its maximum 2 d: radius = floor(gap / (2 d)).
* Run-off Election (Rezaei, Banihashem, Chegini, Feizi, ICML 2023), DPA-style partitions: two
  rounds over the same k models. Round 1: plurality of the models' top labels; the two best
  (ties to the smaller label) are the finalists. Round 2: every model votes for the finalist
  it ranks higher (ranking by score, ties to the smaller label); the winner has more votes
  (ties to the smaller label). One poisoned example corrupts at most one model, so the
  radius is the least number of models whose rankings, changed arbitrarily, change the
  winner, minus one: see :func:`roe_certificate` for the three ways it can change and the
  bound on each.
* Bagging (Jia, Cao, Gong, AAAI 2021): N models on k examples drawn with replacement from n;
  certified at r iff max_{n-r <= n' <= n+r} (n'/n)^k - 2 ((max(n, n') - r)/n)^k + 1
  - p1_lo + p2_hi < 0 with SimuEM bounds. The left side minus the p terms depends only on
  (n, k, r), so it is tabulated once and every point is searched at once.
* Statistical DP baseline (Ma, Zhu, Hsu 2019): a certified-*accuracy* lower bound (not a
  pointwise certificate) from an (eps, delta)-DP learner and a lower bound on its accuracy:
  CA_r >= max(e^(-r eps) (acc_lo + delta / (e^eps - 1)) - delta / (e^eps - 1), 0).
"""

from __future__ import annotations

import numpy as np

from dpcert.certification.bounds import vote_bounds
from dpcert.certification.certify import ABSTAIN
from dpcert.errors import UserError

METHODS = ("dp", "bagging", "dpa", "fa", "roe")


def _gap(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prediction (ties to the smaller label) and n_c - max_{c' != c}(n_c' + [c' < c])."""
    counts = np.asarray(counts, dtype=np.int64)
    pred = np.argmax(counts, axis=1)
    n = np.arange(len(counts))
    labels = np.arange(counts.shape[1])[None, :]
    rivals = counts + (labels < pred[:, None])
    rivals[n, pred] = np.iinfo(np.int64).min
    return pred, counts[n, pred] - rivals.max(axis=1)


def dpa_radius(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for DPA vote counts (N, L), one vote per partition model."""
    pred, gap = _gap(counts)
    return pred, np.floor_divide(gap, 2)


def fa_radius(counts: np.ndarray, spread: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for Finite Aggregation counts with spread d (count-only bound)."""
    if not (isinstance(spread, int | np.integer) and spread >= 1):
        raise UserError(f"--spread must be a positive integer, got {spread!r}")
    pred, gap = _gap(counts)
    return pred, np.floor_divide(gap, 2 * int(spread))


#: The reference implementation draws its d shifts with Python's ``random`` seeded by this
#: value (wangwenxiao/FiniteAggregation); using the same default lets their saved
#: per-model predictions be certified here with the structure they were trained under.
FA_REFERENCE_SEED = 999999999 + 208


def fa_shifts(buckets: int, spread: int, seed: int = FA_REFERENCE_SEED) -> np.ndarray:
    """The d distinct shifts s of the spreading map bucket h -> models (h + s) mod kd."""
    import random

    if not 1 <= spread <= buckets:
        raise UserError(f"spread must be between 1 and the number of models ({buckets}), "
                        f"got {spread}")
    return np.array(random.Random(seed).sample(range(buckets), spread), dtype=np.int64)


def _spreading_shifts(buckets: int, spread: int, shifts: np.ndarray | None) -> np.ndarray:
    """The d distinct shifts given, or the reference implementation's when None."""
    shifts = fa_shifts(buckets, spread) if shifts is None else np.asarray(shifts, np.int64)
    if len(shifts) != spread or len(set(shifts.tolist())) != spread:
        raise UserError(f"FA needs {spread} distinct shifts, got {shifts.tolist()}")
    return shifts


def fa_models_of_bucket(buckets: int, shifts: np.ndarray) -> np.ndarray:
    """(kd, d) array: the models that train on bucket h, row h."""
    return (np.arange(buckets)[:, None] + np.asarray(shifts)[None, :]) % buckets


def fa_certificate(predictions: np.ndarray, num_classes: int, spread: int,
                   shifts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) of Finite Aggregation from every model's label.

    predictions: int (N, kd), the label each of the kd models gives each test point.
    Radius = largest number of poisoned buckets (= inserted + deleted examples) that cannot
    change the plurality prediction (ties to the smaller label), Wang et al. 2022, Thm. 2.
    """
    preds = np.asarray(predictions)
    if preds.ndim != 2 or preds.shape[1] < 1:
        raise UserError(f"FA predictions must have shape (N, models), got {preds.shape}")
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
        raise UserError(f"FA predictions must be labels in 0..{num_classes - 1}")
    n, kd = preds.shape
    shifts = _spreading_shifts(kd, spread, shifts)
    counts = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), kd), preds.ravel()), 1)
    pred, _ = _gap(counts)
    of_bucket = fa_models_of_bucket(kd, shifts)  # (kd, d)
    is_pred = (preds == pred[:, None]).astype(np.int64)
    radius = np.full(n, np.iinfo(np.int64).max)
    rows = np.arange(n)
    for c in range(num_classes):
        rival = pred != c
        gap = counts[rows, pred] - counts[:, c] - (c < pred)
        per_model = 1 + is_pred - (preds == c)  # (N, kd): how far one model can move the gap
        delta = per_model[:, of_bucket].sum(axis=2)  # (N, kd buckets)
        spent = np.cumsum(-np.sort(-delta, axis=1), axis=1)
        r_c = (spent <= gap[:, None]).sum(axis=1)
        radius = np.where(rival, np.minimum(radius, r_c), radius)
    return pred, radius.astype(np.int64)


def model_rankings(scores: np.ndarray) -> np.ndarray:
    """Rank of every label in every model's ranking: (k, N, L) scores -> (k, N, L) ints, 0 for
    the top label; higher score first, ties to the smaller label."""
    order = np.argsort(-np.asarray(scores), axis=2, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[2])[None, None, :], axis=2)
    return ranks


def roe_election(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run-off election on rankings (k, N, L): (winner, loser) finalists and round-1
    counts (N, L)."""
    k, n, n_labels = ranks.shape
    counts = np.zeros((n, n_labels), dtype=np.int64)
    np.add.at(counts, (np.tile(np.arange(n), k), np.argmin(ranks, axis=2).ravel()), 1)
    rows = np.arange(n)
    f1 = np.argmax(counts, axis=1)
    masked = counts.copy()
    masked[rows, f1] = -1
    f2 = np.argmax(masked, axis=1)
    margin = _round2_margin(ranks, f1)[rows, f2]
    first_wins = (margin > 0) | ((margin == 0) & (f1 < f2))
    return np.where(first_wins, f1, f2), np.where(first_wins, f2, f1), counts


def _round2_margin(ranks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, L): models ranking y above c minus models ranking c above y, for every label c."""
    ry = np.take_along_axis(ranks, y[None, :, None], axis=2)
    return np.sign(ranks - ry).sum(axis=0)


def _half_up(x: np.ndarray) -> np.ndarray:
    """ceil((x + 1) / 2): models needed to push a gap x >= 0 below 0 at 2 per model."""
    return np.floor_divide(np.asarray(x) + 2, 2)


def roe_certificate(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) of Run-off Election over k DPA-style models' scores (k, N, L).

    Radius = s - 1 where s lower-bounds the number of models an attacker must corrupt to
    change the winner y (o is the other finalist; n the round-1 counts; a "gap" is how far
    the leader is ahead after tie-breaking, and one corrupted model moves a count by one and a
    round-2 margin by two):

    * A, y out of the final: two labels must beat y in round 1. If y led round 1, for rivals
      a, b with gaps g_a, g_b each model lowers g_a + g_b by at most 3 and each by at most 2:
      s >= max(ceil((g_a + g_b + 2) / 3), ceil((g_a + 1) / 2), ceil((g_b + 1) / 2)) for the
      two smallest gaps; if o led round 1, one more label c must beat y: ceil((g_c + 1) / 2).
    * B1, o wins the final against y: the round-2 margin e of y over o must fall below 0:
      ceil((e + 1) / 2).
    * B2, a third label z reaches the final and beats y there: z must beat o in round 1
      (and, if o led, y must beat o too: the A-type bound on o's two gaps), and z must beat
      y in round 2 (margin e_z): the largest of those bounds.

    Every successful attack is one of A, B1, B2, so the least bound is sound (tested against a
    brute force over every set of corrupted models and every ranking they could output).
    """
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] < 1 or scores.shape[2] < 2:
        raise UserError(f"ROE needs per-model scores of shape (models, N, labels >= 2), got "
                        f"{scores.shape}")
    # Every test point is its own election: blocks of points bound the (k, block, L) int64
    # intermediates (k = 5000 models over 10,000 points would otherwise need tens of GB).
    k, n, n_labels = scores.shape
    block = max(1, ROE_BLOCK_ELEMENTS // (k * n_labels))
    parts = [_roe_block(np.asarray(scores[:, i:i + block], dtype=float))
             for i in range(0, n, block)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]))


#: Largest models x points x labels array one block of Run-off Election holds.
ROE_BLOCK_ELEMENTS = 2**24


def _roe_block(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`roe_certificate` of scores (k, n, L) held in memory at once."""
    ranks = model_rankings(scores)
    y, o, counts = roe_election(ranks)
    n, n_labels = counts.shape
    rows = np.arange(n)
    labels = np.arange(n_labels)[None, :]
    y_led = counts[rows, y] > counts[rows, o] - (o < y)  # y is round 1's first finalist
    big = np.iinfo(np.int64).max // 4
    others = (labels != y[:, None]) & (labels != o[:, None])

    gap_y = counts[rows, y][:, None] - counts - (labels < y[:, None])  # y over c in round 1
    gap_o = counts[rows, o][:, None] - counts - (labels < o[:, None])  # o over c in round 1
    e = _round2_margin(ranks, y) - (1 - (y[:, None] < labels))  # y beats c in round 2: e >= 0

    # A: y eliminated in round 1.
    rival_gaps = np.sort(np.where(labels != y[:, None], gap_y, big), axis=1)
    g1, g2 = rival_gaps[:, 0], rival_gaps[:, 1]  # with two labels g2 is y's own entry: big
    pair = np.maximum(np.floor_divide(g1 + g2 + 4, 3), np.maximum(_half_up(g1), _half_up(g2)))
    single = np.where(others, _half_up(gap_y), big).min(axis=1)
    case_a = np.where(y_led, pair, single)
    # B1: o beats y in the final.
    case_b1 = _half_up(e[rows, o])
    # B2: z beats o in round 1 (and y beats o if o led), z beats y in round 2.
    oy = (counts[rows, o] - counts[rows, y] - (y < o))[:, None]
    reach = np.where(y_led[:, None], _half_up(gap_o),
                     np.maximum(np.floor_divide(gap_o + oy + 4, 3),
                                np.maximum(_half_up(gap_o), _half_up(oy))))
    case_b2 = np.where(others, np.maximum(reach, _half_up(e)), big).min(axis=1)
    s = np.minimum(np.minimum(case_a, case_b1), case_b2)
    return y, (np.minimum(s, scores.shape[0] + 1) - 1).astype(np.int64)


def fa_roe_certificate(scores: np.ndarray, spread: int, shifts: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) of Run-off Election over Finite Aggregation's k d models, scores
    (kd, N, L) (Rezaei et al. 2023, FA + ROE); radius in poisoned buckets = inserted +
    deleted examples, each of which reaches the d models of its bucket.

    The election is :func:`roe_election` over all kd models. The radius is s - 1 for s a
    lower bound on the buckets an attacker must corrupt, from the same three ways the winner
    y can change as in :func:`roe_certificate` (A: y out of the final; B1: the other finalist
    o beats y; B2: a third label z reaches the final and beats y there). Each necessary
    condition "a gap g falls below 0" needs the fewest buckets whose largest possible effects
    on g sum to more than g, as in FA's certificate (Wang et al. 2022, Thm. 2): a bucket's
    effect is the sum over its d models of what one model can move g (round-1 gap of y over
    c: 1 + [f = y] - [f = c] for a model voting f; round-2 margin of y over c: 2 if the model
    ranks y above c). Two labels both beating y need their gaps' sum to fall by g_a + g_b + 2,
    at most 1 + 2 [f = y] - [f = a] - [f = b] per model. A model shared by two corrupted
    buckets is counted in both, which only lowers s.

    The published certificate (the authors' code) relaxes some of these conditions (two
    labels beating y by g_a + g_b + 1; a third label's way to the final without the winner
    beating o), so this radius is never below it and can be larger. With d = 1 it is at least
    :func:`roe_certificate`'s, which bounds every model's effect by the worst case.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] < 1 or scores.shape[2] < 2:
        raise UserError(f"FA + ROE needs per-model scores of shape (models, N, labels >= 2), "
                        f"got {scores.shape}")
    kd, n, n_labels = scores.shape
    shifts = _spreading_shifts(kd, spread, shifts)
    if shifts.min() < 0 or shifts.max() >= kd:
        raise UserError(f"FA shifts must lie in 0..{kd - 1}, got {shifts.tolist()}")
    block = max(1, ROE_BLOCK_ELEMENTS // (kd * n_labels))
    parts = [_fa_roe_block(np.asarray(scores[:, i:i + block], dtype=float), shifts)
             for i in range(0, n, block)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]))


def _per_bucket(per_model: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Sum over the d models of every bucket: (..., kd) per model (bool) -> (..., kd) int32
    per bucket (bucket h holds models (h + s) mod kd)."""
    kd = per_model.shape[-1]
    out = np.zeros(per_model.shape, np.int32)
    for s in map(int, shifts):
        out[..., :kd - s] += per_model[..., s:]
        out[..., kd - s:] += per_model[..., :s]
    return out


def _buckets_needed(effects: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """(n,): the fewest buckets whose effects sum to more than ``gap`` (n,) — 0 where the
    gap is already below 0, the number of buckets + 1 where all of them are not enough.
    ``effects`` (n, buckets): non-negative integers with few distinct values (at most
    3 d + 1), so the largest are taken level by level from a histogram instead of a sort."""
    n, buckets = effects.shape
    top = int(effects.max(initial=0))
    hist = np.bincount((effects + (top + 1) * np.arange(n)[:, None]).ravel(),
                       minlength=(top + 1) * n).reshape(n, top + 1)
    gap = np.asarray(gap, dtype=np.int64)
    need = np.where(gap < 0, 0, buckets + 1)
    done = gap < 0
    spent = np.zeros(n, np.int64)
    used = np.zeros(n, np.int64)
    for v in range(top, 0, -1):
        ends = ~done & (spent + hist[:, v] * v > gap)
        need = np.where(ends, used + np.floor_divide(gap - spent, v) + 1, need)
        done |= ends
        spent += hist[:, v] * v
        used += hist[:, v]
    return need


def _fa_roe_block(scores: np.ndarray, shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fa_roe_certificate` of scores (kd, n, L) held in memory at once.

    The bound is a minimum over many conditions (45 pairs of labels for L = 10); each is
    evaluated only at the points where a cheap lower bound on it is below the least bound
    found so far there, which leaves the minimum unchanged and skips much of the work."""
    kd, n, n_labels = scores.shape
    d = len(shifts)
    ranks = model_rankings(scores)
    y, o, counts = roe_election(ranks)
    labels = np.arange(n_labels)
    # per bucket (points, labels, buckets): its models voting for each label, and ranking y
    # above each label
    votes = _per_bucket(np.argmin(ranks, axis=2).T[:, None, :] == labels[None, :, None],
                        shifts)
    above = (np.take_along_axis(ranks, y[None, :, None], axis=2) < ranks).transpose(1, 2, 0)
    prefer_y = _per_bucket(above, shifts)
    margin = 2 * above.sum(axis=2) - kd  # (n, L): round-2 margin of y over each label
    every = np.arange(n)
    y_led = counts[every, y] > counts[every, o] - (o < y)

    def gap(leader, c, at):  # round-1 gap of leader over c at points ``at``
        return counts[at, leader[at]] - counts[at, c[at]] - (c[at] < leader[at])

    def overtake(leader, c, at):  # buckets for c to pass leader in round 1
        return _buckets_needed(d + votes[at, leader[at]] - votes[at, c[at]],
                               gap(leader, c, at))

    def both_overtake(leader, a, b, at):  # ... for a and b both to pass it (jointly)
        effects = d + 2 * votes[at, leader[at]] - votes[at, a[at]] - votes[at, b[at]]
        return _buckets_needed(effects, gap(leader, a, at) + gap(leader, b, at) + 1)

    def wins_final(c, at):  # buckets for c to beat y in round 2 (ties: smaller label)
        return _buckets_needed(2 * prefer_y[at, c[at]], margin[at, c[at]] - (c[at] < y[at]))

    each = [np.full(n, c) for c in labels]
    # B1: o beats y in the final
    best = np.minimum(wins_final(o, every), kd + 1)
    # B2: z passes o in round 1 (and so does y, if o led) and beats y in round 2
    past_o = [overtake(o, z, every) for z in each]
    y_past_o = overtake(o, y, every)  # only where o led (elsewhere y is past o already)
    for z, past in zip(each, past_o, strict=True):
        low = np.where(y_led, past, np.maximum(past, y_past_o))
        at = np.flatnonzero((z != y) & (z != o) & (low < best))
        if at.size:
            reach = np.where(y_led[at], low[at],
                             np.maximum(low[at], both_overtake(o, z, y, at)))
            best[at] = np.minimum(best[at], np.maximum(reach, wins_final(z, at)))
    # A: y out of the final: a third label passes y if o led, two labels if y led
    past_y = np.stack([overtake(y, c, every) for c in each])  # (L, n)
    for c, past in zip(each, past_y, strict=True):
        third = (c != y) & (c != o) & ~y_led
        best = np.where(third, np.minimum(best, past), best)
    # the two labels nearest to passing y first: they usually set the minimum
    near = np.flatnonzero(y_led)
    if near.size and n_labels > 2:
        a, b = np.argsort(np.where(labels[:, None] == y, kd + 2, past_y), axis=0,
                          kind="stable")[:2]
        low = np.maximum(past_y[a, every], past_y[b, every])
        best[near] = np.minimum(best[near], np.maximum(low[near], both_overtake(y, a, b, near)))
    for i, a in enumerate(each):
        for j, b in enumerate(each[:i]):
            low = np.maximum(past_y[i], past_y[j])
            at = np.flatnonzero((a != y) & (b != y) & y_led & (low < best))
            if at.size:
                best[at] = np.minimum(best[at], np.maximum(low[at], both_overtake(y, a, b, at)))
    return y, (best - 1).astype(np.int64)


def bagging_threshold(n: int, k: int, max_radius: int) -> np.ndarray:
    """t[r] = 1 + max_{n-r <= n' <= n+r} (n'/n)^k - 2 ((max(n,n') - r)/n)^k, r = 0..max_radius.

    Certified at r iff p1_lo - p2_hi > t[r]. Non-decreasing in r (enforced by a running max,
    which only makes certification harder)."""
    out = np.empty(max_radius + 1)
    for r in range(max_radius + 1):
        nprime = np.arange(max(n - r, 0), n + r + 1, dtype=float)
        with np.errstate(divide="ignore"):
            first = np.exp(k * np.log(nprime / n))
            second = np.exp(k * np.log(np.maximum(np.maximum(n, nprime) - r, 0.0) / n))
        out[r] = 1.0 + np.max(first - 2.0 * second)
    return np.maximum.accumulate(out)


def bagging_flip_threshold(n: int, k: int, max_radius: int) -> np.ndarray:
    """t[r] = 2 - 2 ((n - r) / n)^k, r = 0..max_radius: against r flipped labels (the inputs
    stay, so n' = n). A bag of k positions drawn with replacement from n misses all r flipped
    examples with probability ((n - r)/n)^k, and then trains the same model, so the vote
    probabilities move by at most delta = 1 - ((n - r)/n)^k each: certified at r iff
    p1_lo - delta > p2_hi + delta (Jia et al. 2021's bound with n' = n)."""
    r = np.arange(max_radius + 1, dtype=float)
    with np.errstate(divide="ignore"):
        return 2.0 - 2.0 * np.exp(k * np.log(np.maximum(n - r, 0.0) / n))


def bagging_radius(counts: np.ndarray, *, train_size: int, subsample_size: int, eta: float,
                   max_radius: int = 1000, label_flips: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius) for bagging votes (N, L) with SimuEM bounds at level 1 - eta;
    ``label_flips``: the radius counts flipped labels (:func:`bagging_flip_threshold`)
    instead of inserted and deleted examples."""
    if not (isinstance(train_size, int) and train_size >= 1):
        raise UserError(f"--train-size must be a positive integer, got {train_size!r}")
    if not (isinstance(subsample_size, int) and subsample_size >= 1):
        raise UserError(f"--subsample-size must be a positive integer, got {subsample_size!r}")
    conf = vote_bounds(counts, eta)
    margin = conf.p_lower - conf.p_upper
    t = (bagging_flip_threshold if label_flips else bagging_threshold)(
        train_size, subsample_size, max_radius)
    # largest r with margin > t[r]; t is non-decreasing, t[0] = 0
    radius = np.searchsorted(t, margin, side="left") - 1
    radius = np.where(margin > 0, radius, ABSTAIN)
    return conf.prediction, radius.astype(np.int64)


def dp_baseline_accuracy(radii: np.ndarray, eps: float, delta: float, acc_lower: float
                         ) -> np.ndarray:
    """Ma et al. (2019) certified-accuracy lower bound at each radius (shape radii.shape)."""
    r = np.asarray(radii, dtype=float)
    c = delta / np.expm1(eps)
    return np.maximum(np.exp(-r * eps) * (acc_lower + c) - c, 0.0)
