"""A user's own target folder through `explorer run --target`, as a new user would run it.

The folder holds Fashion-MNIST *test* footwear (sandals, sneakers, ankle boots) in one folder per
class, plus a loose README and a loose image beside the class folders. The web (the small corpus)
holds Fashion-MNIST *train* images of every class, digits and clip-art: footwear is the kind the
user wants, the other clothes are the same style of image but not that kind."""

import gzip
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from explorer.cli import main
from explorer.web.sources import FASHION_MNIST_DIR

FOOTWEAR = {5: "Sandal", 7: "Sneaker", 9: "Ankle boot"}


@pytest.fixture(scope="module")
def shoe_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("my-shoes")
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for label, name in FOOTWEAR.items():
        (root / name).mkdir()
        for i in np.flatnonzero(labels == label)[:40]:
            Image.fromarray(images[i]).save(root / name / f"{i}.png")
    (root / "README.txt").write_text("my shoe photos\n")
    Image.fromarray(images[0]).save(root / "stray.png")  # a loose image beside the class folders
    return root


def _config(path, small_corpus, policy: str):
    config = {
        "name": f"shoes-{policy}", "iterations": 3, "seed": 0, "corpus": str(small_corpus.root),
        "vocabulary": {"n_random": 30},
        "policy": {"name": "gp", "queries_per_iteration": 8,
                   "options": {"acquisition": "softmax", "explore_first": 8}},
        "search": {"results_per_query": 15},
        "learner": {"backbone": "tf_efficientnet_lite0", "backbone_kwargs": {}, "pretrained": "pypi",
                    "image_size": 48, "frozen_stages": 4, "freeze_bn": True, "dim": 32, "mlp_dim": 64,
                    "batch_size": 16, "warmup_steps": 1},
        "train": {"pretrain_steps": 2, "steps_per_iteration": 2, "knn_k": 5},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _accepted(run_dir):
    lines = (run_dir / "accepted.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_gp_acquires_more_of_the_users_kind_than_random(shoe_folder, small_corpus, tmp_path, caplog):
    kinds = "target.relevant=[Sandal, Sneaker, Ankle boot]"
    runs = {}
    for policy in ("gp", "random"):
        config = _config(tmp_path / f"{policy}.yaml", small_corpus, policy)
        out = tmp_path / policy
        assert main(["run", str(config), "--target", str(shoe_folder), "--out", str(out), "--quiet",
                     "--set", f"policy.name={policy}", "--set", kinds]) == 0
        runs[policy] = out
    # the gp's options do not apply to random: dropped with a warning, not an error
    assert any("do not apply to the random policy" in r.message for r in caplog.records)
    assert any("outside the class folders" in r.message and "ignored" in r.message for r in caplog.records)
    found = {p: sum(a["relevant"] for a in _accepted(d)) for p, d in runs.items()}
    share = {p: found[p] / max(len(_accepted(d)), 1) for p, d in runs.items()}
    assert found["gp"] >= 2 * max(found["random"], 1), found
    assert share["gp"] >= 0.5, share
    metrics = [json.loads(line) for line in (runs["gp"] / "metrics.jsonl").read_text().splitlines()]
    assert 0 < metrics[-1]["eval_knn_accuracy"] <= 1  # class folders give 3-class evaluation labels


def test_a_folder_without_classes_is_all_target_and_has_no_evaluation_or_precision(small_corpus, tmp_path):
    from explorer.run.config import ExperimentConfig, from_dict
    from explorer.score.target import TargetConfig, load_target

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(np.full((20, 20), i * 10, np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.md").write_text("not an image")
    target = load_target(TargetConfig(name=str(folder)))
    assert len(target.split["acquire"]) == 12 and len(target.split["probe_test"]) == 0
    from explorer.run.image import ground_truth
    cfg = from_dict(ExperimentConfig, {"target": {"name": str(folder)}, "corpus": str(small_corpus.root)})
    assert ground_truth(cfg, small_corpus) is None  # no precision is claimed without a ground truth
