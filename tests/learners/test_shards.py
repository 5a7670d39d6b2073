"""The on-disk store of accepted images: webdataset-readable, crash-safe, and a mixture over it that
checkpoints a position, not images."""

import io
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from learners.mixture import MixtureConfig, TrainingMixture
from learners.shards import INDEX, ShardStore


def _images(n, start=0, side=4):
    """n distinct images: the id start..start+n-1 written in two pixels, the rest random."""
    generator = torch.Generator().manual_seed(start)
    images = torch.randint(0, 255, (n, 3, side, side), dtype=torch.uint8, generator=generator)
    ids = torch.arange(start, start + n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids // 256, ids % 256
    return images


def _records(n, start=0):
    return [{"sha256": f"{start + i:064x}", "url": f"http://x/{start + i}.png"} for i in range(n)]


def _fill(store, batches, size):
    for b in range(batches):
        store.append(_images(size, b * size), _records(size, b * size))


def test_items_read_back_by_offset_and_shards_roll_over(tmp_path):
    store = ShardStore(tmp_path, 4, shard_bytes=8 << 10)
    _fill(store, 5, 7)
    assert len(store) == 35 and store.batches == [7] * 5
    assert len(list(tmp_path.glob("shard-*.tar"))) > 1
    ids = torch.tensor([34, 0, 17, 17])
    assert torch.equal(store.read(ids), torch.cat([_images(7, b * 7) for b in range(5)])[ids])
    with pytest.raises(IndexError, match="not in the store"):
        store.read(torch.tensor([35]))


def test_shards_are_webdataset_tars(tmp_path):
    store = ShardStore(tmp_path, 4, shard_bytes=8 << 10)
    _fill(store, 3, 10)
    samples = [s for p in sorted(tmp_path.glob("shard-*.tar"))
               for s in wds.WebDataset(str(p), shardshuffle=False).decode()]
    expected = torch.cat([_images(10, b * 10) for b in range(3)])
    assert [s["__key__"] for s in samples] == [r["sha256"] for r in _records(30)]
    assert all(np.array_equal(s["npy"], expected[i].numpy()) for i, s in enumerate(samples))
    assert samples[3]["json"]["url"] == "http://x/3.png"


def test_a_torn_append_is_dropped_on_open(tmp_path):
    """A process killed mid-append leaves bytes after the last committed item and maybe half a
    manifest line: reopening cuts both, and the next append lands where the committed ones end."""
    store = ShardStore(tmp_path, 4)
    _fill(store, 2, 5)
    shard = store.shard_path(0)
    committed = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(os.urandom(3000))
    with open(tmp_path / INDEX, "a") as f:
        f.write('{"key": "torn", "sha')
    reopened = ShardStore(tmp_path, 4)
    assert len(reopened) == 10 and shard.stat().st_size == committed
    assert len((tmp_path / INDEX).read_text().splitlines()) == 10
    reopened.append(_images(5, 10), _records(5, 10))
    assert torch.equal(ShardStore(tmp_path, 4).read(torch.arange(15)), torch.cat([_images(5, b * 5) for b in range(3)]))


def test_a_readonly_reader_beside_a_writer_cuts_nothing(tmp_path):
    """A reader opened while a writer is mid-append (bytes past the last committed item) reads the
    committed items and leaves the writer's tail alone; it cannot write."""
    store = ShardStore(tmp_path, 4)
    _fill(store, 1, 5)
    with open(store.shard_path(0), "ab") as f:
        f.write(b"\0" * 1024)  # the writer's uncommitted tail
    size = store.shard_path(0).stat().st_size
    reader = ShardStore(tmp_path, 4, readonly=True)
    assert len(reader) == 5 and torch.equal(reader.read(torch.arange(5)), _images(5))
    assert store.shard_path(0).stat().st_size == size
    with pytest.raises(PermissionError, match="read-only"):
        reader.append(_images(1, 5), _records(1, 5))


def test_truncate_goes_back_to_a_position(tmp_path):
    store = ShardStore(tmp_path, 4, shard_bytes=8 << 10)
    _fill(store, 4, 6)
    store.truncate(9)
    assert len(store) == 9 and store.batches == [6, 3]
    reopened = ShardStore(tmp_path, 4, shard_bytes=8 << 10)
    assert len(reopened) == 9 and torch.equal(reopened.read(torch.arange(9)), torch.cat([_images(6), _images(3, 6)]))
    assert sum(1 for p in sorted(tmp_path.glob("shard-*.tar")) for _ in wds.WebDataset(str(p), shardshuffle=False)) == 9
    with pytest.raises(ValueError, match="holds only 9"):
        reopened.load_state_dict({"items": 12, "batches": 3})


def _shard_mixture(folder, capacity=16):
    target = _images(40, 10_000)
    return TrainingMixture(target, MixtureConfig(capacity=capacity, seed=5), store=ShardStore(folder, 4))


def test_a_shard_mixture_checkpoints_a_position_and_resumes_identically(tmp_path):
    mixture = _shard_mixture(tmp_path)
    sizes = []
    for b in range(6):  # past capacity: the reservoir's draws decide the pool
        mixture.add_accepted(_images(7, b * 7), _records(7, b * 7))
        buffer = io.BytesIO()
        torch.save(mixture.state_dict(), buffer)
        sizes.append(len(buffer.getvalue()))
    state = mixture.state_dict()
    assert max(sizes) - min(sizes) < 64, sizes  # a position, not images: flat while 42 images came in
    mixture.add_accepted(_images(5, 100), _records(5, 100))  # after the checkpoint: void on resume

    resumed = _shard_mixture(tmp_path)
    resumed.load_state_dict(state)
    assert len(resumed.store) == 42  # the item added after the checkpoint is gone
    uninterrupted = TrainingMixture(_images(40, 10_000), MixtureConfig(capacity=16, seed=5))
    for b in range(6):
        uninterrupted.add_accepted(_images(7, b * 7))
    assert torch.equal(resumed.pool, uninterrupted.pool)
    for m in (resumed, uninterrupted):
        m.add_accepted(_images(9, 200), _records(9, 200))
    assert torch.equal(resumed.acquired, uninterrupted.acquired)
    assert torch.equal(resumed.sample(8, torch.Generator().manual_seed(2)),
                       uninterrupted.sample(8, torch.Generator().manual_seed(2)))


def test_a_mixture_refuses_a_checkpoint_of_another_target(tmp_path):
    mixture = _shard_mixture(tmp_path / "a")
    mixture.add_accepted(_images(3), _records(3))
    other = TrainingMixture(_images(40, 20_000), MixtureConfig(capacity=16, seed=5),
                            store=ShardStore(tmp_path / "a", 4))
    with pytest.raises(ValueError, match="another target"):
        other.load_state_dict(mixture.state_dict())
