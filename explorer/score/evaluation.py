"""Probe accuracy of frozen embeddings: weighted k-NN and a linear probe.

Both take embeddings as arrays, so the same code scores any encoder at any point of a run.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from explorer.score.reward import TargetIndex


def _check_split(emb: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if len(emb) != len(labels):
        raise ValueError(f"{name}: {len(emb)} embeddings but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{name} split is empty")
    return labels


def knn_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                 test_labels: np.ndarray, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 8192) -> float:
    """Weighted k-NN top-1 accuracy on cosine similarity (the InstDisc / DINO protocol).

    Each test point takes its k most similar training points; neighbour i votes for its class
    with weight exp(sim_i / temperature), and the class with the largest total wins.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    train_labels = _check_split(train_emb, train_labels, "train")
    test_labels = _check_split(test_emb, test_labels, "test")
    classes, train_class = np.unique(train_labels, return_inverse=True)  # class ids 0..C-1
    index = TargetIndex(train_emb)
    correct = 0
    for start in range(0, len(test_labels), chunk_size):
        sims, ids = index.knn(test_emb[start:start + chunk_size], k)  # (B, k), best first
        # Subtracting the best similarity per row leaves the vote unchanged and keeps
        # exp(sim / T) from overflowing at small temperatures.
        weights = np.exp((sims - sims[:, :1]) / temperature)
        votes = np.zeros((len(ids), len(classes)))  # (B, C)
        np.add.at(votes, (np.arange(len(ids))[:, None], train_class[ids]), weights)
        predicted = classes[votes.argmax(axis=1)]
        correct += int((predicted == test_labels[start:start + chunk_size]).sum())
    return correct / len(test_labels)


def linear_probe_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                          test_labels: np.ndarray, C: float = 1.0, max_iter: int = 1000,
                          seed: int = 0) -> float:
    """Top-1 accuracy of a multinomial logistic regression (lbfgs) on standardised features.

    The scaler is fitted on the training split only, so nothing of the test split leaks in.
    """
    train_labels = _check_split(train_emb, train_labels, "train")
    test_labels = _check_split(test_emb, test_labels, "test")
    probe = make_pipeline(
        StandardScaler(),
        # lbfgs fits the multinomial (softmax) loss for more than two classes.
        LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed),
    )
    probe.fit(np.asarray(train_emb, dtype=np.float32), train_labels)
    return float(probe.score(np.asarray(test_emb, dtype=np.float32), test_labels))


def evaluate_embeddings(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                        test_labels: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                        C: float = 1.0, max_iter: int = 1000, seed: int = 0,
                        linear_probe: bool = True) -> dict[str, float]:
    """{'knn_accuracy': ..., 'linear_probe_accuracy': ...} for one train/test embedding split.

    linear_probe=False skips the (slower) logistic regression and returns only the k-NN entry.
    """
    result = {"knn_accuracy": knn_accuracy(train_emb, train_labels, test_emb, test_labels,
                                           k=k, temperature=temperature)}
    if linear_probe:
        result["linear_probe_accuracy"] = linear_probe_accuracy(
            train_emb, train_labels, test_emb, test_labels, C=C, max_iter=max_iter, seed=seed)
    return result


def pixel_features(images) -> np.ndarray:
    """uint8 (N, 3, S, S) -> (N, S*S) float32 grey pixels: the trivial encoder every learned one must beat."""
    return images.float().mean(dim=1).flatten(1).numpy()


def pixel_baselines(train_images, train_labels: np.ndarray, test_images, test_labels: np.ndarray, *,
                    k: int = 20) -> dict[str, dict[str, float]]:
    """The same kNN and linear probe on raw grey pixels, as they are and mean-centred (the mean of
    the training split; for cosine kNN centring matters): {'pixels': {...}, 'pixels_centred': {...}}."""
    train, test = pixel_features(train_images), pixel_features(test_images)
    mean = train.mean(axis=0)
    return {"pixels": evaluate_embeddings(train, train_labels, test, test_labels, k=k),
            "pixels_centred": evaluate_embeddings(train - mean, train_labels, test - mean, test_labels, k=k)}


def eval_metrics(scores: dict[str, float]) -> dict[str, float]:
    """Scores as metrics.jsonl keys: {'knn_accuracy': 0.81234} -> {'eval_knn_accuracy': 0.8123}."""
    return {f"eval_{name}": round(float(value), 4) for name, value in scores.items()}
