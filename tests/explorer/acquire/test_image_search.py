"""Image queries (queries by example) through the search clients: the local engine's image index
and clip-retrieval's `image` / `embedding_input`, cached and replayed with no network and no model."""

import socket

import pytest

from explorer.acquire.cache import CacheMiss, ResponseCache
from explorer.acquire.search import ImageQuery, SearchError, build_backend, search_many
from explorer.web.knn_service import IMAGE_INDEX

MODEL = "tf_efficientnet_lite0@64px"


def backends(url, cache):
    return {"local": build_backend("local", cache=cache, url=url),
            "clip image": build_backend("clip-retrieval", cache=cache, url=f"{url}/knn-service",
                                        indice_name=IMAGE_INDEX),
            "clip embedding": build_backend("clip-retrieval", cache=cache, url=url, indice_name=IMAGE_INDEX,
                                            image_model=MODEL)}


def test_image_queries_find_the_image_and_replay_offline(image_engine, small_corpus, tmp_path, monkeypatch):
    item = 160  # an openclipart image
    query = ImageQuery(small_corpus.image_bytes(item), "image:example")
    own_url = f"{image_engine.url}/image/{small_corpus.keys[item]}"
    cache = ResponseCache(tmp_path / "cache")
    recorded = {}
    for name, backend in backends(image_engine.url, cache).items():
        image_results, text_results = search_many(backend, [query, "handwritten digit"], 6)
        assert image_results[0].image_url == own_url and image_results[0].query == "image:example", name
        assert len(image_results) == 6
        if name == "local":  # text queries go to the caption index, as before
            assert len(text_results) > 0
        else:  # a text query in the image index's space is an error that says so
            assert isinstance(text_results, SearchError) and "embeds no text" in str(text_results)
        recorded[name] = (backend.describe(), image_results)
    assert recorded["clip embedding"][0]["image_model"] == MODEL

    def fault(*args, **kwargs):
        raise AssertionError("the replay opened a socket or loaded the image model")
    monkeypatch.setattr(socket.socket, "connect", fault)
    monkeypatch.setattr("explorer.web.image_encoder.ImageEncoder.__init__", fault)
    other = ImageQuery(small_corpus.image_bytes(item + 1), "image:example")  # same label, other image
    for name, (described, results) in recorded.items():
        replay = build_backend("replay", cache=cache, recorded=described)
        assert replay.search_image(query, 6) == results, name
        with pytest.raises(CacheMiss):  # the image's content is part of the request
            replay.search_image(other, 6)


def test_a_backend_without_image_search_says_so():
    searxng = build_backend("searxng", cache=None, url="http://127.0.0.1:9")
    [answer] = search_many(searxng, [ImageQuery(b"\x89PNG", "image:x")], 5)
    assert isinstance(answer, SearchError) and "searxng backend cannot search by image" in str(answer)


def test_an_unreadable_image_is_a_search_error_when_embedded_here(image_engine, tmp_path):
    clip = backends(image_engine.url, ResponseCache(tmp_path / "cache"))["clip embedding"]
    [answer] = search_many(clip, [ImageQuery(b"not an image", "image:x")], 5)
    assert isinstance(answer, SearchError) and "not a readable image" in str(answer)
