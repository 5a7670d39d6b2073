import time

import pytest

from explorer.acquire.cache import CacheCorruption, CachedResponse, CacheMiss, CacheMode, ResponseCache
from tests.explorer.acquire.fault_server import clipart_pngs, fashion_images, png_bytes


def _response(body: bytes, url: str = "http://img.test/a.png", status: int = 200):
    return CachedResponse(url=url, status=status, headers={"content-type": "image/png"},
                          body=body, fetched_at=time.time(),
                          request={"method": "GET", "url": url, "params": {}, "json": None})


def test_request_key_is_canonical():
    key = ResponseCache.request_key
    assert key("get", "http://a/s", {"q": "cat", "n": 5}) == key("GET", "http://a/s", {"n": 5, "q": "cat"})
    assert key("GET", "http://a/s", {"q": "cat"}) != key("GET", "http://a/s", {"q": "dog"})
    assert key("POST", "http://a/s", json_body={"q": "cat"}) != key("GET", "http://a/s", {"q": "cat"})
    assert len(key("GET", "http://a/s")) == 64 and int(key("GET", "http://a/s"), 16) >= 0


def test_put_get_round_trip_and_stats(tmp_path):
    cache = ResponseCache(tmp_path)
    body = png_bytes(fashion_images(1)[0])
    key = ResponseCache.request_key("GET", "http://img.test/a.png")
    assert cache.get(key) is None and key not in cache
    original = _response(body)
    cache.put(key, original)
    assert key in cache
    got = cache.get(key)
    assert got == original  # every field, the float time included, survives the JSON round trip
    assert got.body == body and got.status == 200 and got.headers["content-type"] == "image/png"
    assert got.request["url"] == "http://img.test/a.png"
    assert cache.stats() == {"hits": 1, "misses": 1, "corrupt": 0}
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temp files


def test_survives_a_new_process_view(tmp_path):
    body = clipart_pngs(1)[0]
    key = ResponseCache.request_key("GET", "http://img.test/c.png")
    ResponseCache(tmp_path).put(key, _response(body))
    assert ResponseCache(tmp_path).get(key).body == body


def test_bodies_are_stored_once(tmp_path):
    cache = ResponseCache(tmp_path)
    body = clipart_pngs(1)[0]
    for url in ("http://a.test/x.png", "http://b.test/y.png"):
        cache.put(ResponseCache.request_key("GET", url), _response(body, url))
    assert len(list((tmp_path / "blobs").rglob("*"))) == 2  # one shard dir + one blob
    assert len(list((tmp_path / "requests").rglob("*.json"))) == 2


def test_corrupted_blob_is_quarantined(tmp_path):
    cache = ResponseCache(tmp_path)
    key = ResponseCache.request_key("GET", "http://img.test/a.png")
    cache.put(key, _response(png_bytes(fashion_images(1)[0])))
    (blob,) = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    data = bytearray(blob.read_bytes())
    data[40] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert cache.get(key) is None
    assert cache.stats()["corrupt"] == 1 and key not in cache
    assert {p.name for p in (tmp_path / "quarantine").iterdir()} == {blob.name, f"{key}.json"}
    with pytest.raises(CacheCorruption, match="quarantine"):
        cache.require(key, "GET http://img.test/a.png")


def test_unreadable_metadata_is_quarantined(tmp_path):
    cache = ResponseCache(tmp_path)
    key = ResponseCache.request_key("GET", "http://img.test/a.png")
    cache.put(key, _response(b"\x89PNG"))
    (meta,) = (tmp_path / "requests").rglob("*.json")
    meta.write_text("{not json")
    assert cache.get(key) is None and cache.stats()["corrupt"] == 1


def test_replay_miss_names_the_request_and_the_cache(tmp_path):
    cache = ResponseCache(tmp_path / "runs")
    key = ResponseCache.request_key("GET", "http://img.test/missing.png")
    with pytest.raises(CacheMiss) as err:
        cache.require(key, "GET http://img.test/missing.png")
    assert "http://img.test/missing.png" in str(err.value) and str(tmp_path / "runs") in str(err.value)


def test_modes_parse_from_strings():
    assert [CacheMode(m) for m in ("readwrite", "refresh", "replay")] == list(CacheMode)
    with pytest.raises(ValueError, match="'offline' is not a valid CacheMode"):
        CacheMode("offline")
