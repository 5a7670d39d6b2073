import io
import json
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from explorer.web.corpus import HIDDEN_COLUMNS, CorpusSpec, WebCorpus, build_corpus


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


CLASS_WORDS = (  # Fashion-MNIST classes as shops name them; written out here, not read from explorer.web.captions
    "t-shirt, tee, top, tank top, crew neck tee, polo", "trousers, pants, jeans, slacks, chinos, leggings",
    "pullover, sweater, jumper, knitwear, sweatshirt, hoodie", "dress, gown, frock, sundress, maxi dress, evening dress",
    "coat, jacket, parka, overcoat, raincoat, trench coat", "sandal, sandals, flip-flops, slide, espadrille, slipper",
    "shirt, blouse, button-down, flannel shirt, dress shirt, tunic",
    "sneaker, sneakers, trainers, running shoe, tennis shoes, gym shoe",
    "bag, handbag, purse, tote, satchel, backpack", "ankle boot, boots, bootie, chelsea boot, combat boot, boot")
PHRASES = {p: c for c, words in enumerate(CLASS_WORDS) for p in words.split(", ")}


def named_classes(caption: str) -> set[int]:
    """The classes whose words a caption uses, longest phrase first ('dress shirt' is a shirt)."""
    pattern = "|".join(re.escape(p) for p in sorted(PHRASES, key=len, reverse=True))
    return {PHRASES[m.group(1)] for m in re.finditer(rf"(?<![\w-])({pattern})(?![\w-])", caption.lower())}


def caption_kinds(captions, labels) -> np.ndarray:
    """Per caption: 0 names its own class only, 1 names one other class only (wrong), 2 names no class."""
    kinds = []
    for caption, label in zip(captions, labels):
        named = named_classes(caption)
        assert len(named) <= 1, caption
        kinds.append(2 if not named else 0 if named == {int(label)} else 1)
    return np.array(kinds)


def test_captions_are_noisy_alt_text_not_labels(small_corpus):
    from explorer.web.captions import fashion_captions
    from explorer.web.sources import load_fashion_mnist

    assert named_classes("Men's dress shirt - sale") == {6} and named_classes("grey T-shirt") == {0}
    assert named_classes("IMG_0042.jpg") == set() and named_classes("summer sundress") == {3}
    # the slice: each caption's words agree with the hidden flag and label, checked independently
    h = small_corpus.hidden
    fashion = np.flatnonzero(h["source"] == "fashion-mnist")
    kinds = caption_kinds([small_corpus.captions[i] for i in fashion], h["label"][fashion])
    assert np.array_equal(kinds == 1, h["caption_wrong"][fashion].astype(bool))
    assert (kinds == 0).sum() > 100 and (kinds == 1).any() and (kinds == 2).any()
    assert small_corpus.meta["spec"]["noise"] == {"wrong": 0.10, "uninformative": 0.05}  # the documented rates
    # the rates, on the 10k real test labels with the noise a default corpus build uses: within 4 sigma
    _, labels = load_fashion_mnist("test")
    captions, flagged = fashion_captions(labels, seed=0, noise=CorpusSpec().noise)
    kinds = caption_kinds(captions, labels)
    assert np.array_equal(kinds == 1, flagged)
    n = len(labels)
    for kind, rate in ((1, 0.10), (2, 0.05)):
        assert abs((kinds == kind).mean() - rate) <= 4 * np.sqrt(rate * (1 - rate) / n), (kind, (kinds == kind).mean())
    assert len({c for c, f in zip(small_corpus.captions, h["source"] == "fashion-mnist") if f}) > 50
    clip = [c for c, s in zip(small_corpus.captions, h["source"]) if s == "openclipart"]
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
    from explorer.score.target import TargetConfig, load_target
    from explorer.web.sources import load_fashion_mnist

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
