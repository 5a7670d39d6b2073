import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from explorer.corpus import HIDDEN_COLUMNS, CorpusSpec, WebCorpus, build_corpus


def test_slice_has_every_source_and_img2dataset_columns(small_corpus):
    assert small_corpus.meta["per_source"] == {"fashion-mnist": 150, "mnist": 150, "openclipart": 150}
    cols = set(pq.read_schema(small_corpus.root / "manifest.parquet").names)
    assert {"key", "url", "caption", "status", "width", "height", "sha256"} <= cols
    assert set(HIDDEN_COLUMNS) <= cols
    assert len(set(small_corpus.keys)) == len(small_corpus)


def test_bytes_served_from_shards_match_manifest(small_corpus):
    import hashlib

    sha = pq.read_table(small_corpus.root / "manifest.parquet")["sha256"].to_pylist()
    for i in range(0, len(small_corpus), 37):
        body = small_corpus.image_bytes(i)
        assert hashlib.sha256(body).hexdigest() == sha[i]
        with Image.open(io.BytesIO(body)) as im:
            assert im.size == (small_corpus.width[i], small_corpus.height[i])


def test_shards_are_webdataset_tars(small_corpus):
    with tarfile.open(small_corpus.root / "shards" / "00000.tar") as tar:
        names = tar.getnames()
        key = small_corpus.keys[0]
        assert names[:3] == [f"{key}.png", f"{key}.txt", f"{key}.json"]
        public = json.loads(tar.extractfile(f"{key}.json").read())
        assert public["caption"] == small_corpus.captions[0]
        assert not set(HIDDEN_COLUMNS) & set(public)  # ground truth never leaves the manifest


def test_captions_are_noisy_alt_text_not_labels(small_corpus):
    fashion = small_corpus.hidden["source"] == "fashion-mnist"
    wrong = small_corpus.hidden["caption_wrong"][fashion]
    assert 0 < wrong.mean() < 0.3  # the documented 10% wrong captions, on a 150-item slice
    assert len({c for c, f in zip(small_corpus.captions, fashion) if f}) > 50
    clip = [c for c, s in zip(small_corpus.captions, small_corpus.hidden["source"]) if s == "openclipart"]
    assert all(c.endswith("clip art") for c in clip)


def test_rebuild_is_byte_identical(small_corpus, tmp_path):
    again = build_corpus(tmp_path, CorpusSpec(limit_per_source=150), progress=False)
    for name in ("manifest.parquet", "captions.json", "shards/00000.tar"):
        assert (again.root / name).read_bytes() == (small_corpus.root / name).read_bytes(), name


def test_user_web_folder(tmp_path):
    web = tmp_path / "web"
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (web / cls).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (40, 30), colour).save(web / cls / f"{cls}_thing_{j}.jpg")
    (web / "red" / "red_thing_0.txt").write_text("a bright red square")
    (web / "notes.md").write_text("not an image")
    corpus = build_corpus(tmp_path / "c", CorpusSpec(web_dir=str(web)), progress=False)
    assert len(corpus) == 6
    assert "a bright red square" in corpus.captions
    assert sorted(set(corpus.hidden["class_name"])) == ["blue", "red"]
    assert Image.open(io.BytesIO(corpus.image_bytes(0))).format == "PNG"


def test_missing_corpus_error_says_how_to_build(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="explorer corpus build"):
        WebCorpus(tmp_path)


def test_target_from_a_folder_with_class_subfolders(tmp_path):
    from explorer.target import TargetConfig, load_target
    from explorer.sources import load_fashion_mnist

    grey, labels = load_fashion_mnist("test")
    for i in range(40):
        folder = tmp_path / ("boots" if labels[i] == 9 else "other")
        folder.mkdir(exist_ok=True)
        Image.fromarray(grey[i]).save(folder / f"{i}.png")
    (tmp_path / "README.txt").write_text("not an image")
    target = load_target(TargetConfig(name=str(tmp_path)))
    assert target.images.shape == (40, 3, 32, 32) and target.class_names == ("boots", "other")
    assert sorted(np.concatenate(list(target.split.values())).tolist()) == list(range(40))
    assert (target.labels == 0).sum() == (labels[:40] == 9).sum()
