"""Peer certificates: hand cases, brute force on tiny problems, the public code's bagging check."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcert.certification import baselines
from dpcert.certification.certify import ABSTAIN
from dpcert.errors import UserError


def predict(counts):
    return int(np.argmax(counts))


def brute_force_radius(votes, n_labels, per_example):
    """Largest r such that changing the votes of any r * per_example models (each to any
    label) never changes the plurality prediction (ties to the smaller label)."""
    base = predict(np.bincount(votes, minlength=n_labels))
    r = 0
    while True:
        m = (r + 1) * per_example
        if m > len(votes):
            return r
        for idx in itertools.combinations(range(len(votes)), m):
            for new in itertools.product(range(n_labels), repeat=m):
                v = votes.copy()
                v[list(idx)] = new
                if predict(np.bincount(v, minlength=n_labels)) != base:
                    return r
        r += 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=7))
def test_dpa_matches_brute_force(votes):
    votes = np.array(votes)
    counts = np.bincount(votes, minlength=3)[None, :]
    pred, radius = baselines.dpa_radius(counts)
    assert pred[0] == predict(counts[0])
    assert radius[0] == brute_force_radius(votes, 3, 1)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=7), st.integers(1, 2))
def test_fa_count_bound_is_sound(votes, spread):
    votes = np.array(votes)
    counts = np.bincount(votes, minlength=3)[None, :]
    _, radius = baselines.fa_radius(counts, spread)
    assert radius[0] <= brute_force_radius(votes, 3, spread)


def test_dpa_hand_cases():
    pred, radius = baselines.dpa_radius(np.array([[10, 4, 1], [3, 5, 5], [5, 5, 0]]))
    assert pred.tolist() == [0, 1, 0]
    assert radius.tolist() == [3, 0, 0]


def public_bagging_check(r, k, n, p_l, p_s):
    """check_condition_bagging of the public code (threshold-point search over n')."""
    def value(nprime):
        return (float(nprime) / n) ** k - 2 * ((float(nprime) - r) / n) ** k + 1 - p_l + p_s

    threshold = r / (1.0 - np.power(0.5, 1.0 / (k - 1.0)))
    if threshold <= n:
        v = value(n)
    elif threshold >= n + r:
        v = value(n + r)
    else:
        v = max(value(math.ceil(threshold)), value(math.floor(threshold)))
    return v < 0


@pytest.mark.parametrize("n,k", [(1000, 30), (60000, 100), (500, 5)])
def test_bagging_matches_public_code(n, k):
    t = baselines.bagging_threshold(n, k, 200)
    for p_l, p_s in [(0.9, 0.05), (0.7, 0.2), (0.99, 0.005), (0.55, 0.4)]:
        ours = int(np.searchsorted(t, p_l - p_s, side="left") - 1)
        ref = max(r for r in range(0, 201) if r == 0 or public_bagging_check(r, k, n, p_l, p_s))
        assert ours == ref


def test_bagging_end_to_end_and_abstain():
    counts = np.array([[990, 5, 5], [400, 390, 210]])
    pred, radius = baselines.bagging_radius(counts, train_size=1000, subsample_size=30,
                                            eta=1e-3)
    assert pred.tolist() == [0, 0]
    assert radius[0] > 10 and radius[1] == ABSTAIN
    with pytest.raises(UserError):
        baselines.bagging_radius(counts, train_size=0, subsample_size=3, eta=1e-3)


def test_dp_baseline_by_hand():
    eps, delta, acc = 0.1, 1e-5, 0.9
    c = delta / math.expm1(eps)
    got = baselines.dp_baseline_accuracy(np.array([0, 1, 10, 1000]), eps, delta, acc)
    want = [max(math.exp(-r * eps) * (acc + c) - c, 0) for r in (0, 1, 10, 1000)]
    np.testing.assert_allclose(got, want)


def brute_force_fa(preds, n_labels, shifts):
    """Largest t such that no choice of t buckets, with their models relabelled arbitrarily,
    changes the plurality prediction."""
    kd = len(preds)
    base = predict(np.bincount(preds, minlength=n_labels))
    of_bucket = baselines.fa_models_of_bucket(kd, np.array(shifts))
    t = 0
    while t < kd:
        for buckets in itertools.combinations(range(kd), t + 1):
            models = sorted({int(m) for b in buckets for m in of_bucket[b]})
            for new in itertools.product(range(n_labels), repeat=len(models)):
                v = preds.copy()
                v[models] = new
                if predict(np.bincount(v, minlength=n_labels)) != base:
                    return t
        t += 1
    return t


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_fa_certificate_matches_brute_force(data):
    spread = data.draw(st.integers(1, 2))
    kd = data.draw(st.integers(max(2, spread), 5))
    preds = np.array(data.draw(st.lists(st.integers(0, 2), min_size=kd, max_size=kd)))
    shifts = data.draw(st.lists(st.integers(0, kd - 1), min_size=spread, max_size=spread,
                                unique=True))
    pred, radius = baselines.fa_certificate(preds[None, :], 3, spread, np.array(shifts))
    assert pred[0] == predict(np.bincount(preds, minlength=3))
    assert radius[0] == brute_force_fa(preds, 3, shifts)


def test_fa_certificate_against_its_special_cases():
    rng = np.random.default_rng(3)
    preds = rng.choice(4, size=(200, 24), p=[0.7, 0.1, 0.1, 0.1])
    counts = np.stack([np.bincount(row, minlength=4) for row in preds])
    # d = 1 is DPA
    pred, radius = baselines.fa_certificate(preds, 4, 1)
    np.testing.assert_array_equal((pred, radius), baselines.dpa_radius(counts))
    # with spread, the full certificate is never below the count-only bound
    pred, radius = baselines.fa_certificate(preds, 4, 3)
    _, count_only = baselines.fa_radius(counts, 3)
    assert (radius >= count_only).all()
    # ... and above it when no bucket's models all vote for the prediction
    interleaved = np.array([0, 1, 0, 2] * 3)
    _, radius = baselines.fa_certificate(interleaved[None, :], 3, 2, np.array([0, 1]))
    _, count_only = baselines.fa_radius(np.bincount(interleaved)[None, :], 2)
    assert count_only[0] == 0 and radius[0] == 1 == brute_force_fa(interleaved, 3, [0, 1])


def test_fa_shifts_and_errors():
    shifts = baselines.fa_shifts(50, 4)
    assert len(set(shifts.tolist())) == 4 and shifts.min() >= 0 and shifts.max() < 50
    np.testing.assert_array_equal(shifts, baselines.fa_shifts(50, 4))
    with pytest.raises(UserError):
        baselines.fa_shifts(3, 4)
    with pytest.raises(UserError):
        baselines.fa_certificate(np.array([[0, 5]]), 3, 1)
    with pytest.raises(UserError):
        baselines.fa_certificate(np.array([[0, 1, 1]]), 3, 2, np.array([1, 1]))


# -- Run-off Election ----------------------------------------------------------------------

def roe_brute_force(ranks):
    """Largest r such that no r models, each outputting any ranking, change the ROE winner."""
    k = ranks.shape[0]
    for s in range(1, k + 1):
        if any(winner_can_change(ranks, models)
               for models in itertools.combinations(range(k), s)):
            return s - 1
    return k


def winner_can_change(ranks, models):
    """Whether some rankings output by ``models`` change the ROE winner of ranks (k, 1, L)."""
    base = baselines.roe_election(ranks)[0][0]
    perms = np.array(list(itertools.permutations(range(ranks.shape[2]))))
    for choice in itertools.product(range(len(perms)), repeat=len(models)):
        r = ranks.copy()
        r[list(models), 0] = perms[list(choice)]
        if baselines.roe_election(r)[0][0] != base:
            return True
    return False


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3).flatmap(lambda n_labels: st.lists(
    st.lists(st.integers(0, 2), min_size=n_labels, max_size=n_labels), min_size=1, max_size=5)))
def test_roe_certificate_matches_brute_force(model_scores):
    """Every set of corrupted models and every ranking they could output (k <= 5, L <= 3;
    integer scores so that ties and their tie-breaking are exercised)."""
    scores = np.array(model_scores, dtype=float)[:, None, :]
    pred, radius = baselines.roe_certificate(scores)
    ranks = baselines.model_rankings(scores)
    assert pred[0] == baselines.roe_election(ranks)[0][0]
    assert radius[0] == roe_brute_force(ranks)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=4, max_size=4), min_size=1, max_size=3))
def test_roe_certificate_is_sound_with_four_labels(model_scores):
    scores = np.array(model_scores, dtype=float)[:, None, :]
    assert baselines.roe_certificate(scores)[1][0] <= roe_brute_force(
        baselines.model_rankings(scores))


def test_roe_election_by_hand():
    # round 1: label 0 has 3 votes, 1 and 2 have 2 each -> finalists 0 and 1 (tie to smaller);
    # round 2: five of seven models rank 1 above 0 -> 1 wins though 0 led round 1
    scores = np.array([[.9, .1, 0], [.9, .1, 0], [.9, .0, .1], [0, .9, .1], [0, .9, .1],
                       [.1, .2, .7], [.1, .2, .7]])[:, None, :]
    ranks = baselines.model_rankings(scores)
    np.testing.assert_array_equal(ranks[0, 0], [0, 1, 2])
    winner, loser, counts = baselines.roe_election(ranks)
    assert counts[0].tolist() == [3, 2, 2] and winner[0] == 1 and loser[0] == 0
    assert baselines.roe_certificate(scores)[1][0] == roe_brute_force(ranks)


def test_roe_can_certify_less_than_dpa_on_the_same_models():
    """The paper's claim that ROE's radius is at least DPA's does not hold pointwise: here DPA
    certifies 1, while a single corrupted model changes the ROE winner (model 0 switching to
    label 0 makes 0 a finalist that ties 1 in round 2 and wins the tie on its smaller index)."""
    scores = np.array([[0.141, 0.489, 0.014, 0.356], [0.043, 0.704, 0.229, 0.024],
                       [0.017, 0.882, 0.028, 0.073], [0.269, 0.112, 0.575, 0.043]])[:, None, :]
    ranks = baselines.model_rankings(scores)
    counts = baselines.roe_election(ranks)[2]
    dpa_pred, dpa_radius = baselines.dpa_radius(counts)
    roe_pred, roe_radius = baselines.roe_certificate(scores)
    assert dpa_pred[0] == roe_pred[0] == 1
    assert dpa_radius[0] == 1 and roe_radius[0] == 0 == roe_brute_force(ranks)
    attacked = ranks.copy()
    attacked[0, 0] = [0, 1, 2, 3]
    assert baselines.roe_election(attacked)[0][0] == 0


def test_roe_certifies_more_than_dpa_when_third_labels_prefer_the_winner():
    """Round 1: 20 / 15 / 6 votes, DPA radius floor(5 / 2) = 2. The 6 models voting for
    label 2 rank 0 above 1, so the final is 26 : 15: flipping it needs 6 models (B1); knocking
    0 out of round 1 needs 8 (A); bringing 2 to the final needs 5 and then beating 0 there 15
    (B2). ROE radius 6 - 1 = 5."""
    scores = np.array([[0.6, 0.3, 0.1]] * 20 + [[0.3, 0.6, 0.1]] * 15 + [[0.3, 0.1, 0.6]] * 6)
    scores = scores[:, None, :]
    counts = baselines.roe_election(baselines.model_rankings(scores))[2]
    assert counts[0].tolist() == [20, 15, 6]
    assert baselines.dpa_radius(counts)[1][0] == 2
    assert baselines.roe_certificate(scores)[1][0] == 5


def test_roe_input_errors():
    with pytest.raises(UserError):
        baselines.roe_certificate(np.zeros((3, 4)))
    with pytest.raises(UserError):
        baselines.roe_certificate(np.zeros((3, 4, 1)))


def test_roe_in_blocks_of_points_equals_all_at_once(monkeypatch):
    """Run-off Election certifies blocks of test points to bound its memory; every point is
    its own election, so any block size gives the same answer (here 1, 3 and all 50)."""
    rng = np.random.default_rng(3)
    scores = rng.dirichlet(np.ones(4) * 0.3, size=(40, 50)).astype(np.float32)
    scores[:, :, 1] += 0.2 * rng.random((40, 50)).astype(np.float32)  # some large margins
    whole = baselines.roe_certificate(scores)
    assert 0 < whole[1].max() < 40 and len(set(whole[0])) > 1
    for block_points in (1, 3):
        monkeypatch.setattr(baselines, "ROE_BLOCK_ELEMENTS", 40 * 4 * block_points)
        pred, radius = baselines.roe_certificate(scores)
        np.testing.assert_array_equal(pred, whole[0])
        np.testing.assert_array_equal(radius, whole[1])
    assert baselines.roe_certificate(scores[:, :0])[1].shape == (0,)


# -- Run-off Election over Finite Aggregation (FA + ROE) -----------------------------------

def fa_roe_brute_force(ranks, shifts):
    """Largest t such that no t buckets, their models outputting any rankings, change the
    ROE winner over all k d models."""
    kd = ranks.shape[0]
    for t in range(1, kd + 1):
        if any(winner_can_change(ranks, models_of(buckets, shifts, kd))
               for buckets in itertools.combinations(range(kd), t)):
            return t - 1
    return kd


def models_of(buckets, shifts, kd):
    """The models that train on any of ``buckets`` (FA spreading with ``shifts``)."""
    of_bucket = baselines.fa_models_of_bucket(kd, np.array(shifts))
    return sorted({int(m) for b in buckets for m in of_bucket[b]})


@st.composite
def fa_roe_case(draw, labels=(2, 3), max_models=5):
    spread = draw(st.integers(1, 2))
    kd = draw(st.integers(max(2, spread), max_models - (spread - 1)))
    n_labels = draw(st.sampled_from(labels))
    scores = draw(st.lists(st.lists(st.integers(0, 2), min_size=n_labels, max_size=n_labels),
                           min_size=kd, max_size=kd))
    shifts = draw(st.lists(st.integers(0, kd - 1), min_size=spread, max_size=spread,
                           unique=True))
    return np.array(scores, dtype=float)[:, None, :], spread, np.array(shifts)


@settings(max_examples=80, deadline=None)
@given(fa_roe_case())
def test_fa_roe_certificate_matches_brute_force(case):
    """Every set of corrupted buckets and every ranking their models could output (k d <= 5,
    d <= 2, L <= 3; integer scores, so ties and their tie-breaking are exercised)."""
    scores, spread, shifts = case
    pred, radius = baselines.fa_roe_certificate(scores, spread, shifts)
    ranks = baselines.model_rankings(scores)
    assert pred[0] == baselines.roe_election(ranks)[0][0]
    assert radius[0] == fa_roe_brute_force(ranks, shifts)


@settings(max_examples=20, deadline=None)
@given(fa_roe_case(labels=(4,), max_models=3))
def test_fa_roe_certificate_is_sound_with_four_labels(case):
    scores, spread, shifts = case
    radius = baselines.fa_roe_certificate(scores, spread, shifts)[1][0]
    assert radius <= fa_roe_brute_force(baselines.model_rankings(scores), shifts)


def test_fa_roe_is_sound_against_corrupted_buckets_at_larger_sizes():
    """k d = 8 models, d = 2: no choice of r buckets (r the certified radius, up to 2) and no
    rankings of their models change the winner — the brute force checks soundness where it
    cannot afford the whole search."""
    rng = np.random.default_rng(5)
    checked = 0
    while checked < 12:
        scores = rng.dirichlet(rng.dirichlet([1, 1, 1]) * 3 + 0.2, size=(8, 1))
        shifts = rng.choice(8, size=2, replace=False)
        radius = baselines.fa_roe_certificate(scores, 2, shifts)[1][0]
        if not 1 <= radius <= 2:
            continue
        checked += 1
        ranks = baselines.model_rankings(scores)
        for buckets in itertools.combinations(range(8), radius):
            assert not winner_can_change(ranks, models_of(buckets, shifts, 8)), (scores,
                                                                                buckets)


def published_fa_roe(scores, spread, shifts):
    """The FA + ROE radius as the authors' code computes it (Rezaei et al. 2023), one point at
    a time, for scores (k d, L) without ties: an independent reading of their case analysis."""
    kd, n_labels = scores.shape
    top = scores.argmax(axis=1)
    counts = np.bincount(top, minlength=n_labels)
    m1, m2 = np.argsort(-counts, kind="stable")[:2]
    of_bucket = baselines.fa_models_of_bucket(kd, shifts)

    def radius_of(gap, per_bucket):  # buckets the greedy attack spends without crossing gap
        for i, v in enumerate(sorted(per_bucket, reverse=True)):
            if gap - v < 0:
                return i
            gap -= v
        return len(per_bucket)

    def passes(lead, c):
        per_model = 1 + (top == lead) - (top == c)
        return radius_of(counts[lead] - counts[c] - (c < lead), per_model[of_bucket].sum(1))

    def final(win, c):
        prefer = scores[:, win] > scores[:, c]
        return radius_of(2 * prefer.sum() - kd - (c < win), 2 * prefer[of_bucket].sum(1))

    margin = 2 * (scores[:, m1] > scores[:, m2]).sum() - kd
    y = m1 if margin > 0 or (margin == 0 and m1 < m2) else m2
    others = [c for c in range(n_labels) if c not in (m1, m2)]
    inf = 10**9
    if y == m1:
        to = {c: passes(m1, c) if c != m2 else 0 for c in range(n_labels) if c != m1}
        case1 = min((max(to[a], to[b], radius_of(
            counts[m1] - counts[a] - (a < m1) + counts[m1] - counts[b] - (b < m1),
            (1 + 2 * (top == m1) - (top == a) - (top == b))[of_bucket].sum(1)))
            for a, b in itertools.combinations(to, 2)), default=inf)
        case22 = min((max(passes(m2, c), final(m1, c)) for c in others), default=inf)
    else:
        case1 = min((passes(m2, c) for c in others), default=inf)
        case22 = min((max(passes(m1, c), final(m2, c)) for c in others), default=inf)
    case21 = 0 if margin == 0 else final(y, m2 if y == m1 else m1)
    return y, min(case1, case21, case22)


def test_fa_roe_is_never_below_the_published_certificate():
    """Ours keeps every condition the authors' relaxes, so it certifies at least as much;
    with d = 1 it is also at least this project's DPA Run-off Election certificate."""
    rng = np.random.default_rng(6)
    larger = 0
    for trial in range(60):
        kd, n_labels, spread = 30, int(rng.integers(3, 6)), int(rng.integers(1, 4))
        scores = rng.dirichlet(rng.dirichlet(np.ones(n_labels)) * 4 + 0.3, size=(kd, 5))
        shifts = rng.choice(kd, size=spread, replace=False)
        pred, radius = baselines.fa_roe_certificate(scores, spread, shifts)
        for i in range(5):
            y, theirs = published_fa_roe(scores[:, i], spread, shifts)
            assert pred[i] == y and radius[i] >= theirs, (trial, i)
            larger += radius[i] > theirs
        if spread == 1:
            assert (radius >= baselines.roe_certificate(scores)[1]).all()
    assert larger > 0  # and the conditions the published code drops do matter


def test_fa_roe_in_blocks_of_points_equals_all_at_once(monkeypatch):
    rng = np.random.default_rng(7)
    scores = rng.dirichlet(np.ones(4) * 0.4, size=(24, 30))
    scores[:, :, 2] += 0.3 * rng.random((24, 30))
    whole = baselines.fa_roe_certificate(scores, 3)
    assert whole[1].max() > 0 and len(set(whole[0])) > 1
    monkeypatch.setattr(baselines, "ROE_BLOCK_ELEMENTS", 24 * 4 * 7)
    np.testing.assert_array_equal(baselines.fa_roe_certificate(scores, 3), whole)
    assert baselines.fa_roe_certificate(scores[:, :0], 3)[1].shape == (0,)


def test_fa_roe_input_errors():
    scores = np.random.default_rng(0).random((6, 2, 3))
    for bad in (lambda: baselines.fa_roe_certificate(scores[0], 2),
                lambda: baselines.fa_roe_certificate(scores[:, :, :1], 2),
                lambda: baselines.fa_roe_certificate(scores, 7),
                lambda: baselines.fa_roe_certificate(scores, 2, np.array([1, 1])),
                lambda: baselines.fa_roe_certificate(scores, 2, np.array([0, 6]))):
        with pytest.raises(UserError):
            bad()
