"""The real clip-retrieval `ClipClient` against the local engine's knn service.

The client module is loaded from the installed wheel by file: `import clip_retrieval` would run the
package's __init__, which imports its whole back end (flask, torch models, ...); the client itself
needs only `requests`. scripts/setup.sh installs the wheel with --no-deps."""

import importlib.util
from pathlib import Path

import pytest

from explorer.acquire.search import build_backend

INSTALL = "pip install --no-deps clip-retrieval==2.45.0"


@pytest.fixture(scope="module")
def clip_client():
    package = importlib.util.find_spec("clip_retrieval")
    if package is None or not package.submodule_search_locations:
        pytest.fail(f"clip-retrieval is not installed: run `{INSTALL}` (scripts/setup.sh does)")
    path = Path(package.submodule_search_locations[0]) / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_clip_client_text_and_embedding_queries(engine, small_corpus, clip_client):
    client = clip_client.ClipClient(url=f"{engine.url}/knn-service", indice_name="explorer", num_images=12)
    hits = client.query(text="handwritten digit")
    assert 0 < len(hits) <= 12 and {"url", "caption", "similarity", "id"} <= set(hits[0])
    assert len({h["caption"] for h in hits}) == len(hits)  # ClipClient asks for deduplicate=True
    assert all(-1.0 <= h["similarity"] <= 1.0 for h in hits)

    item = hits[0]["id"]  # an embedding query (ClipClient sends "text": null) finds the same caption
    vector = small_corpus.caption_embeddings()[small_corpus.caption_id[item]].tolist()
    by_vector = client.query(embedding_input=vector)
    assert by_vector[0]["caption"] == small_corpus.captions[item]

    ours = build_backend("clip-retrieval", cache=None, url=f"{engine.url}/knn-service", indice_name="explorer")
    assert [r.image_url for r in ours.search("handwritten digit", 12)] == [h["url"] for h in hits]

    wrong = clip_client.ClipClient(url=f"{engine.url}/knn-service", indice_name="laion5B-L-14",
                                   modality=clip_client.Modality.TEXT)
    assert "valid: explorer" in wrong.query(text="digit")["error"]  # the 400 names the engine's index


def test_real_clip_client_image_and_embedding_queries(image_engine, small_corpus, clip_client, tmp_path):
    from explorer.web.image_index import ImageIndex

    item = 20
    path = tmp_path / "query.png"
    path.write_bytes(small_corpus.image_bytes(item))
    client = clip_client.ClipClient(url=f"{image_engine.url}/knn-service", indice_name="explorer-image", num_images=5)
    hits = client.query(image=str(path))  # ClipClient reads the file and sends it base64-encoded
    assert hits[0]["id"] == item and hits[0]["url"].endswith(f"/image/{small_corpus.keys[item]}")
    assert len(hits) <= 5 and all(-1.0 <= h["similarity"] <= 1.0 for h in hits)
    vector = ImageIndex.open(small_corpus, progress=False).embeddings[item].astype(float).tolist()
    assert client.query(embedding_input=vector)[0]["id"] == item
    assert "embeds no text" in client.query(text="sneaker")["error"]  # a text query in the image space
