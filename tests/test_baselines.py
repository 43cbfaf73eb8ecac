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
    k, _, n_labels = ranks.shape
    base = baselines.roe_election(ranks)[0][0]
    perms = [np.array(p) for p in itertools.permutations(range(n_labels))]
    for s in range(1, k + 1):
        for models in itertools.combinations(range(k), s):
            for choice in itertools.product(range(len(perms)), repeat=s):
                r = ranks.copy()
                for m, c in zip(models, choice, strict=True):
                    r[m, 0] = perms[c]
                if baselines.roe_election(r)[0][0] != base:
                    return s - 1
    return k


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
