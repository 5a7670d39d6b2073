"""Where accepted images live: written once to disk, read back by index, never all held in memory.

`ShardStore(folder, side)` keeps a run's accepted images as append-only webdataset tar shards:

    acquired/shard-000000.tar   full shards (closed with the tar end-of-archive blocks)
    acquired/shard-000001.tar   the shard being appended to
    acquired/index.jsonl        the manifest: one line per committed item, in the order accepted

Each item is two tar members, `<sha256>.npy` (the decoded uint8 (3, S, S) image, numpy's .npy
format) and `<sha256>.json` (url, queries, reward, iteration ...), so any webdataset reader
(`webdataset.WebDataset(path).decode()`) or `tar` reads the shards as they are. Keys are the
sha256 of the fetched body (content-addressed; an item is never stored twice).

An `append` is a commit: the members are written and fsynced, then the manifest lines are
written and fsynced. Only items in the manifest are ever read (by the offset it records), so a
tail written by a process killed mid-append is never seen; opening the store cuts every shard back
to the end of its last committed item. `truncate(n)` drops everything after the first n items
(a resume goes back to the position its checkpoint recorded; that position, not the manifest,
decides what counts, so a kill between two manifest lines of one append leaves nothing half-used). The checkpoint holds that position,
not the images: its size does not grow with what was acquired.

`MemoryStore` is the same interface in memory, for mixtures that belong to no run folder (tests,
baselines, base pretraining); its state holds the images.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from learners.checkpoint import fsync_dir

INDEX = "index.jsonl"
SHARD_BYTES = 256 << 20  # a shard is closed once it holds this many bytes
BLOCK = tarfile.BLOCKSIZE


def _check_images(images: torch.Tensor, side: int) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (side, side):
        raise ValueError(f"expected uint8 (N, 3, {side}, {side}) images, got {images.dtype} {tuple(images.shape)}")


class MemoryStore:
    """Accepted images in one in-memory tensor (no run folder). Items are numbered 0, 1, ...; `batches`
    holds the number of items of each `append`, the order in which the mixture admitted them (the
    records are not kept: nothing outside a run folder reads them)."""

    persistent = False

    def __init__(self, side: int):
        self.side = side
        self.images = torch.empty(0, 3, side, side, dtype=torch.uint8)
        self.batches: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def append(self, images: torch.Tensor, records: list[dict] | None = None) -> torch.Tensor:
        _check_images(images, self.side)
        first = len(self.images)
        self.images = torch.cat([self.images, images.cpu()])
        self.batches.append(len(images))
        return torch.arange(first, len(self.images))

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        return self.images[ids]

    def truncate(self, n: int) -> None:
        self.images = self.images[:n]
        self.batches = cut_batches(self.batches, n)

    def state_dict(self) -> dict:
        return {"images": self.images, "batches": list(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        _check_images(state["images"], self.side)
        self.images, self.batches = state["images"], list(state["batches"])


def cut_batches(batches: list[int], n: int) -> list[int]:
    """The append sizes of the first n items."""
    out, total = [], 0
    for size in batches:
        if total >= n:
            break
        out.append(min(size, n - total))
        total += out[-1]
    return out


def _member(name: str, data: bytes) -> bytes:
    """One tar member: header block, data, padding to a whole block (tarfile's own header)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: a shard's bytes depend on its items only
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % BLOCK)


def _npy_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image, allow_pickle=False)
    return buffer.getvalue()


class ShardStore:
    """Accepted images in append-only tar shards under `folder` (see the module docstring)."""

    persistent = True

    def __init__(self, folder: str | Path, side: int, shard_bytes: int = SHARD_BYTES, *, readonly: bool = False):
        """`readonly`: a reader beside a running writer (inspection, tests); it reads the committed
        items and never cuts or writes anything."""
        self.folder, self.side, self.shard_bytes, self.readonly = Path(folder), side, shard_bytes, readonly
        if not readonly:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.keys: list[str] = []
        self.batches: list[int] = []
        self._shard = np.zeros(0, np.int32)   # per item: shard number
        self._offset = np.zeros(0, np.int64)  # per item: byte offset of its .npy data in the shard
        self._size = np.zeros(0, np.int64)    # per item: .npy byte length
        self._end = np.zeros(0, np.int64)     # per item: end of its last member (where the next one starts)
        self._closed: set[int] = set()        # shards that hold their end-of-archive blocks
        self._files: dict[int, object] = {}
        self._load_index()
        if not readonly:
            self._cut_tails()

    # ------------------------------------------------------------------ layout
    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.tar"

    def _shard_numbers(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("shard-*.tar"))

    def __len__(self) -> int:
        return len(self.keys)

    def _load_index(self) -> None:
        path = self.folder / INDEX
        lines = path.read_text().splitlines() if path.exists() else []
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line torn by a kill mid-write can only be the last one
                break
        self.keys = [r["key"] for r in rows]
        self._shard = np.array([r["shard"] for r in rows], np.int32)
        self._offset = np.array([r["offset"] for r in rows], np.int64)
        self._size = np.array([r["size"] for r in rows], np.int64)
        self._end = np.array([r["end"] for r in rows], np.int64)
        self.batches = []
        for r in rows:
            if r["first"]:
                self.batches.append(0)
            self.batches[-1] += 1
        self._closed = set(range(int(self._shard[-1]))) if len(rows) else set()  # all but the last
        if len(rows) != len(lines) and not self.readonly:  # drop the torn line for good
            self._write_index(self._rows(0, len(rows)))

    def _rows(self, start: int, stop: int) -> list[dict]:
        firsts = set(np.cumsum([0, *self.batches]).tolist())
        return [{"key": self.keys[i], "shard": int(self._shard[i]), "offset": int(self._offset[i]),
                 "size": int(self._size[i]), "end": int(self._end[i]), "first": i in firsts}
                for i in range(start, stop)]

    def _write_index(self, rows: list[dict]) -> None:
        """Replace the manifest atomically (a temp file renamed over it)."""
        path, tmp = self.folder / INDEX, self.folder / (INDEX + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_dir(self.folder)

    def _cut_tails(self) -> None:
        """Shards end where their last committed item ends; shards with no committed item go."""
        self._close_files()
        last = {int(s): int(e) for s, e in zip(self._shard, self._end)}  # later items overwrite earlier
        for shard in self._shard_numbers():
            path = self.shard_path(shard)
            if shard not in last:
                path.unlink()
            elif shard not in self._closed and path.stat().st_size != last[shard]:
                os.truncate(path, last[shard])
        fsync_dir(self.folder)

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    # ------------------------------------------------------------------ write
    def append(self, images: torch.Tensor, records: list[dict] | None = None) -> torch.Tensor:
        """Write `images` (uint8 (N, 3, S, S)) with their `records` (JSON-able dicts with a
        `sha256`, the item's key) as one committed batch; returns their item numbers."""
        _check_images(images, self.side)
        self._check_writable()
        records = records or [{"sha256": f"item-{len(self) + i:09d}"} for i in range(len(images))]
        if len(records) != len(images):
            raise ValueError(f"{len(images)} images but {len(records)} records")
        first = len(self)
        if not len(images):
            return torch.arange(first, first)
        shard = int(self._shard[-1]) if len(self) else 0
        position = int(self._end[-1]) if len(self) else 0
        if position >= self.shard_bytes:  # full: end it and start the next one
            self._close_shard(shard, position)
            shard, position = shard + 1, 0
        chunks, rows = [], []
        for image, record in zip(images.numpy(), records):
            key = record["sha256"]
            npy, meta = _npy_bytes(image), json.dumps(record, sort_keys=True).encode()
            member = _member(f"{key}.npy", npy)
            rows.append({"key": key, "shard": shard, "offset": position + BLOCK, "size": len(npy),
                         "end": position + len(member) + len(_member(f"{key}.json", meta)), "first": not rows})
            chunks.append(member + _member(f"{key}.json", meta))
            position = rows[-1]["end"]
        data = b"".join(chunks)
        path = self.shard_path(shard)
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(rows[0]["offset"] - BLOCK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(self.folder / INDEX, "a") as f:  # the commit: only indexed items exist
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            os.fsync(f.fileno())
        self._extend(rows)
        return torch.arange(first, len(self))

    def _extend(self, rows: list[dict]) -> None:
        self.keys += [r["key"] for r in rows]
        self._shard = np.concatenate([self._shard, [r["shard"] for r in rows]]).astype(np.int32)
        self._offset = np.concatenate([self._offset, [r["offset"] for r in rows]]).astype(np.int64)
        self._size = np.concatenate([self._size, [r["size"] for r in rows]]).astype(np.int64)
        self._end = np.concatenate([self._end, [r["end"] for r in rows]]).astype(np.int64)
        self.batches.append(len(rows))

    def _close_shard(self, shard: int, end: int) -> None:
        """End a full shard with the tar end-of-archive blocks; the next append starts a new one."""
        with open(self.shard_path(shard), "r+b") as f:
            f.seek(end)
            f.write(b"\0" * (2 * BLOCK))
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        self._closed.add(shard)

    def truncate(self, n: int) -> None:
        """Keep only the first n items (a resume goes back to its checkpoint's position)."""
        if n >= len(self):
            return
        self._check_writable()
        rows = self._rows(0, n)
        self._write_index(rows)  # first: a kill after this leaves tails that opening cuts
        self.keys = self.keys[:n]
        self._shard, self._offset = self._shard[:n], self._offset[:n]
        self._size, self._end = self._size[:n], self._end[:n]
        self.batches = cut_batches(self.batches, n)
        self._closed = set(range(int(self._shard[-1]))) if n else set()
        self._cut_tails()

    def __getstate__(self) -> dict:
        """A copy sent to another process (a DataLoader worker) reads only: no open files, and never
        a second writer of the same shards."""
        state = dict(self.__dict__)
        state["_files"], state["readonly"] = {}, True
        return state

    def _check_writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"{self.folder} was opened read-only")

    # ------------------------------------------------------------------ read
    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = open(self.shard_path(shard), "rb")
        return self._files[shard]

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """uint8 (len(ids), 3, S, S): the committed items `ids`, read by their recorded offsets."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).numpy()
        out = np.empty((len(ids), 3, self.side, self.side), np.uint8)
        for row, i in enumerate(ids):
            if not 0 <= i < len(self):
                raise IndexError(f"item {i} is not in the store ({len(self)} committed)")
            data = os.pread(self._file(int(self._shard[i])).fileno(), int(self._size[i]), int(self._offset[i]))
            out[row] = np.load(io.BytesIO(data), allow_pickle=False)
        return torch.from_numpy(out)

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The position only: the items themselves are on disk."""
        return {"items": len(self), "batches": len(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        if "items" not in state:
            raise ValueError("this state keeps its accepted images in memory (a mixture outside a run folder), "
                             "not a position in shards")
        n = int(state["items"])
        if n > len(self):
            raise ValueError(f"the checkpoint counts {n} accepted items but {self.folder} holds only {len(self)}: "
                             "the shards were deleted or belong to another run")
        self.truncate(n)

    def close(self) -> None:
        self._close_files()
