"""Shared fixtures: a small real corpus slice and the local engine serving it over loopback HTTP."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hidden hub download fails loudly instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """150 real items from each installed source, built once per test session."""
    from explorer.corpus import CorpusSpec, build_corpus

    return build_corpus(tmp_path_factory.mktemp("corpus"), CorpusSpec(limit_per_source=150), progress=False)


@pytest.fixture(scope="session")
def engine(small_corpus):
    """The local search engine over `small_corpus`, on 127.0.0.1, for the whole session."""
    from explorer.engine import HybridIndex, SearchServer
    from explorer.text_encoder import default_encoder

    server = SearchServer(HybridIndex(small_corpus, default_encoder())).start()
    yield server
    server.stop()
