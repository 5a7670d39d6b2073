"""Shared fixtures: a small real corpus slice and the local engine serving it over loopback HTTP."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hidden hub download fails loudly instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _share_the_cores() -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's intra-op threads: two
    workers with torch's default (every core) would run twice as many threads as cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


_share_the_cores()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """150 real items from each installed source, built once per test session."""
    from explorer.web.corpus import CorpusSpec, build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"), CorpusSpec(limit_per_source=150), progress=False)


@pytest.fixture(scope="session")
def engine(small_corpus):
    """The local search engine over `small_corpus`, on 127.0.0.1, for the whole session."""
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    server = SearchServer(HybridIndex(small_corpus, default_encoder())).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_engine(small_corpus):
    """The local engine over `small_corpus` with its image index (built beside it, once)."""
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.image_index import ImageIndex
    from explorer.web.text_encoder import default_encoder

    server = SearchServer(HybridIndex(small_corpus, default_encoder()),
                          image_index=ImageIndex.open(small_corpus, progress=False)).start()
    yield server
    server.stop()


TINY_EXPERIMENT = {
    "name": "tiny", "iterations": 2, "seed": 0,
    "target": {"limit": 300},
    "vocabulary": {"n_random": 30},
    "policy": {"name": "gp", "queries_per_iteration": 4, "options": {"explore_first": 4}},
    "search": {"results_per_query": 15},
    "learner": {"backbone": "resnet18", "backbone_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8},
                "dim": 16, "mlp_dim": 32, "batch_size": 16, "warmup_steps": 1, "total_steps": 50},
    "train": {"pretrain_steps": 2, "steps_per_iteration": 2, "knn_k": 5},
}


@pytest.fixture(scope="session")
def tiny_experiment(small_corpus):
    """`tiny_experiment(**changes)`: a 2-iteration experiment on `small_corpus` with a tiny learner."""
    from explorer.run.config import ExperimentConfig, from_dict

    return lambda **changes: from_dict(ExperimentConfig, {**TINY_EXPERIMENT, "corpus": str(small_corpus.root),
                                                          **changes})


@pytest.fixture(scope="session")
def tiny_run(tiny_experiment, engine, tmp_path_factory):
    """The folder of a finished `tiny_experiment()` image run (read by the sheet and gallery tests;
    a test that changes it works on a copy, or restores what it removed)."""
    from explorer.run.image import ImageLoop

    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    loop = ImageLoop(tiny_experiment(), run_dir, engine_url=engine.url, progress=False)
    loop.run(log=lambda line: None)
    loop.close()
    return run_dir
