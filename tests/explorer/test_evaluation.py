import math

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from explorer.evaluation import evaluate_embeddings, knn_accuracy, linear_probe_accuracy
from explorer.scoring import unit_rows


@pytest.fixture(scope="module")
def digits_split():
    """Real 8x8 digit images, raw pixels L2-normalised, stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    return train_test_split(unit_rows(x), y, test_size=0.25, random_state=0, stratify=y)


def shuffled(labels, seed=0):
    return np.random.default_rng(seed).permutation(labels)


def test_knn_accuracy_on_digits_is_high_and_near_chance_with_shuffled_labels(digits_split):
    x_train, x_test, y_train, y_test = digits_split
    assert knn_accuracy(x_train, y_train, x_test, y_test) > 0.9
    assert knn_accuracy(x_train, shuffled(y_train), x_test, y_test) < 0.3


def test_linear_probe_on_digits_is_high_and_near_chance_with_shuffled_labels(digits_split):
    x_train, x_test, y_train, y_test = digits_split
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
    with pytest.raises(ValueError):
        knn_accuracy(x_train, y_train, x_test, y_test, temperature=0.0)
