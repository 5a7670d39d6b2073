"""The world web: readers of real package images, opaque keys, the composition and base rate, presets."""

import dataclasses
import hashlib
import io
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from explorer.web import freeciv, package_images
from explorer.web.corpus import CorpusSpec, build_corpus, composition
from explorer.web.package_images import BrokenSourceFile
from explorer.web.presets import (
    CORPUS_PRESETS,
    WORLD_SOURCES,
    corpus_location,
    open_image_corpus,
)

READERS = {"oxygen-icons": package_images.read_oxygen, "noto-emoji": package_images.read_emoji,
           "freeciv": freeciv.read_freeciv, "wesnoth": package_images.read_wesnoth,
           "tuxpaint-stamps": package_images.read_stamps, "dejavu-glyphs": package_images.read_glyphs,
           "dejavu-serif-glyphs": package_images.read_serif_glyphs}


@pytest.fixture(scope="module")
def world_slice(tmp_path_factory):
    """The world preset with 25 items of each source (10 Fashion-MNIST), as a real build."""
    spec = dataclasses.replace(CORPUS_PRESETS["world"], limit_per_source=25, source_limits={"fashion-mnist": 10})
    return build_corpus(tmp_path_factory.mktemp("world"), spec, progress=False)


@pytest.mark.parametrize("source", list(READERS))
def test_reader_yields_decodable_captioned_images_in_a_stable_order(source):
    first, again = list(READERS[source](20, 0)), list(READERS[source](20, 0))
    assert [x.name for x in first] == [x.name for x in again] and len(first) >= 15
    assert len({x.name for x in first}) == len(first)
    for item in first:
        with Image.open(io.BytesIO(item.png)) as im:
            assert im.format == "PNG" and min(im.size) >= 8
            im.load()
        assert item.caption.strip() and item.class_name
    assert [x.name for x in READERS[source](20, 1)] != [x.name for x in first]  # the seed picks the slice


def test_captions_come_from_the_packages_names():
    assert freeciv.sprite_caption("u.warriors", "amplio2") == "warriors unit, amplio2"
    assert package_images.emoji_caption((0x1F600,)) == "grinning face emoji"
    assert package_images.emoji_caption((0x1F468, 0x200D, 0x1F692)) == "man, fire engine emoji"
    # one size per icon, the largest up to 128 px: no picture twice at several sizes
    files = package_images.oxygen_files()
    assert len({(c, n) for c, n, _ in files}) == len(files) > 1500
    for context, name, path in files[::97]:
        sizes = [int(d.name.split("x")[0]) for d in package_images.OXYGEN_DIR.iterdir()
                 if (d / context / f"{name}.png").exists()]
        assert int(path.parent.parent.name.split("x")[0]) == max(s for s in sizes if s <= 128), path
    glyphs = {x.name: x.caption for x in package_images.read_glyphs(None, 0)}
    assert glyphs["U+0041"] == "latin capital letter a" and glyphs["U+20AC"] == "euro sign"


def test_freeciv_cuts_the_spec_grid_and_skips_blank_cells_and_broken_sheets(tmp_path, monkeypatch):
    sheet = Image.new("RGBA", (1 + 2 * 11, 1 + 11), (0, 0, 0, 0))  # two 10x10 cells, 1 px borders
    sheet.paste((0, 200, 0, 255), (1, 1, 11, 11))  # the left cell: one flat colour (a mask): dropped
    sheet.paste((200, 0, 0, 255), (12, 1, 17, 11))  # the right cell: red, a blue stripe, transparent
    sheet.paste((0, 0, 200, 255), (17, 1, 19, 11))
    (tmp_path / "set").mkdir()
    sheet.save(tmp_path / "set" / "units.png")
    (tmp_path / "set" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    grid = ('[file]\ngfx = "set/{}"\n\n[grid_main]\nx_top_left = 1\ny_top_left = 1\ndx = 10\ndy = 10\n'
            'pixel_border = 1\n\ntiles = {{ "row", "column", "tag"\n  0, 0, "u.nothing" ; a comment\n'
            '  0, 1, "u.war_chariot"\n}}\n')
    (tmp_path / "set" / "units.spec").write_text(grid.format("units"))
    (tmp_path / "set" / "more.spec").write_text(grid.format("broken"))
    monkeypatch.setattr(freeciv, "FREECIV_DIR", tmp_path)
    with pytest.warns(BrokenSourceFile, match="broken.png"):
        items = list(freeciv.read_freeciv(None, 0))
    assert [x.caption for x in items] == ["war chariot unit, set"]
    cell = np.asarray(Image.open(io.BytesIO(items[0].png)))
    assert cell.shape == (10, 10, 4) and (cell[:, :5, 0] == 200).all() and (cell[:, 5:7, 2] == 200).all()
    assert (cell[:, 7:, 3] == 0).all()


def test_file_readers_skip_broken_files_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "units" / "elves").mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 90, 0)).save(tmp_path / "units" / "elves" / "archer.png")
    (tmp_path / "units" / "elves" / "shaman.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    monkeypatch.setattr(package_images, "WESNOTH_DIR", tmp_path)
    with pytest.warns(BrokenSourceFile, match="shaman.png"):
        items = list(package_images.read_wesnoth(None, 0))
    assert [(x.name, x.caption) for x in items] == [("units/elves/archer.png", "archer - elves units")]


def test_world_keys_are_opaque(world_slice):
    sources = set(world_slice.hidden["source"])
    assert sources == {"mnist" if s == "mnist-web" else s for s in WORLD_SOURCES}  # named by their kind
    words = {w for s in sources for w in re.split(r"\W+", s)} | {"fmnist", "clip", "web", "mnist"}
    for key in world_slice.keys:
        assert re.fullmatch(r"[0-9a-f]{16}", key), key
        assert not any(w in key for w in words if len(w) > 2)
    # keys do not cluster by source: the first hex digit is spread alike across sources
    first = np.array([int(k[0], 16) for k in world_slice.keys])
    assert len(set(first[world_slice.hidden["source"] == "fashion-mnist"])) > 3


def test_served_urls_name_no_source(engine, small_corpus):
    for query in ("sneakers", "handwritten digit seven", "butterfly clip art"):
        hits = httpx.get(f"{engine.url}/search", params={"q": query, "format": "json"}).json()["results"]
        assert hits
        for hit in hits:
            key = hit["img_src"].rsplit("/", 1)[-1]
            assert re.fullmatch(r"[0-9a-f]{16}", key) and key in small_corpus.index_of, hit["img_src"]


def test_composition_and_base_rate(world_slice):
    assert composition(["a", "fashion-mnist", "a", "b"]) == {
        "per_source": {"a": 2, "b": 1, "fashion-mnist": 1}, "share": {"a": 0.5, "b": 0.25, "fashion-mnist": 0.25},
        "base_rate": {"fashion-mnist": 0.25, "mnist": 0.0}}
    meta, hidden = world_slice.meta, world_slice.hidden["source"]
    names, counts = np.unique(hidden, return_counts=True)
    assert meta["per_source"] == dict(zip(names.tolist(), counts.tolist()))
    assert meta["per_source"]["fashion-mnist"] == 10  # the preset's sample of the target's kind, sliced
    assert meta["share"] == pytest.approx({s: c / len(hidden) for s, c in zip(names, counts)})
    assert meta["base_rate"]["fashion-mnist"] == pytest.approx(10 / len(world_slice))
    sha = {hashlib.sha256(world_slice.image_bytes(i)).hexdigest() for i in range(len(world_slice))}
    assert meta["distinct_images"] == len(sha) == len(world_slice)


def test_distinct_drops_copies_of_an_image(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    for name, colour in (("red", (255, 0, 0)), ("red_again", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (16, 16), colour).save(web / f"{name}.png")
    kept = build_corpus(tmp_path / "d", CorpusSpec(web_dir=str(web), distinct=True), progress=False)
    assert len(kept) == 2 and kept.meta["duplicates_dropped"] == 1 and kept.meta["distinct_images"] == 2
    assert len(build_corpus(tmp_path / "all", CorpusSpec(web_dir=str(web)), progress=False)) == 3


def test_the_first_web_keeps_its_readable_keys(tmp_path):
    """Benchmarks committed on the first web (preset fashion-web) rebuild it byte for byte: its keys
    stay as they were."""
    spec = dataclasses.replace(CORPUS_PRESETS["fashion-web"], limit_per_source=3)
    keys = build_corpus(tmp_path, spec, progress=False).keys
    assert [k.split("-")[0] for k in keys] == ["fmnist"] * 3 + ["clip"] * 3 + ["mnist"] * 3


def test_a_config_names_a_preset_built_on_first_use(tmp_path, monkeypatch, capsys):
    from explorer.run.config import load_config

    assert load_config("configs/world.yaml").corpus == "world"
    assert load_config("configs/science.yaml").corpus == "fashion-web"  # where its committed results come from
    monkeypatch.setenv("EXPLORER_HOME", str(tmp_path))
    assert corpus_location("world") == (tmp_path / "corpus" / "world", "world")
    assert corpus_location(None) == (tmp_path / "corpus" / "world", "world")  # the default web is the world
    assert corpus_location("fashion-web") == (tmp_path / "corpus" / "fashion-web", "fashion-web")
    assert corpus_location(str(tmp_path / "mine")) == (tmp_path / "mine", None)
    small = dataclasses.replace(CORPUS_PRESETS["world"], limit_per_source=4)
    monkeypatch.setitem(CORPUS_PRESETS, "world", small)  # the preset's path, at a test's size
    corpus = open_image_corpus("world", progress=True)
    kinds = {"mnist" if s == "mnist-web" else s for s in WORLD_SOURCES}
    assert corpus.root == tmp_path / "corpus" / "world" and set(corpus.hidden["source"]) == kinds
    assert "building the 'world' corpus" in capsys.readouterr().out
    assert open_image_corpus("world").keys == corpus.keys  # opened, not rebuilt
    monkeypatch.setitem(CORPUS_PRESETS, "world", dataclasses.replace(small, limit_per_source=5))
    with pytest.warns(UserWarning, match="earlier version of the preset: rebuilding"):
        rebuilt = open_image_corpus("world")  # the preset changed since: built again, not opened stale
    assert len(rebuilt) > len(corpus) and rebuilt.meta["spec"]["limit_per_source"] == 5
    with pytest.raises(FileNotFoundError, match=r"'wrld' is neither a preset \(world, fashion-web\)"):
        open_image_corpus("wrld")


def test_the_mnist_target_and_the_world_webs_digits_are_disjoint_halves(world_slice):
    from explorer.score.target import TargetConfig, load_target
    from explorer.web.sources import load_mnist_5k, mnist_split

    web_rows, target_rows = mnist_split()
    assert len(web_rows) == len(target_rows) == 2500 and not set(web_rows) & set(target_rows)
    target = load_target(TargetConfig(name="mnist", acquire_size=100, probe_train_size=1000))
    assert len(target.images) == 2500 and target.class_names == tuple("0123456789")
    assert {k: len(v) for k, v in target.split.items()} == {"acquire": 100, "probe_train": 1000, "probe_test": 1400}
    gray, labels = load_mnist_5k()
    assert np.array_equal(target.labels, labels[target_rows])
    web = set(hashlib.sha256(gray[i].tobytes()).digest() for i in web_rows)
    assert not any(hashlib.sha256(gray[i].tobytes()).digest() in web for i in target_rows)  # no image in both
    digits = np.flatnonzero(world_slice.hidden["source"] == "mnist")
    assert len(digits) == 25
    for i in digits:  # the world's digits are drawn from the web half only
        with Image.open(io.BytesIO(world_slice.image_bytes(int(i)))) as im:
            assert hashlib.sha256(np.asarray(im.convert("L")).tobytes()).digest() in web


def test_the_second_targets_config_reads_the_webs_digits_as_its_kind(world_slice):
    from explorer.run.config import load_config
    from explorer.run.image import ground_truth

    cfg = load_config("configs/world-mnist.yaml")
    assert (cfg.corpus, cfg.target.name, cfg.target.relevant) == ("world", "mnist", None)
    truth = ground_truth(cfg, world_slice)
    relevant = np.array([truth.is_relevant(i) for i in range(len(world_slice))])
    assert np.array_equal(relevant, world_slice.hidden["source"] == "mnist")  # clothing is a distractor here


def test_cli_build_prints_composition_and_base_rate(tmp_path, capsys):
    from explorer.cli import main

    assert main(["corpus", "build", "--preset", "world", "--limit-per-source", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fashion-mnist\s+3\s+\d+\.\d%", out) and "wesnoth" in out
    assert re.search(r"base rate: \d+\.\d% of the web is the fashion-mnist target's kind", out)
    assert re.search(r"base rate: \d+\.\d% of the web is the mnist target's kind", out)


def test_processes_that_start_together_build_a_preset_once(tmp_path, monkeypatch):
    import threading
    import time

    from explorer.web import presets

    monkeypatch.setenv("EXPLORER_HOME", str(tmp_path))
    monkeypatch.setitem(CORPUS_PRESETS, "world", dataclasses.replace(CORPUS_PRESETS["world"], limit_per_source=2))
    builds = []

    def slow_build(*args, **kwargs):  # the real build, held open long enough for the others to arrive
        builds.append(1)
        time.sleep(0.5)
        return build_corpus(*args, **kwargs)

    monkeypatch.setattr(presets, "build_corpus", slow_build)
    opened = [None] * 3

    def open_it(i):
        opened[i] = open_image_corpus("world")

    threads = [threading.Thread(target=open_it, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1  # (each open holds its own lock file description, as separate processes do)
    assert all(c is not None and c.keys == opened[0].keys for c in opened)
