"""The local engine over real loopback HTTP."""

import httpx
import numpy as np


def _truth(corpus, url):
    i = corpus.index_of[url.rsplit("/", 1)[-1]]
    return corpus.hidden["source"][i], corpus.hidden["class_name"][i]


def test_searxng_shape_and_relevance(engine, small_corpus):
    r = httpx.get(f"{engine.url}/search", params={"q": "sneakers", "format": "json", "per_page": 10})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["query"] == "sneakers" and body["number_of_results"] >= 10
    top = body["results"]
    assert {"url", "img_src", "title", "score", "positions"} <= set(top[0])
    assert [t["positions"][0] for t in top] == list(range(1, 11))
    assert all(a["score"] >= b["score"] for a, b in zip(top, top[1:]))
    fashion = [_truth(small_corpus, t["img_src"])[0] == "fashion-mnist" for t in top]
    assert np.mean(fashion) >= 0.8


def test_pagination_is_disjoint_and_consistent(engine):
    def page(p, per):
        return [x["img_src"] for x in httpx.get(f"{engine.url}/search", params={
            "q": "handwritten digit", "format": "json", "pageno": p, "per_page": per}).json()["results"]]

    first, second = page(1, 7), page(2, 7)
    assert len(first) == len(second) == 7 and not set(first) & set(second)
    assert first + second == page(1, 14)


def test_clip_retrieval_shape(engine):
    r = httpx.post(f"{engine.url}/knn-service", json={"text": "handwritten digit", "num_images": 5})
    hits = r.json()
    assert len(hits) == 5 and {"url", "caption", "similarity", "id"} <= set(hits[0])


def test_image_endpoint_serves_png_bytes(engine, small_corpus):
    key = small_corpus.keys[3]
    r = httpx.get(f"{engine.url}/image/{key}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == small_corpus.image_bytes(3)
    assert httpx.get(f"{engine.url}/image/nope").status_code == 404


def test_bad_requests_get_400(engine):
    assert httpx.get(f"{engine.url}/search", params={"q": ""}).status_code == 400
    assert httpx.get(f"{engine.url}/search", params={"q": "x", "pageno": "zero"}).status_code == 400
    assert httpx.post(f"{engine.url}/knn-service", content=b"{not json").status_code == 400


def test_hidden_truth_never_served(engine):
    text = httpx.get(f"{engine.url}/search", params={"q": "boots", "per_page": 50}).text
    assert "caption_wrong" not in text and "class_name" not in text and "fashion-mnist" not in text


def _keys(obj) -> set:
    """Every mapping key anywhere in a JSON value."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_hidden_truth_never_served_by_the_knn_service(engine, small_corpus):
    from explorer.web.corpus import HIDDEN_COLUMNS

    served = []
    for text in ("ankle boots", "handwritten digit", "butterfly clip art"):
        r = httpx.post(f"{engine.url}/knn-service", json={"text": text, "num_images": len(small_corpus)})
        assert r.status_code == 200
        assert "fashion-mnist" not in r.text and "caption_wrong" not in r.text and "class_name" not in r.text
        hits = r.json()
        assert hits and not _keys(hits) & set(HIDDEN_COLUMNS)
        assert all(set(h) == {"url", "caption", "similarity", "id"} for h in hits)  # public fields only
        served += hits
    # the answers cover items with a wrong caption: they are served with that caption and no flag
    items = {h["id"] for h in served}
    wrong = [i for i in items if small_corpus.hidden["caption_wrong"][i]]
    assert wrong and all(h["caption"] == small_corpus.captions[h["id"]] for h in served)
    assert {small_corpus.hidden["source"][i] for i in items} == {"fashion-mnist", "mnist", "openclipart"}


def test_server_stops_cleanly(small_corpus):
    from explorer.web.engine import HybridIndex, SearchServer
    from explorer.web.text_encoder import default_encoder

    with SearchServer(HybridIndex(small_corpus, default_encoder())) as server:
        url = server.url
        assert httpx.get(f"{url}/healthz").json()["items"] == len(small_corpus)
    import pytest
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)


def test_unrelated_query_returns_little(engine, small_corpus):
    """A query that matches nothing well gets few results, not pages of the commonest items."""
    related = httpx.get(f"{engine.url}/search", params={"q": "sneakers", "per_page": 100}).json()
    unrelated = httpx.get(f"{engine.url}/search", params={"q": "volcanic eruption", "per_page": 100}).json()
    assert related["number_of_results"] >= 10
    assert unrelated["number_of_results"] < related["number_of_results"] / 2


# ----- the knn service as clip-retrieval's back end behaves ---------------------------------------

def _knn(engine, **body):
    return httpx.post(f"{engine.url}/knn-service", json=body)


def test_knn_needs_text_or_an_embedding(engine, small_corpus):
    for body in ({"num_images": 5}, {"text": None, "num_images": 5}, {"text": "", "embedding_input": None}):
        r = _knn(engine, **body)
        assert r.status_code == 400 and "need a non-empty 'text', an 'image', an 'image_url' or an 'embedding_input'" in r.json()["error"]
    assert _knn(engine, text=None, image_url="https://x.example/a.jpg").status_code == 400
    # an embedding query (as ClipClient sends for embedding_input): an item's own caption embedding
    # finds that caption first, with a similarity that stays within [-1, 1]
    item = 3
    vector = small_corpus.caption_embeddings()[small_corpus.caption_id[item]].tolist()
    hits = _knn(engine, text=None, embedding_input=vector, num_images=5).json()
    assert hits[0]["caption"] == small_corpus.captions[item] and 0.99 < hits[0]["similarity"] <= 1.0
    assert _knn(engine, embedding_input=vector[:10], num_images=5).status_code == 400  # wrong dimension


def test_knn_checks_modality_and_indice_name(engine):
    assert httpx.get(f"{engine.url}/indices-list").json() == ["explorer"]
    r = _knn(engine, text="sneaker", modality="video")
    assert r.status_code == 400 and "valid: image, text" in r.json()["error"]
    r = _knn(engine, text="sneaker", indice_name="laion5B-L-14")
    assert r.status_code == 400 and "valid: explorer" in r.json()["error"]
    for modality in ("image", "text"):
        assert _knn(engine, text="sneaker", modality=modality, indice_name="explorer").status_code == 200


def test_knn_deduplicate_and_similarity_range(engine, small_corpus):
    shared = np.bincount(small_corpus.caption_id).argmax()  # the caption most items share
    query = small_corpus.distinct_captions[shared]
    plain = _knn(engine, text=query, num_images=30, deduplicate=False).json()
    deduped = _knn(engine, text=query, num_images=30, deduplicate=True).json()
    captions = [h["caption"] for h in plain]
    assert captions.count(query) >= 2 and deduped[0]["caption"] == query
    assert len({h["caption"] for h in deduped}) == len(deduped) >= 2
    assert all(-1.0 <= h["similarity"] <= 1.0 for h in plain + deduped)
