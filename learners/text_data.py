"""Packed fixed-length token sequences for causal-LM training, with a resumable cursor.

Documents are concatenated with an EOS token after each one and cut into windows of `seq_len + 1`
tokens; consecutive windows overlap by one token so that every token is a target exactly once.
Each epoch packs the documents in a fresh seeded order; the tail of one epoch that does not fill a
window carries over into the next, so no token is dropped. `add_documents` appends new documents to
the current epoch (continual training as data arrives) and to every later one.

`state_dict()` holds the documents and the cursor (epoch, order, carried tail, offset), like
torchtitan's Stateful dataloader: a stream restored from it yields the same batches.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch


class PackedTextStream:
    def __init__(self, documents: Iterable[Sequence[int]] = (), *, seq_len: int, eos_id: int,
                 seed: int = 0, shuffle: bool = True):
        if seq_len < 1 or eos_id < 0:
            raise ValueError(f"seq_len must be >= 1 and eos_id >= 0, got {seq_len}, {eos_id}")
        self.seq_len, self.eos_id, self.seed, self.shuffle = seq_len, eos_id, seed, shuffle
        self._docs: list[np.ndarray] = []
        self.epoch = 0
        self._order: list[int] = []  # documents packed into this epoch, in order
        self._carry = np.zeros(0, dtype=np.int64)  # previous epoch's unused tail
        self._buffer = np.zeros(0, dtype=np.int64)  # carry + this epoch's packed tokens
        self._offset = 0  # start of the next window in `_buffer`
        self.batches_served = 0
        self.add_documents(documents)
        self._order = self._epoch_order(0)  # the first epoch is shuffled too
        self._buffer = self._pack(self._order)

    @property
    def num_documents(self) -> int:
        return len(self._docs)

    @property
    def num_tokens(self) -> int:
        """Tokens per epoch, EOS included."""
        return sum(len(d) + 1 for d in self._docs)

    def add_documents(self, token_lists: Iterable[Sequence[int]]) -> None:
        """Append documents to the corpus; the current epoch sees them after what it already holds."""
        start = len(self._docs)
        for tokens in token_lists:
            self._docs.append(np.asarray(tokens, dtype=np.int64).reshape(-1))
        added = list(range(start, len(self._docs)))
        if added:
            self._order.extend(added)
            self._buffer = np.concatenate([self._buffer, self._pack(added)])

    def _pack(self, indices: Sequence[int]) -> np.ndarray:
        eos = np.array([self.eos_id], dtype=np.int64)
        parts = [part for i in indices for part in (self._docs[i], eos)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self._docs)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._docs)).tolist()

    def _start_epoch(self) -> None:
        self._carry = self._buffer[self._offset:]
        self.epoch += 1
        self._order = self._epoch_order(self.epoch)
        self._buffer = np.concatenate([self._carry, self._pack(self._order)])
        self._offset = 0

    def _next_window(self) -> np.ndarray:
        width = self.seq_len + 1
        if self._offset + width > len(self._buffer):
            if self.num_tokens + len(self._buffer) - self._offset < width:
                raise ValueError(f"{self.num_tokens} tokens cannot fill one window of {width}")
            self._start_epoch()
        window = self._buffer[self._offset:self._offset + width]
        self._offset += self.seq_len  # one-token overlap: the last target is the next first input
        return window

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """(B, seq_len + 1) int64: inputs are [:, :-1], next-token targets [:, 1:]."""
        if not self._docs:
            raise ValueError("the stream holds no documents")
        windows = [self._next_window() for _ in range(batch_size)]
        self.batches_served += 1
        return torch.from_numpy(np.stack(windows))

    def state_dict(self) -> dict[str, Any]:
        lengths = [len(d) for d in self._docs]
        flat = np.concatenate(self._docs) if self._docs else np.zeros(0, dtype=np.int64)
        return {
            "seq_len": self.seq_len, "eos_id": self.eos_id, "seed": self.seed, "shuffle": self.shuffle,
            "tokens": torch.from_numpy(flat.astype(np.int32)),  # all documents, concatenated
            "lengths": torch.tensor(lengths, dtype=torch.int64),
            "epoch": self.epoch, "order": torch.tensor(self._order, dtype=torch.int64),
            "carry": torch.from_numpy(self._carry.copy()), "offset": self._offset,
            "batches_served": self.batches_served,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seq_len"], state["eos_id"]) != (self.seq_len, self.eos_id):
            raise ValueError(f"state for seq_len={state['seq_len']}, eos_id={state['eos_id']} does not "
                             f"fit a stream with seq_len={self.seq_len}, eos_id={self.eos_id}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        flat = state["tokens"].numpy().astype(np.int64)
        bounds = np.cumsum([0] + state["lengths"].tolist())
        self._docs = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.epoch = int(state["epoch"])
        self._order = state["order"].tolist()
        self._carry = state["carry"].numpy().astype(np.int64)
        self._buffer = np.concatenate([self._carry, self._pack(self._order)])
        self._offset = int(state["offset"])
        self.batches_served = int(state["batches_served"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PackedTextStream":
        stream = cls(seq_len=int(state["seq_len"]), eos_id=int(state["eos_id"]))
        stream.load_state_dict(state)
        return stream
