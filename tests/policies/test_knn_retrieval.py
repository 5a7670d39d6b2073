"""The knn-retrieval policy: target images as queries, in a seeded order that cycles, and a state
that is its cursor."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from policies import build_policy
from policies.knn_retrieval import png_bytes

TARGET = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), np.uint8)


def policy(seed=0, images=TARGET):
    return build_policy("knn-retrieval", concepts=["unused"], target_images=images, seed=seed)


def labels(batch):
    return [q.text for q in batch]


def test_queries_carry_the_target_images_and_cycle_through_all_before_repeating():
    p = policy()
    first, second = p.propose(5), p.propose(3)
    assert sorted(q.image for q in first) == sorted(png_bytes(t) for t in TARGET)  # each image once
    for q in first:  # the bytes are the target image itself, as PNG
        decoded = np.asarray(Image.open(io.BytesIO(q.image)).convert("RGB")).transpose(2, 0, 1)
        assert any((decoded == t).all() for t in TARGET) and q.text.startswith("image:") and q.concept is None
    assert len(set(labels(second))) == 3  # the next cycle starts over, in a new order
    assert labels(first) != labels(policy(seed=1).propose(5))  # the seed sets the order


def test_grey_targets_are_sent_as_grey_pngs():
    grey = np.repeat(TARGET[:, :1], 3, axis=1)
    assert Image.open(io.BytesIO(png_bytes(grey[0]))).mode == "L"


def test_state_dict_round_trip_continues_at_the_cursor():
    original = policy()
    batch = original.propose(3)
    original.update(batch, [0.5, 0.1, 0.9])
    state = json.loads(json.dumps(original.state_dict()))
    resumed = policy(seed=99)  # the state's seed wins
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and state["cursor"] == 3
    assert labels(resumed.propose(6)) == labels(original.propose(6))


def test_state_of_other_targets_and_missing_targets_are_rejected():
    state = policy().state_dict()
    with pytest.raises(ValueError, match="different target images"):
        policy(images=TARGET[:4]).load_state_dict(state)
    with pytest.raises(ValueError, match="needs the target's images"):
        build_policy("knn-retrieval", concepts=["a"], seed=0)
    with pytest.raises(ValueError, match="2 queries but 1 rewards"):
        p = policy()
        p.update(p.propose(2), [0.5])
