import math

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from explorer.score.evaluation import evaluate_embeddings, knn_accuracy, linear_probe_accuracy
from explorer.score.reward import unit_rows


@pytest.fixture(scope="module")
def digits_split():
    """Real 8x8 digit images, raw pixels L2-normalised, stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(unit_rows(x), y, test_size=0.25, random_state=0, stratify=y)


def shuffled(labels, seed=0):
    return np.random.default_rng(seed).permutation(labels)


def brute_knn_accuracy(x_train, y_train, x_test, y_test, k, temperature):
    """Weighted kNN by hand: cosine to every training row, the k most similar vote exp(sim / T)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(np.asarray(x_test, np.float64)) @ unit(np.asarray(x_train, np.float64)).T
    classes = np.unique(y_train)
    correct = 0
    for row, truth in zip(sims, y_test):
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = [np.exp(row[nearest][y_train[nearest] == c] / temperature).sum() for c in classes]
        correct += classes[int(np.argmax(votes))] == truth
    return correct / len(y_test)


def sklearn_probe(x_train, y_train, x_test, y_test, leak=False):
    """StandardScaler + LogisticRegression; the scaler sees the training split only (or, leak=True, both)."""
    scaler = StandardScaler().fit(np.vstack([x_train, x_test]) if leak else x_train)
    lr = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)
    lr.fit(scaler.transform(np.asarray(x_train, np.float32)), y_train)
    return float(lr.score(scaler.transform(np.asarray(x_test, np.float32)), y_test))


@pytest.fixture(scope="module")
def jittered_split(digits_split):
    """The digits with a little seeded noise: no two similarities tie, so the k nearest are unique."""
    rng = np.random.default_rng(0)
    x_train, x_test, y_train, y_test = digits_split
    return (unit_rows(x_train + rng.normal(0, 1e-3, x_train.shape)).astype(np.float32),
            unit_rows(x_test + rng.normal(0, 1e-3, x_test.shape)).astype(np.float32), y_train, y_test)


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (7, 10.0), (30, 1.0)])
def test_knn_accuracy_equals_a_brute_force_weighted_vote(jittered_split, k, temperature):
    x_train, x_test, y_train, y_test = jittered_split
    expected = brute_knn_accuracy(x_train, y_train, x_test, y_test, k, temperature)
    assert knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=temperature) == pytest.approx(expected)
    assert knn_accuracy(x_train, shuffled(y_train), x_test, y_test, k=k, temperature=temperature) == \
        pytest.approx(brute_knn_accuracy(x_train, shuffled(y_train), x_test, y_test, k, temperature))


def test_one_neighbour_more_would_show(jittered_split):
    """The brute-force comparison has the power to see an off-by-one in k on these data."""
    x_train, x_test, y_train, y_test = jittered_split
    changed = [(k, t) for k, t in [(1, 0.07), (5, 0.07), (20, 0.07), (7, 10.0), (30, 1.0)]
               if brute_knn_accuracy(x_train, y_train, x_test, y_test, k, t) !=
               brute_knn_accuracy(x_train, y_train, x_test, y_test, k + 1, t)]
    assert len(changed) >= 2, changed


def test_linear_probe_equals_sklearn_with_the_scaler_fitted_on_train_only(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) == sklearn_probe(x_train, y_train, x_test, y_test)
    # a test split from another "camera" (brighter, offset): where scaling on the test split too would
    # change the answer, the probe still gives the train-only answer
    shifted = x_test * 1.5 + 0.05
    honest = sklearn_probe(x_train, y_train, shifted, y_test)
    assert honest != sklearn_probe(x_train, y_train, shifted, y_test, leak=True)
    assert linear_probe_accuracy(x_train, y_train, shifted, y_test) == honest
    assert linear_probe_accuracy(x_train, shuffled(y_train), x_test, y_test) == \
        sklearn_probe(x_train, shuffled(y_train), x_test, y_test)


def test_accuracies_are_high_on_digits_and_near_chance_with_shuffled_labels(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    assert knn_accuracy(x_train, y_train, x_test, y_test) > 0.9
    assert knn_accuracy(x_train, shuffled(y_train), x_test, y_test) < 0.3
    assert linear_probe_accuracy(x_train, y_train, x_test, y_test) > 0.9
    assert linear_probe_accuracy(x_train, shuffled(y_train), x_test, y_test) < 0.3


def at_angle(radians):
    return [math.cos(radians), math.sin(radians)]


def test_knn_votes_are_weighted_by_similarity_and_temperature():
    # One class-"a" neighbour at 0.1 rad from the query, two class-"b" ones at +-0.5 rad.
    train = np.array([at_angle(0.1), at_angle(0.5), at_angle(-0.5)], dtype=np.float32)
    labels = np.array(["a", "b", "b"])
    query, truth = np.array([[1.0, 0.0]], dtype=np.float32), np.array(["a"])
    # A sharp temperature lets the single closest neighbour outvote two farther ones;
    # a flat one makes it a plain majority vote.
    assert knn_accuracy(train, labels, query, truth, k=3, temperature=0.01) == 1.0
    assert knn_accuracy(train, labels, query, truth, k=3, temperature=10.0) == 0.0
    # k=1 looks only at the closest neighbour, whatever the temperature.
    assert knn_accuracy(train, labels, query, truth, k=1, temperature=10.0) == 1.0


def test_knn_accuracy_chunking_does_not_change_the_result(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    whole = knn_accuracy(x_train, y_train, x_test, y_test, k=10)
    assert knn_accuracy(x_train, y_train, x_test, y_test, k=10, chunk_size=7) == whole


def test_evaluate_embeddings_reports_both_and_validates(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    result = evaluate_embeddings(x_train, y_train, x_test, y_test)
    assert set(result) == {"knn_accuracy", "linear_probe_accuracy"}
    assert all(0.9 < v <= 1.0 for v in result.values())
    assert set(evaluate_embeddings(x_train, y_train, x_test, y_test, linear_probe=False)) == {"knn_accuracy"}
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(x_train, y_train[:-1], x_test, y_test)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x_train, y_train, x_test, y_test, temperature=0.0)
