"""`explorer sweep`: an isoFLOP sweep of the LM (on the GPU when there is one), and the scaling law
fitted to it.

For every compute budget C and model size N in the config, a fresh LM trains on D = C / (6·N) tokens
of Wikipedia-lead text (every lead except the held-out target documents) and is evaluated on the
held-out target documents. Each finished run is one JSON line in RUN_DIR/sweep.jsonl, appended in a
single write, so an interrupted sweep resumes where it stopped. The rows are then fitted two ways
(`learners.budget`): the parametric law L(N, D) = E + A/N^α + B/D^β with bootstrap intervals, and
per-budget isoFLOP parabolas. Outputs in RUN_DIR:

    sweep_config.yaml  the resolved config        tokenizer.model   trained once per sweep
    sweep.jsonl        one row per finished run   fit.json          law, intervals, N_opt(C), D_opt(C)
    isoflop.png        loss vs N per budget       law_contours.png  L(N, D) contours, N_opt(C)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from explorer.acquire.cache import atomic_write_bytes
from explorer.run.config import ConfigError, LMRoutingConfig, apply_overrides, from_dict, to_dict
from explorer.web.text_sources import DEFAULT_TARGET_TOPIC, load_wikipedia_leads, split_target_text
from learners.budget import (
    FitConfig,
    LawIntervals,
    ScalingLaw,
    bootstrap_intervals,
    fit_scaling_law,
    isoflop_fit,
)
from learners.flops import ModelShape, non_embedding_params, swiglu_ffn_dim, training_flops
from learners.lm import LM_SIZES, LMConfig, LMShape
from learners.ngram import count_baselines
from learners.routing import routing_stats

ROWS_FILE, FIT_FILE, CONFIG_FILE, TOKENIZER_FILE = "sweep.jsonl", "fit.json", "sweep_config.yaml", "tokenizer.model"
BASELINES_FILE = "baselines.json"  # the count unigram and bigram on the sweep's tokens (learners/ngram.py)
ISOFLOP_PLOT, LAW_PLOT = "isoflop.png", "law_contours.png"
TRAIN_TEXTS = ("all", "target")
MIN_PARAMS = 1_000


@dataclass(kw_only=True, frozen=True)
class SweepConfig:
    name: str = "isoflop"
    budgets: tuple[float, ...] = (3e10, 1e11, 3e11)
    """Training FLOPs per run (6·N·D). YAML reads `1e11` as a string; it is accepted and parsed."""
    sizes: tuple[str | int, ...] = (6_000, 13_000, 27_000, 50_000, 100_000)
    """LM_SIZES names (nano ... large) or non-embedding parameter counts (a LLaMA shape is chosen)."""
    seq_len: int = 128
    batch_size: int = 4
    """Sequences per step; small, so that short runs of the larger models still take ~100 steps."""
    vocab_size: int = 1024
    """SentencePiece BPE vocabulary, trained once per sweep on the training text."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """The cosine decays to lr · min_lr_ratio at the run's last step."""
    warmup_fraction: float = 0.05
    min_steps: int = 10
    """Every (budget, size) pair must give at least this many optimizer steps."""
    topic: str = DEFAULT_TARGET_TOPIC
    holdout_fraction: float = 0.2
    train_text: str = "all"
    """all: every lead but the held-out target documents; target: the target topic's train split only."""
    max_train_docs: int | None = None
    """Cap on training documents (a seeded sample), for quick sweeps."""
    eval_tokens: int = 32_768
    """Held-out target tokens evaluated per run (whole documents, in order, until the cap)."""
    seed: int = 0
    lm: LMRoutingConfig = dataclasses.field(default_factory=LMRoutingConfig)
    """Routing of every LM in the sweep (dense by default); N in the fit is the active parameters."""
    extrapolate_factor: float = 10.0
    """fit.json also gives N_opt and D_opt at this multiple of the largest budget."""
    fit_starts: int = 24
    """L-BFGS starts for the law: the best points of learners.budget's 4,500-point grid."""
    bootstrap_resamples: int = 100
    bootstrap_starts: int = 4
    """L-BFGS starts per bootstrap refit."""
    bootstrap_level: float = 0.8

    def __post_init__(self):
        object.__setattr__(self, "budgets", tuple(_parse_budget(b, i) for i, b in enumerate(self.budgets)))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.budgets or len(set(self.budgets)) != len(self.budgets):
            raise ValueError("budgets must list at least one FLOP budget, without repeats")
        if not self.sizes or len(set(map(str, self.sizes))) != len(self.sizes):
            raise ValueError("sizes must list at least one size, without repeats")
        for i, size in enumerate(self.sizes):
            resolve_size(size, where=f"sizes[{i}]")
        positive = ("seq_len", "batch_size", "lr", "min_steps", "eval_tokens", "fit_starts", "bootstrap_resamples",
                "bootstrap_starts")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        checks = {"vocab_size": self.vocab_size >= 260, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
                  "warmup_fraction": 0 <= self.warmup_fraction < 1, "holdout_fraction": 0 < self.holdout_fraction < 1,
                  "extrapolate_factor": self.extrapolate_factor >= 1, "bootstrap_level": 0 < self.bootstrap_level < 1,
                  "train_text": self.train_text in TRAIN_TEXTS,
                  "max_train_docs": self.max_train_docs is None or self.max_train_docs >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]} = {getattr(self, bad[0])!r} is out of range (vocab_size >= 260, "
                             f"train_text in {TRAIN_TEXTS}, fractions in [0, 1), extrapolate_factor >= 1)")
        self._check_steps()

    def _check_steps(self) -> None:
        for size in self.sizes:
            for budget in self.budgets:
                steps = self.steps_for(budget, resolve_size(size)[1])
                if steps < self.min_steps:
                    raise ValueError(f"budgets/sizes: C={budget:.3g} at size {size} gives {steps} steps of "
                                     f"{self.batch_size}x{self.seq_len} tokens < min_steps={self.min_steps}; "
                                     "raise the budget or shrink the size or batch")

    def steps_for(self, budget: float, shape: LMShape) -> int:
        """Optimizer steps whose tokens D make 6·N·D closest to the budget."""
        n_params = non_embedding_params(_model_shape(shape))
        return round(budget / training_flops(n_params, self.batch_size * self.seq_len))


def _parse_budget(value: Any, index: int) -> float:
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"budgets[{index}] must be a number of FLOPs, got {value!r}") from None
    if not math.isfinite(budget) or budget <= 0 or isinstance(value, bool):
        raise ValueError(f"budgets[{index}] must be a finite FLOP count > 0, got {value!r}")
    return budget


def _model_shape(shape: LMShape) -> ModelShape:
    return ModelShape(d_model=shape.hidden_size, n_layers=shape.num_layers, n_heads=shape.num_heads,
                      ffn_dim=shape.intermediate_size, n_kv_heads=shape.num_kv_heads)


@functools.lru_cache(maxsize=None)
def shape_for_params(n_params: int) -> LMShape:
    """The LLaMA shape (head_dim 16 or 32, width/depth 16-64 or 1-2 layers, SwiGLU 8/3·d) nearest
    `n_params` in log space; among equally near shapes, the one with width/depth nearest 32."""
    best, best_key = None, None
    for d_model in range(16, 1025, 16):
        head_dim = 32 if d_model % 32 == 0 else 16
        for n_layers in range(max(1, d_model // 64), max(2, d_model // 16) + 1):
            shape = ModelShape(d_model=d_model, n_layers=n_layers, n_heads=d_model // head_dim,
                               ffn_dim=swiglu_ffn_dim(d_model, multiple_of=16))
            misfit = round(abs(math.log(shape.non_embedding_params / n_params)), 3)
            key = (misfit, abs(math.log(d_model / n_layers / 32)))
            if best_key is None or key < best_key:
                best, best_key = shape, key
    return LMShape(hidden_size=best.d_model, intermediate_size=best.ffn_dim, num_layers=best.n_layers,
                   num_heads=best.n_heads, num_kv_heads=best.kv_heads, nominal_params=int(n_params))


def resolve_size(size: str | int, where: str = "size") -> tuple[str, LMShape]:
    """(label, shape) for an LM_SIZES name or a parameter count."""
    if isinstance(size, str) and not size.isdigit():
        if size not in LM_SIZES:
            raise ValueError(f"{where}: unknown size {size!r}; give a parameter count or one of {', '.join(LM_SIZES)}")
        return size, LM_SIZES[size]
    if isinstance(size, bool) or int(size) < MIN_PARAMS:
        raise ValueError(f"{where}: a parameter count must be an integer >= {MIN_PARAMS}, got {size!r}")
    return f"{int(size)}", shape_for_params(int(size))


def load_sweep_config(path: str | Path, overrides: dict | None = None) -> SweepConfig:
    """Parse a sweep YAML (with `--set` overrides); unknown keys, wrong types and bad values raise
    ConfigError naming the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"sweep config {path} not found") from e
    apply_overrides(data, overrides)
    try:
        return from_dict(SweepConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


# Fields that change what a finished row means; a run folder refuses a config that differs in them.
RESULT_FIELDS = ("seq_len", "batch_size", "vocab_size", "lr", "min_lr_ratio", "warmup_fraction", "topic",
                 "holdout_fraction", "train_text", "max_train_docs", "eval_tokens", "seed", "lm")


def _claim_run_dir(cfg: SweepConfig, run_dir: Path) -> None:
    """Create RUN_DIR, or check that the config it was swept with agrees on every RESULT_FIELD."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / CONFIG_FILE
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = to_dict(cfg)
        differ = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RESULT_FIELDS if saved.get(k) != now[k]]
        if differ:
            raise ConfigError(f"{run_dir} holds a sweep with other settings ({'; '.join(differ)}); "
                              "use another --out")
    atomic_write_bytes(saved_path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def read_rows(run_dir: Path) -> list[dict]:
    """Finished runs in order; a torn last line (a write cut short by a crash) is ignored."""
    path = Path(run_dir) / ROWS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            rows.append(json.loads(line))
    return rows


def _drop_torn_tail(path: Path) -> None:
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def append_row(run_dir: Path, row: dict) -> None:
    """One os.write of one line on an O_APPEND descriptor, then fsync: rows never interleave."""
    line = (json.dumps(row, allow_nan=False) + "\n").encode()
    fd = os.open(Path(run_dir) / ROWS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_key(budget: float, label: str) -> str:
    return f"{budget:.6g}/{label}"


@dataclass(kw_only=True, frozen=True)
class SweepText:
    """Token ids of the training documents and of the held-out target documents."""

    train: list[list[int]]
    heldout: list[list[int]]
    eos_id: int
    vocab_size: int

    @property
    def train_tokens(self) -> int:
        return sum(len(d) + 1 for d in self.train)


def prepare_text(cfg: SweepConfig, run_dir: Path) -> SweepText:
    """Split the leads, train (or reload) the sweep's tokenizer and encode both sides."""
    from learners.tokenizer import TextTokenizer, TokenizerConfig, train_tokenizer

    target_train, heldout, rest = split_target_text(load_wikipedia_leads(), cfg.topic, cfg.holdout_fraction,
                                                     cfg.seed)
    docs = target_train + rest if cfg.train_text == "all" else target_train
    if cfg.max_train_docs is not None and cfg.max_train_docs < len(docs):
        pick = np.random.default_rng(cfg.seed).choice(len(docs), cfg.max_train_docs, replace=False)
        docs = [docs[i] for i in sorted(pick)]
    texts = [d["extract"] for d in docs]
    tok_path = run_dir / TOKENIZER_FILE
    if tok_path.exists():
        tokenizer = TextTokenizer.load(tok_path)
    else:
        tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=cfg.vocab_size, num_threads=1))
        tokenizer.save(tok_path)
    held, count = [], 0
    for doc in heldout:
        if count >= cfg.eval_tokens:
            break
        held.append(tokenizer.encode(doc["extract"])[: cfg.eval_tokens - count])
        count += len(held[-1]) + 1
    return SweepText(train=tokenizer.encode_batch(texts), heldout=held, eos_id=tokenizer.eos_id,
                     vocab_size=tokenizer.vocab_size)


def train_one(cfg: SweepConfig, budget: float, size: str | int, text: SweepText) -> dict:
    """Train a fresh LM for C / (6N) tokens and evaluate it; the row written to sweep.jsonl."""
    from learners.lm import LMLearner, active_non_embedding_params
    from learners.lm import non_embedding_params as counted_params
    from learners.spikes import SpikeConfig
    from learners.text_data import PackedTextStream

    start = time.perf_counter()
    label, shape = resolve_size(size)
    steps = cfg.steps_for(budget, shape)
    lm_cfg = LMConfig(shape=shape, vocab_size=text.vocab_size, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                      lr=cfg.lr, min_lr=cfg.lr * cfg.min_lr_ratio, warmup=round(cfg.warmup_fraction * steps),
                      total_steps=steps, seed=cfg.seed,
                      spikes=SpikeConfig(enabled=False),  # a rollback would change the run's token count
                      **cfg.lm.lm_kwargs())
    learner = LMLearner(lm_cfg)  # the GPU when there is one
    n_params = active_non_embedding_params(learner.model)  # = all of them when dense
    stream = PackedTextStream(text.train, seq_len=cfg.seq_len, eos_id=text.eos_id, seed=cfg.seed)
    losses = learner.train_steps(stream, steps)
    with routing_stats(learner.model) as stats:  # what the routers did on the held-out text (routed runs)
        loss = math.log(learner.evaluate_perplexity(text.heldout, eos_id=text.eos_id))
    routing = {**stats, **routing_controls(learner, text)} if learner.config.routed else {}
    tokens = steps * cfg.batch_size * cfg.seq_len
    tail = [x for x in losses[-max(1, steps // 10):] if math.isfinite(x)]
    return {"key": run_key(budget, label), "budget_flops": budget, "size": label, "n_params": n_params,
            "n_params_total": counted_params(learner.model),
            "tokens": tokens, "flops": training_flops(n_params, tokens), "loss": loss if math.isfinite(loss) else None,
            "train_loss": float(np.mean(tail)) if tail else None, "steps": steps,
            "d_model": shape.hidden_size, "n_layers": shape.num_layers, "train_tokens": text.train_tokens,
            "seconds": round(time.perf_counter() - start, 2), **routing}


def routing_controls(learner, text: SweepText) -> dict[str, float]:
    """The held-out loss of a routed run under the routing benchmark's sanity protocols
    (learners/routing.py `routing_stats`): hash routers routing by scrambled token ids
    (`loss_scrambled_ids`: the gain must vanish), S-BASE routing by its balanced assignment
    (`loss_balanced_eval`: the assignment it trained with, per evaluation batch)."""
    from learners.routing import HashRouter, SBaseRouter, routed_layers

    routers = [layer.router for layer in routed_layers(learner.model)]
    out = {}
    for key, kind, option in (("loss_scrambled_ids", HashRouter, "scramble_hash"),
                              ("loss_balanced_eval", SBaseRouter, "balanced_eval")):
        if any(isinstance(r, kind) for r in routers):
            with routing_stats(learner.model, **{option: True}):
                out[key] = math.log(learner.evaluate_perplexity(text.heldout, eos_id=text.eos_id))
    return out


@dataclass(kw_only=True, frozen=True)
class SweepResult:
    rows: list[dict]
    fit: dict
    trained: int  # runs trained by this call (the rest were already in sweep.jsonl)
    baselines: dict | None = None  # the count unigram's and bigram's held-out loss (learners/ngram.py)


def run_sweep(cfg: SweepConfig, run_dir: str | Path, *, progress: bool = True) -> SweepResult:
    """Train every (budget, size) run not yet in RUN_DIR/sweep.jsonl, then fit and plot all rows."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    _claim_run_dir(cfg, run_dir)
    _drop_torn_tail(run_dir / ROWS_FILE)
    done = {row["key"] for row in read_rows(run_dir)}
    wanted = {run_key(b, resolve_size(s)[0]): (b, s) for b in cfg.budgets for s in cfg.sizes}
    pending = [run for key, run in wanted.items() if key not in done]
    baselines_file = run_dir / BASELINES_FILE
    text = prepare_text(cfg, run_dir) if pending or not baselines_file.exists() else None
    if not baselines_file.exists():  # the floor every run is read against, on the same tokens
        baselines_file.write_text(json.dumps(count_baselines(text.train, text.heldout, text.eos_id,
                                                             text.vocab_size), indent=1) + "\n")
    if pending:
        bar = tqdm(pending, desc="isoflop runs", unit="run", disable=not progress)
        for budget, size in bar:
            bar.set_postfix_str(f"C={budget:.2g} N={size}")
            append_row(run_dir, train_one(cfg, budget, size, text))
    rows = [r for r in read_rows(run_dir) if r["key"] in wanted]  # a folder may hold runs of other configs
    return SweepResult(rows=rows, fit=fit_run_dir(cfg, run_dir, rows), trained=len(pending),
                       baselines=json.loads(baselines_file.read_text()))


def bootstrap_law(cfg: SweepConfig, n, d, loss, point: ScalingLaw) -> LawIntervals:
    """Percentile intervals from refits on resampled runs (degenerate refits dropped and counted:
    a sweep of ~15 runs has resamples that send alpha to ~16 with A overflowing)."""
    return bootstrap_intervals(n, d, loss, point, n_resamples=cfg.bootstrap_resamples, level=cfg.bootstrap_level,
                               seed=cfg.seed, config=FitConfig(n_starts=cfg.bootstrap_starts))


def fit_rows(cfg: SweepConfig, rows: list[dict]) -> dict:
    """The parametric law with bootstrap intervals, the isoFLOP fit, and N_opt / D_opt per budget."""
    rows = [r for r in rows if r.get("loss") is not None]
    n, d, loss = (np.array([r[k] for r in rows], float) for k in ("n_params", "tokens", "loss"))
    law_fit = fit_scaling_law(n, d, loss, FitConfig(n_starts=cfg.fit_starts))
    law = law_fit.law
    intervals = bootstrap_law(cfg, n, d, loss, law)
    try:
        iso = isoflop_fit(n, d, loss, flops=np.array([r["budget_flops"] for r in rows]))
        iso_out = {"a": iso.a, "b": iso.b, "n_coef": iso.n_coef, "d_coef": iso.d_coef,
                   "budgets": list(iso.budgets), "n_opt": list(iso.n_opt), "d_opt": list(iso.d_opt)}
    except ValueError as e:
        iso, iso_out = None, {"skipped": str(e)}
    budgets = sorted({r["budget_flops"] for r in rows})
    optima = []
    for c in [*budgets, budgets[-1] * cfg.extrapolate_factor]:
        n_opt, d_opt = (float(x) for x in law.compute_optimal(c))
        best = min((r for r in rows if r["budget_flops"] == c), key=lambda r: r["loss"], default=None)
        optima.append({"flops": c, "extrapolated": c not in budgets, "n_opt": n_opt, "d_opt": d_opt,
                       "tokens_per_param": d_opt / n_opt, "predicted_loss": float(law.loss(n_opt, d_opt)),
                       "isoflop_n_opt": float(iso.predict(c)[0]) if iso else None,
                       "best_measured": {k: best[k] for k in ("size", "n_params", "tokens", "loss")} if best else None})
    residuals = np.log(loss) - np.log(law.loss(n, d))
    return {"law": law.as_dict(), "n_exponent": law.n_exponent, "d_exponent": law.d_exponent,
            "intervals": {"level": intervals.level, "n_resamples": intervals.n_resamples, "dropped": intervals.dropped,
                          "bounds": {k: list(v) for k, v in intervals.bounds.items()}},
            "objective": law_fit.objective, "n_observations": law_fit.n_observations,
            "rms_log_residual": float(np.sqrt(np.mean(residuals**2))),
            "isoflop": iso_out, "compute_optimal": optima,
            "train_tokens": max((r.get("train_tokens", 0) for r in rows), default=0) or None}


def fit_run_dir(cfg: SweepConfig, run_dir: str | Path, rows: list[dict] | None = None) -> dict:
    """Fit the rows of RUN_DIR (or the given ones), write fit.json and both plots; returns the fit."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir) if rows is None else rows
    fit = fit_rows(cfg, rows)
    atomic_write_bytes(run_dir / FIT_FILE, (json.dumps(fit, indent=2) + "\n").encode())
    from explorer.analysis.sweep_plots import plot_isoflop, plot_law

    plot_isoflop(rows, fit, run_dir / ISOFLOP_PLOT)
    plot_law(rows, fit, run_dir / LAW_PLOT)
    return fit


def sweep_summary(result: SweepResult) -> str:
    """The runs as a table, then the fitted law and the compute-optimal split per budget."""
    from explorer.analysis.sweep_plots import law_title

    lines = [f"{'budget C':>10} {'size':>8} {'N':>9} {'D tokens':>10} {'steps':>6} {'loss':>7} {'sec':>6}"]
    for r in sorted(result.rows, key=lambda r: (r["budget_flops"], r["n_params"])):
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "nan"
        lines.append(f"{r['budget_flops']:>10.3g} {r['size']:>8} {round(r['n_params']):>9,} {round(r['tokens']):>10,} "
                     f"{r.get('steps', 0):>6} {loss:>7} {r.get('seconds', 0):>6.1f}")
    fit = result.fit
    law = ScalingLaw(**fit["law"])
    bounds = fit["intervals"]["bounds"]
    lines.append(f"fit ({fit['n_observations']} runs, rms log residual {fit['rms_log_residual']:.4f}): "
                 f"{law_title(law)}")
    lines.append("  " + ", ".join(f"{k} {fit['intervals']['level']:.0%} CI [{bounds[k][0]:.3g}, {bounds[k][1]:.3g}]"
                                  for k in ("E", "alpha", "beta", "n_exponent")))
    for o in fit["compute_optimal"]:
        best = o["best_measured"]
        measured = f"; best run N={round(best['n_params']):,}, loss {best['loss']:.4f}" if best else " (extrapolated)"
        iso = f", isoFLOP N_opt={o['isoflop_n_opt']:.3g}" if o["isoflop_n_opt"] else ""
        lines.append(f"  C={o['flops']:.3g}: N_opt={o['n_opt']:.3g}, D_opt={o['d_opt']:.3g} "
                     f"({o['tokens_per_param']:.1f} tok/param), predicted loss {o['predicted_loss']:.4f}"
                     f"{iso}{measured}")
    if "skipped" in fit["isoflop"]:
        lines.append(f"  isoFLOP fit skipped: {fit['isoflop']['skipped']}")
    else:
        lines.append(f"  isoFLOP fit: N_opt ~ C^{fit['isoflop']['a']:.3f}, D_opt ~ C^{fit['isoflop']['b']:.3f}")
    if result.baselines:
        b = result.baselines
        best = min((r["loss"] for r in result.rows if r.get("loss") is not None), default=None)
        margin = f"; the best run is {b['bigram'] - best:+.4f} nats below the bigram" if best is not None else ""
        lines.append(f"count baselines on the same {b['train_tokens']:,} training tokens (held-out loss): unigram "
                     f"{b['unigram']:.4f}, bigram {b['bigram']:.4f}{margin}")
    return "\n".join(lines)
