"""The engine's image index and its clip-retrieval image queries, on the small real corpus."""

import base64
import json

import httpx
import numpy as np
import pytest

from explorer.web.corpus import CorpusSpec, build_corpus
from explorer.web.image_index import META, ImageIndex, index_is_fresh, near_duplicates
from explorer.web.knn_service import IMAGE_INDEX


def knn(engine, **body):
    return httpx.post(f"{engine.url}/knn-service", json={"indice_name": IMAGE_INDEX, "modality": "image", **body})


def one_item_per_source(corpus):
    return [int(np.flatnonzero(corpus.hidden["source"] == s)[7]) for s in sorted(set(corpus.hidden["source"]))]


def test_an_image_query_finds_that_image_first(image_engine, small_corpus):
    assert httpx.get(f"{image_engine.url}/indices-list").json() == ["explorer", IMAGE_INDEX]
    for i in one_item_per_source(small_corpus):
        image = base64.b64encode(small_corpus.image_bytes(i)).decode()
        hits = knn(image_engine, image=image, num_images=5).json()
        assert hits[0]["id"] == i and hits[0]["url"] == f"{image_engine.url}/image/{small_corpus.keys[i]}"
        assert hits[0]["similarity"] > 0.99 and hits[0]["caption"] == small_corpus.captions[i]
        assert len(hits) == 5 and all(-1 <= h["similarity"] <= 1 for h in hits)
        assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)


def test_an_embedding_of_the_index_and_the_engines_own_image_url_are_queries_too(image_engine, small_corpus):
    i = one_item_per_source(small_corpus)[0]
    index = ImageIndex.open(small_corpus, progress=False)
    hits = knn(image_engine, embedding_input=index.embeddings[i].astype(float).tolist(), num_images=3).json()
    assert hits[0]["id"] == i
    own = f"{image_engine.url}/image/{small_corpus.keys[i]}"
    assert knn(image_engine, image_url=own, num_images=3).json()[0]["id"] == i
    r = knn(image_engine, image_url="https://example.com/a.png")
    assert r.status_code == 400 and "downloads no image_url" in r.json()["error"]


@pytest.mark.parametrize("body, message", [
    ({"embedding_input": [0.1] * 384}, "384 dimensions; the image index (tf_efficientnet_lite0@64px) has 1280"),
    ({"text": "sneaker"}, "embeds no text"),
    ({"image": "not base64!"}, "not valid base64"),
    ({"image": base64.b64encode(b"plain text, not an image").decode()}, "not a readable image"),
    ({"image": "", "embedding_input": [0.0] * 1280}, "finite, non-zero vector"),
    ({"embedding_input": [0.1] * 1280, "modality": "text"}, "only an image index"),
    ({"embedding_input": [0.1] * 1280, "num_result_ids": -1}, "'num_result_ids' should be an integer"),
])
def test_bad_image_queries_are_400s_that_say_why(image_engine, body, message):
    r = knn(image_engine, **body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_image_queries_need_the_image_index(image_engine, engine, small_corpus):
    image = base64.b64encode(small_corpus.image_bytes(0)).decode()
    r = httpx.post(f"{image_engine.url}/knn-service", json={"image": image, "indice_name": "explorer"})
    assert r.status_code == 400 and f"send image queries to indice_name {IMAGE_INDEX!r}" in r.json()["error"]
    r = httpx.post(f"{engine.url}/knn-service", json={"image": image})  # an engine without one
    assert r.status_code == 400 and "serves no image index" in r.json()["error"]
    # text queries keep working on the image engine, unchanged
    text = {"text": "handwritten digit", "num_images": 8}
    ids = [[(h["id"], h["caption"], h["similarity"]) for h in httpx.post(f"{e.url}/knn-service", json=text).json()]
           for e in (image_engine, engine)]
    assert ids[0] == ids[1] and len(ids[0]) == 8


def test_num_result_ids_and_deduplicate_as_clip_back(image_engine, small_corpus):
    image = base64.b64encode(small_corpus.image_bytes(3)).decode()
    hits = knn(image_engine, image=image, num_images=2, num_result_ids=6).json()
    assert len(hits) == 6 and all("url" in h for h in hits[:2]) and not any("url" in h for h in hits[2:])
    # an image with a near twin in the web (clip art stored twice, at two sizes)
    emb = ImageIndex.open(small_corpus, progress=False).embeddings.astype(np.float32)
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0)
    item = int(sims.max(axis=1).argmax())
    assert sims[item].max() > 0.94
    image = base64.b64encode(small_corpus.image_bytes(item)).decode()
    plain = knn(image_engine, image=image, num_images=100, deduplicate=False).json()
    deduped = knn(image_engine, image=image, num_images=100, deduplicate=True).json()
    assert deduped[0] == plain[0] and item in {plain[0]["id"], plain[1]["id"]}
    assert plain[1]["similarity"] > 0.94
    assert plain[1]["id"] not in {h["id"] for h in deduped} and {h["id"] for h in deduped} < {h["id"] for h in plain}


def test_near_duplicates_keeps_the_best_ranked_of_each_group():
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    close = (a + 0.05 * b) / np.linalg.norm(a + 0.05 * b)  # cosine 0.9988 to a
    rows = np.stack([a, b, close, a])
    assert near_duplicates(rows).tolist() == [2, 3]
    assert near_duplicates(rows[:2]).tolist() == []


def test_a_stale_index_is_rebuilt(tmp_path):
    corpus = build_corpus(tmp_path / "web", CorpusSpec(limit_per_source=4), progress=False)
    first = ImageIndex.open(corpus, progress=False)
    meta = json.loads((corpus.root / META).read_text())
    assert index_is_fresh(corpus.root, first.model) and meta["items"] == meta["indexed"] == len(corpus)
    (corpus.root / META).write_text(json.dumps({**meta, "corpus": "another corpus"}))
    assert not index_is_fresh(corpus.root, first.model)
    again = ImageIndex.open(corpus, progress=False)  # rebuilt, to the same vectors
    assert index_is_fresh(corpus.root, first.model)
    assert np.array_equal(again.embeddings, first.embeddings)


def test_a_grid_engine_serves_the_image_index_when_any_of_its_policies_needs_it(image_engine, small_corpus,
                                                                                 tiny_experiment):
    from explorer.run.experiment import local_engine_for
    from policies import searches_by_image

    cfg = tiny_experiment()  # a gp config: it alone would get an engine without the image index
    assert searches_by_image("knn-retrieval") and not searches_by_image(cfg.policy.name)
    image = base64.b64encode(small_corpus.image_bytes(0)).decode()
    for wanted in (False, True):
        with local_engine_for(cfg, image_index=wanted or None) as url:
            r = httpx.post(f"{url}/knn-service", json={"image": image, "indice_name": IMAGE_INDEX, "num_images": 3})
            assert (r.status_code == 200 and r.json()[0]["id"] == 0) if wanted else r.status_code == 400, r.text
