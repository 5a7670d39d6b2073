"""The reward on a user's folder unlike the web's copies of its kind, and a reward that cannot
silently flatten.

The folder holds scikit-learn's 8x8 digits, scaled up to 28 px: blurry digits, not MNIST. The
web (the small corpus) holds MNIST digits (sharp, another style of the same kind), clothing and
clip-art. Every web digit is less typical of the folder than the folder's own least typical tenth,
so the target's percentile alone accepts none of them; the web's reference must let them in."""

import json
import warnings

import numpy as np
import pytest
import yaml
from PIL import Image

from explorer.cli import main
from explorer.run.daemon import run_status


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("my-digits")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if i >= 400:
            break
        (root / str(label)).mkdir(exist_ok=True)
        pixels = (image / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.BILINEAR).save(root / str(label) / f"{i:04d}.png")
    return root


def _config(path, small_corpus, policy=None, **reward):
    config = {
        "name": "digits", "iterations": 2, "seed": 0, "corpus": str(small_corpus.root),
        "target": {"relevant": ["mnist"]},
        "vocabulary": {"n_random": 30},
        "policy": policy or {"name": "gp", "queries_per_iteration": 8, "options": {"explore_first": 8}},
        "search": {"results_per_query": 20},
        "reward": {"background_queries": 32, **reward},
        "learner": {"backbone": "tf_efficientnet_lite0", "backbone_kwargs": {}, "pretrained": "pypi",
                    "image_size": 48, "frozen_stages": 4, "freeze_bn": True, "dim": 32, "mlp_dim": 64,
                    "batch_size": 16, "warmup_steps": 1},
        "train": {"pretrain_steps": 2, "steps_per_iteration": 2, "knn_k": 5},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


def _accepted(run_dir):
    if not (run_dir / "accepted.jsonl").exists():  # nothing accepted at all
        return []
    return [json.loads(line) for line in (run_dir / "accepted.jsonl").read_text().splitlines() if line.strip()]


QUERIES = ["handwritten digit", "dress", "number", "shoe", "scan of a handwritten", "shirt", "numeral",
           "flower", "postal code digit", "bag", "handwriting sample", "animals"]


class ScriptedQueries:
    """Test policy: the same fixed queries in every run, half of them for digits, so the test
    measures the reward and acceptance rather than a policy's luck on a 450-item web."""

    name = "scripted"

    def __init__(self, concepts, seed=0):
        self.position = 0

    def propose(self, n):
        from policies.base import Query

        batch = [Query(QUERIES[(self.position + i) % len(QUERIES)]) for i in range(n)]
        self.position += n
        return batch

    def update(self, queries, rewards):
        pass

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.mark.slow
def test_a_folder_of_another_style_than_the_webs_copies_accepts_its_kind(digit_folder, small_corpus, tmp_path,
                                                                          monkeypatch):
    from policies.base import POLICIES

    monkeypatch.setitem(POLICIES, "scripted", ScriptedQueries)
    out = tmp_path / "run"
    # a third of this small web is digits: its 95th percentile would admit only their best tenth
    config = _config(tmp_path / "c.yaml", small_corpus, policy={"name": "scripted", "queries_per_iteration": 6},
                     web_percentile=75)
    assert main(["run", str(config), "--target", str(digit_folder), "--out", str(out), "--quiet"]) == 0
    rows, accepted = _rows(out), _accepted(out)
    relevant = sum(a["relevant"] for a in accepted)
    fetched_share = np.mean([r["precision_fetched"] for r in rows])
    assert 0.2 < fetched_share < 0.8  # the queries fetched digits and other things
    assert relevant >= 10, relevant  # web digits, in MNIST's style, are accepted for blurry digits
    assert relevant / len(accepted) > fetched_share, (relevant, len(accepted), fetched_share)
    assert all(r["reward_offset"] > 0 for r in rows)  # the web's reference did it, not the target's
    assert all(r["reward_auc"] > 0.5 for r in rows)


@pytest.mark.slow
def test_a_collapsed_reward_says_so_within_one_iteration_and_reads_the_base_encoder(
        digit_folder, small_corpus, tmp_path, monkeypatch):
    import explorer.run.image

    build = explorer.run.image.learner_on  # the run's learner (its base encoder is built apart)

    def collapsing(*args, **kwargs):  # fault: an encoder that maps every image onto one point
        learner = build(*args, **kwargs)
        learner.embed = lambda images, **kw: np.full((len(images), 1280), 1 / np.sqrt(1280), np.float32)
        return learner

    monkeypatch.setattr(explorer.run.image, "learner_on", collapsing)
    out = tmp_path / "collapsed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", str(_config(tmp_path / "c.yaml", small_corpus)), "--target", str(digit_folder),
                     "--out", str(out), "--quiet"]) == 0
    assert any("the reward has collapsed" in str(w.message) for w in caught)
    first = _rows(out)[0]
    assert first["reward_collapsed"] and first["reward_encoder"] == "base" and first["reward_spread"] < 0.01
    assert sum(r["accepted"] for r in _rows(out)) > 0  # the base encoder's reward still tells images apart
    status = run_status(out)
    assert "WARNING: the reward collapsed" in status and "encoder base" in status


def test_the_nothing_accepted_warning_counts_iterations_across_a_resume(tmp_path):
    from types import SimpleNamespace

    from explorer.run.loop import RunLoop
    from explorer.score.reward import RewardCalibration, RewardConfig

    space = SimpleNamespace(calibration=RewardCalibration(np.linspace(0.5, 0.9, 50)))
    low = np.full(10, 0.1, np.float32)  # nothing reaches the threshold
    loop = SimpleNamespace(cfg=SimpleNamespace(reward=RewardConfig()), space=space, reward_health={}, iteration=1,
                           empty_rounds=0, run_dir=tmp_path, keep_checkpoints=3, failed_searches=[],
                           state_dict=lambda: {"iteration": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert RunLoop._reward_diagnostics(loop, low, 0)["accepted_nothing_for"] == 1
        RunLoop.save_checkpoint(loop)  # killed here: the resumed run must still count this iteration
        resumed = SimpleNamespace()
        RunLoop._open_run(resumed, None, tmp_path, replay=False, progress=False, resume=True, keep_checkpoints=3)
        resumed.cfg, resumed.space, resumed.reward_health, resumed.iteration = loop.cfg, space, {}, 2
        assert RunLoop._reward_diagnostics(resumed, low, 0)["accepted_nothing_for"] == 2
    assert [str(w.message) for w in caught if "nothing accepted for 2 iterations" in str(w.message)]
