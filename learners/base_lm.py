"""A base LM: pretrained once on general text, the start of every text run that names it.

A run from scratch on a small target (a few hundred documents, tens of thousands of tokens) learns
less than counting: the LM ends above the count bigram of the target's own tokens (BENCHMARKS.md
6b, 6c). The practice this follows instead is domain-adaptive continued training: a base model
trained on general text, then trained on the target and what the agent acquires for it, with the
base's tokenizer. `ensure_base_lm` builds such a base once per `BaseLMSpec` and keeps it on disk:

    HOME/CORPUS-vVOCAB.tokenizer.model    the base corpus's SentencePiece model (every size and seed)
    HOME/CORPUS-vVOCAB.tokens.npz         the corpus encoded with it (every build, and the runs' count
                                          bigram of the corpus, read it instead of encoding again)
    HOME/KEY/lm.pt                        {"config": LMConfig, "model": weights}
    HOME/KEY/base.json                    the spec, tokens, FLOPs, final loss and seconds; written last

A folder is built under a temporary name and renamed into place when complete, under a file lock,
so processes that need the same base at once train it once and a killed build leaves nothing a
later run would read. The base's pretraining FLOPs are a sunk cost, like a downloaded model's:
the run records them (`base_flops`) but does not charge them to its budget.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learners.checkpoint import atomic_torch_save, fsync_dir
from learners.flops import training_flops
from learners.lm import LMConfig, LMLearner, non_embedding_params
from learners.text_data import PackedTextStream
from learners.tokenizer import TextTokenizer, TokenizerConfig, train_tokenizer


@dataclass(frozen=True)
class BaseLMSpec:
    """What a base is: its corpus (a name the caller maps to texts), shape, tokenizer and recipe."""

    corpus: str
    size: str = "nano"
    vocab_size: int = 1024
    steps: int = 2000
    lr: float = 3e-3       # cosine to lr / 10 after a 5% warm-up (BENCHMARKS.md 10b's recipe)
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if not self.corpus or "/" in self.corpus:
            raise ValueError(f"a base corpus needs a plain name, got {self.corpus!r}")
        if min(self.vocab_size, self.steps, self.seq_len, self.batch_size) < 1 or not self.lr > 0:
            raise ValueError(f"vocab_size, steps, seq_len, batch_size and lr must be > 0: {self}")

    @property
    def key(self) -> str:
        return (f"{self.corpus}-{self.size}-v{self.vocab_size}-{self.steps}steps-lr{self.lr:g}"
                f"-T{self.seq_len}-B{self.batch_size}-seed{self.seed}")

    @property
    def tokenizer_name(self) -> str:
        return f"{self.corpus}-v{self.vocab_size}.tokenizer.model"


@dataclass
class BaseLM:
    """A finished base: its tokenizer, its record (base.json) and its weights, read on demand."""

    spec: BaseLMSpec
    root: Path
    tokenizer: TextTokenizer
    record: dict

    def weights(self) -> dict[str, torch.Tensor]:
        return torch.load(self.root / "lm.pt", map_location="cpu", weights_only=True)["model"]


@dataclass
class _Lock:
    path: Path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)  # waits while another process builds the same thing
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def base_tokenizer(spec: BaseLMSpec, texts: Callable[[], Sequence[str]], home: Path) -> TextTokenizer:
    """The base corpus's tokenizer (trained once, shared by every size and seed of that corpus)."""
    path = Path(home) / spec.tokenizer_name
    with _Lock(path.with_suffix(".lock")):
        if path.exists():
            return TextTokenizer.load(path)
        tokenizer = train_tokenizer(texts(), TokenizerConfig(vocab_size=spec.vocab_size))
        tokenizer.save(path)
        return tokenizer


def corpus_tokens(spec: BaseLMSpec, texts: Callable[[], Sequence[str]], home: Path | str,
                  tokenizer: TextTokenizer) -> list[np.ndarray]:
    """The base corpus's documents as token arrays under its tokenizer, encoded once and kept."""
    path = Path(home) / f"{spec.corpus}-v{spec.vocab_size}.tokens.npz"
    with _Lock(path.with_suffix(".lock")):
        if not path.exists():
            for stale in path.parent.glob(f".{path.name}.partial-*"):  # writes killed before their rename
                stale.unlink()
            docs = tokenizer.encode_batch(texts())
            tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.npz")
            np.savez(tmp, tokens=np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]),
                     lengths=np.array([len(d) for d in docs], dtype=np.int64))
            os.replace(tmp, path)
        with np.load(path) as data:
            tokens, lengths = data["tokens"], data["lengths"]
    return np.split(tokens, np.cumsum(lengths)[:-1])


def ensure_base_lm(spec: BaseLMSpec, texts: Callable[[], Sequence[str]], home: Path | str, *,
                   progress: bool = False, log: Callable[[str], None] = print) -> BaseLM:
    """The base of `spec`, trained on `texts()` the first time any process asks for it."""
    home = Path(home)
    root = home / spec.key
    tokenizer = base_tokenizer(spec, texts, home)
    with _Lock(home / f"{spec.key}.lock"):
        if not (root / "base.json").exists():
            if root.exists():  # a folder without its record is not a base (renamed only when complete)
                shutil.rmtree(root)
            for stale in home.glob(f".{spec.key}.partial-*"):  # builds killed before their rename
                shutil.rmtree(stale, ignore_errors=True)
            log(f"training the base LM {spec.key} (once; kept in {home})")
            _build(spec, corpus_tokens(spec, texts, home, tokenizer), tokenizer, root, progress)
    return BaseLM(spec, root, tokenizer, json.loads((root / "base.json").read_text()))


def _build(spec: BaseLMSpec, tokens: list[np.ndarray], tokenizer: TextTokenizer, root: Path,
           progress: bool) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"the base LM {spec.key} is not built yet, and a torchrun rank cannot build it alone: "
                           "start the same config once in one process (it builds the base and keeps it), "
                           "then launch torchrun")
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    t0 = time.time()
    stream = PackedTextStream(tokens, seq_len=spec.seq_len, eos_id=tokenizer.eos_id, seed=spec.seed)
    config = LMConfig(size=spec.size, vocab_size=tokenizer.vocab_size, seq_len=spec.seq_len,
                      batch_size=spec.batch_size, lr=spec.lr, min_lr=spec.lr / 10,
                      warmup=max(1, spec.steps // 20), total_steps=spec.steps, seed=spec.seed)
    learner = LMLearner(config)
    losses = learner.train_steps(stream, spec.steps, progress=progress)
    learner.model.to("cpu")
    atomic_torch_save({"config": dataclasses.asdict(config), "model": learner.model.state_dict()}, partial / "lm.pt")
    tail = [x for x in losses[-max(1, spec.steps // 20):] if math.isfinite(x)]
    n_tokens, n_params = spec.steps * spec.batch_size * spec.seq_len, non_embedding_params(learner.model)
    corpus = int(sum(map(len, tokens)))
    record = {"spec": dataclasses.asdict(spec), "key": spec.key, "documents": len(tokens),
              "corpus_tokens": corpus, "tokens_trained": n_tokens,
              "passes": round(n_tokens / max(1, corpus + len(tokens)), 3),
              "non_embedding_params": n_params, "flops": float(training_flops(n_params, n_tokens)),
              "final_train_loss": round(float(np.mean(tail)), 6) if tail else None,
              "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}
    (partial / "base.json").write_text(json.dumps(record, indent=1) + "\n")
    fsync_dir(partial)
    os.replace(partial, root)
    fsync_dir(root.parent)
