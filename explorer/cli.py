"""`explorer` command line: build the offline web, serve it, search it, run and replay experiments."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from explorer.web.corpus import SOURCE_READERS
from explorer.web.presets import CORPUS_PRESETS, DEFAULT_PRESET, corpus_location

DEFAULT_PORT = 8765


def _corpus_build(args) -> int:
    import dataclasses

    from explorer.web.captions import CaptionNoise
    from explorer.web.corpus import build_corpus
    from explorer.web.presets import composition_table, preset_dir

    changes = {"sources": tuple(args.sources.split(",")) if args.sources else None,
               "limit_per_source": args.limit_per_source, "seed": args.seed,
               "noise": CaptionNoise(wrong=args.wrong_captions) if args.wrong_captions is not None else None,
               "web_dir": str(args.web) if args.web else None}
    spec = dataclasses.replace(CORPUS_PRESETS[args.preset], **{k: v for k, v in changes.items() if v is not None})
    out = args.out or preset_dir(args.preset)
    t0 = time.time()
    corpus = build_corpus(out, spec)
    print(f"built {len(corpus):,} items, {corpus.meta['distinct_captions']:,} distinct captions in "
          f"{time.time() - t0:.0f}s -> {out}\n{composition_table(corpus.meta)}")
    return 0


def _corpus_dir(text: str) -> Path:
    """--corpus: a preset name (its directory under $EXPLORER_HOME/corpus) or a corpus directory."""
    return corpus_location(text)[0]


def _corpus_info(args) -> int:
    import json

    from explorer.web.corpus import WebCorpus

    print(json.dumps(WebCorpus(args.corpus).meta, indent=2))
    return 0


def _serve(args) -> int:
    from explorer.web.engine import open_local_engine

    server = open_local_engine(args.corpus, args.port, args.min_score, image_index=args.image_index)
    print(f"serving {args.corpus} at {server.url}  (try {server.url}/search?q=sneaker&format=json); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _search(args) -> int:
    from explorer.acquire.cache import ResponseCache
    from explorer.acquire.search import SearchError, build_backend
    from explorer.web.engine import open_local_engine

    server = None
    url = args.url
    if args.backend == "local" and not url:
        server = open_local_engine(args.corpus)
        url = server.url
    if not url:
        print(f"--url is required for the {args.backend} backend", file=sys.stderr)
        return 2
    cache = ResponseCache(args.cache) if args.cache else None
    try:
        results = build_backend(args.backend, cache=cache, url=url).search(args.query, args.n)
    except SearchError as e:
        print(f"search failed: {e}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    truth = _truth_lookup(args.corpus) if args.truth else None
    for r in results:
        extra = f"  [{truth(r.image_url)}]" if truth else ""
        score = f"{r.score:.3f}" if r.score is not None else "  -  "
        print(f"{r.rank + 1:3d}  {score}  {r.caption[:70]:70s}  {r.image_url}{extra}")
    if not results:
        print("no results")
    return 0


def _truth_lookup(corpus_dir: Path):
    """Evaluation only: the hidden source/class of a local-engine image URL."""
    from explorer.web.corpus import WebCorpus

    corpus = WebCorpus(corpus_dir)

    def lookup(url: str) -> str:
        i = corpus.index_of.get(url.rsplit("/", 1)[-1])
        return "?" if i is None else f"{corpus.hidden['source'][i]}:{corpus.hidden['class_name'][i]}"
    return lookup


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run(args) -> int:
    from explorer.run.config import load_config, parse_overrides
    from explorer.run.experiment import default_run_dir, run_experiment

    overrides = parse_overrides(args.set)
    if args.target:
        overrides["target.name"] = str(args.target.resolve())
        for size in ("target.acquire_size", "target.probe_train_size"):  # a folder is split by fractions
            overrides.setdefault(size, None)
    cfg = load_config(args.config, overrides)
    out = args.out or default_run_dir(cfg)
    print(f"run folder: {out}")
    run_experiment(cfg, out, progress=not args.quiet, keep_checkpoints=args.keep_checkpoints)
    print(f"done: {out}/metrics.jsonl")
    return 0


def _replay(args) -> int:
    from explorer.run.experiment import replay_run

    diffs = replay_run(args.run_dir, progress=not args.quiet)
    if diffs:
        print("replay DIFFERS from the recorded run:\n  " + "\n  ".join(diffs[:20]))
        return 1
    print(f"replay of {args.run_dir} made identical decisions (queries, rewards, accepted items, losses), "
          "with no network access")
    return 0


def _daemon(args) -> int:
    from explorer.run.daemon import run_daemon

    return run_daemon(args.config, args.out, forever=args.forever, progress=not args.quiet,
                      status_port=args.status_port, keep_checkpoints=args.keep_checkpoints,
                      max_disk_gb=args.max_disk_gb)


def _status(args) -> int:
    from explorer.run.daemon import run_status

    print(run_status(args.run_dir))
    return 0


def _sheets(args) -> int:
    from explorer.run.sheets import rebuild_sheets

    paths = rebuild_sheets(args.run_dir, replay=args.replay)
    print(f"{len(paths)} contact sheets in {args.run_dir / 'sheets'}" + (f" (last: {paths[-1].name})" if paths else ""))
    return 0


def _serve_run(args) -> int:
    from explorer.run.daemon import StatusServer

    if not (args.run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{args.run_dir} has no config.yaml: not a run folder")
    server = StatusServer(args.run_dir, args.port, host=args.host)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: whoever reaches this address can read the run")
    print(f"dashboard of {args.run_dir} at {server.root}/ (JSON at {server.url}); Ctrl-C stops it")
    try:
        threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _report(args) -> int:
    from explorer.analysis.report import write_report

    out = args.out or Path(args.run_dirs[0]) / "report"
    report = write_report(args.run_dirs, out, title=args.title)
    print(report.read_text())
    print(f"report: {report} (plots and runs.csv beside it)")
    return 0


def _plan(args) -> int:
    from explorer.analysis.plan import (
        format_overfit_exponent,
        format_plan,
        format_repeat_fit,
        load_observations,
        load_routed_law,
        plan_from_runs,
        repeat_decay_from_run,
    )

    if args.repeats is not None:
        for run in args.repeats:
            print(format_repeat_fit(repeat_decay_from_run(run), run))
        if len(args.repeats) > 1:
            print(format_overfit_exponent(args.repeats))
        return 0
    missing = [f"--{name}" for name in ("budget", "runs", "tokens") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"explorer plan needs {', '.join(missing)} (or --repeats RUN_DIR alone)")
    routed = load_routed_law(args.routed_law) if args.routed_law is not None else None
    if routed is None and args.expert_options:
        raise ValueError("--expert-options needs --routed-law FIT_JSON (bench/exp_routing.py's fit.json)")
    plan = plan_from_runs(load_observations(args.runs), args.budget, args.tokens,
                          current_params=args.current_params, n_resamples=args.resamples, routed=routed,
                          experts=args.experts, expert_options=tuple(args.expert_options or ()))
    print(format_plan(plan))
    return 0


def _sweep(args) -> int:
    from explorer.analysis.plan import format_plan, plan_from_runs
    from explorer.analysis.sweep import load_sweep_config, run_sweep, sweep_summary
    from explorer.run.config import parse_overrides
    from learners.budget import FitConfig

    cfg = load_sweep_config(args.config, parse_overrides(args.set))
    out = args.out or Path("runs") / cfg.name
    print(f"sweep folder: {out}")
    result = run_sweep(cfg, out, progress=not args.quiet)
    print(sweep_summary(result))
    if args.budget_flops is not None:
        tokens = args.tokens if args.tokens is not None else result.fit["train_tokens"]
        if tokens is None:
            raise ValueError("--budget-flops needs --tokens: the sweep rows do not record the training text size")
        finished = [r for r in result.rows if r["loss"] is not None]
        # the same law as the summary above, whose bootstrap intervals it already shows
        plan = plan_from_runs(finished, args.budget_flops, tokens, n_resamples=0,
                              fit_config=FitConfig(n_starts=cfg.fit_starts))
        print(format_plan(plan))
    return 0


def _demo(args) -> int:
    from explorer.run.demo import run_demo

    return run_demo(args.config, args.out, progress=not args.quiet, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="explorer", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    corpus = sub.add_parser("corpus", help="build or inspect the offline web corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    b = csub.add_parser("build", formatter_class=fmt, help="build the offline web from installed datasets",
                        description="Builds the offline web from a preset (explorer/web/presets.py): 'world' (the "
                                    "default) is a web that is mostly not the target (1,900 Fashion-MNIST images and "
                                    "2,500 MNIST digits among openclipart, icons, emoji, game sprites, stamps "
                                    "and glyphs from Debian packages); 'fashion-web' the first web, 82% Fashion-MNIST train, "
                                    "with openclipart and MNIST. Images get alt-text-like captions and "
                                    "are written as webdataset tar shards + a parquet manifest + MiniLM caption "
                                    "embeddings for the search engine. Prints the composition and the base rate.")
    b.add_argument("--preset", default=DEFAULT_PRESET, choices=list(CORPUS_PRESETS), help="which composition")
    b.add_argument("--out", type=Path, default=None, help="corpus directory; unset: $EXPLORER_HOME/corpus/PRESET")
    b.add_argument("--sources", default=None, help="comma-separated installed sources, of: " + ", ".join(SOURCE_READERS) + "; unset: the preset's")
    b.add_argument("--limit-per-source", type=int, default=None, help="reproducible slice of each source (tests)")
    b.add_argument("--seed", type=int, default=None, help="seed for captions and slices; unset: the preset's (0)")
    b.add_argument("--wrong-captions", type=float, default=None,
                   help="fraction of Fashion-MNIST captions that name another class; unset: the preset's (0.10)")
    b.add_argument("--web", type=Path, default=None,
                   help="your own web instead: a folder of images, captions from KEY.txt sidecars or file names")
    b.set_defaults(func=_corpus_build)
    info = csub.add_parser("info", formatter_class=fmt, help="print a corpus's build parameters and counts")
    info.add_argument("corpus", type=_corpus_dir, nargs="?", default=DEFAULT_PRESET, help="preset name or directory")
    info.set_defaults(func=_corpus_info)

    s = sub.add_parser("serve", formatter_class=fmt, help="serve the local search engine over HTTP on 127.0.0.1",
                       description="Starts the hybrid BM25 + MiniLM search engine over a corpus. It answers "
                                   "SearXNG-style GET /search?q=..&format=json and clip-retrieval-style "
                                   "POST /knn-service (text, or an image by example: the corpus's image index, "
                                   "built beside it on first use), and serves images at /image/KEY.")
    s.add_argument("--corpus", type=_corpus_dir, default=DEFAULT_PRESET, help="preset name or corpus directory")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--min-score", type=float, default=0.25,
                   help="drop results whose hybrid score is below this (0 returns something for anything)")
    s.add_argument("--image-index", action=argparse.BooleanOptionalAction, default=True,
                   help="serve the corpus's image index (indice explorer-image, for image queries; built beside "
                        "the corpus on first use); --no-image-index serves captions only")
    s.set_defaults(func=_serve)

    q = sub.add_parser("search", formatter_class=fmt, help="run one query and print the ranked results",
                       description="Runs QUERY against a backend and prints rank, score, caption and image URL. "
                                   "With the local backend and no --url, the engine is started in-process.")
    q.add_argument("query")
    q.add_argument("-n", type=int, default=20, help="number of results")
    q.add_argument("--backend", default="local", choices=["local", "searxng", "clip-retrieval"])
    q.add_argument("--url", default=None, help="engine base URL (required for searxng / clip-retrieval)")
    q.add_argument("--corpus", type=_corpus_dir, default=DEFAULT_PRESET,
                   help="corpus for the in-process engine: preset name or directory")
    q.add_argument("--cache", type=Path, default=None, help="cache directory for the answer")
    q.add_argument("--truth", action="store_true",
                   help="evaluation only: show each local result's hidden source:class")
    q.set_defaults(func=_search)

    r = sub.add_parser("run", formatter_class=fmt, help="run an acquisition experiment from a YAML config",
                       description="Runs N iterations of propose -> search -> fetch/validate -> score -> update "
                                   "policy -> accept -> train -> evaluate, writing a run folder (config.yaml, "
                                   "metrics.jsonl, accepted.jsonl, cache/, checkpoint) that `explorer replay` "
                                   "reproduces offline.")
    r.add_argument("config", type=Path, help="YAML experiment config (see configs/)")
    r.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME-POLICY-TIME)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set policy.name=random --set iterations=3")
    r.add_argument("--target", type=Path, default=None,
                   help="your own target: a folder of images (class subfolders give evaluation labels; "
                        "loose files beside them are ignored). The local web's precision needs "
                        "--set 'target.relevant=[CLASS, ...]' naming its hidden classes of your kind")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--keep-checkpoints", type=_positive_int, default=3, metavar="K",
                   help="keep the last K checkpoint directories (RUN_DIR/checkpoints/iter-NNNNNN)")
    r.set_defaults(func=_run)

    rp = sub.add_parser("replay", formatter_class=fmt, help="re-run a recorded run from its cache, offline",
                        description="Rebuilds a run from its folder alone (resolved config, recorded backend, "
                                    "cache) with zero network access and checks it makes the same decisions. "
                                    "Exit code 1 when anything differs.")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=_replay)

    dm = sub.add_parser("daemon", formatter_class=fmt, help="run the loop as a resumable long-running process",
                        description="Runs the acquisition loop in RUN_DIR until the config's iterations are done "
                                    "(or forever with --forever). If RUN_DIR holds a checkpoint, resumes exactly "
                                    "where it stopped (CONFIG may then be omitted). SIGTERM/SIGINT stop it at the "
                                    "next safe point with exit code 0. With a disk budget (disk.max_gb) rejected "
                                    "image bodies are evicted first; when the folder still does not fit, or the disk "
                                    "is full, it stops with exit code 3 and a resumable state.")
    dm.add_argument("config", type=Path, nargs="?", default=None, help="YAML config (omit to resume RUN_DIR)")
    dm.add_argument("--out", type=Path, required=True, help="run folder (RUN_DIR)")
    dm.add_argument("--forever", action="store_true", help="ignore the iteration budget; run until stopped")
    dm.add_argument("--status-port", type=int, default=None, metavar="P",
                    help="also serve the read-only dashboard on 127.0.0.1 at this port (0: any free port): the page "
                         "at /, the JSON of `explorer status` at /status")
    dm.add_argument("--quiet", action="store_true")
    dm.add_argument("--keep-checkpoints", type=_positive_int, default=3, metavar="K",
                    help="keep the last K checkpoint directories (RUN_DIR/checkpoints/iter-NNNNNN)")
    dm.add_argument("--max-disk-gb", type=float, default=None, metavar="GB",
                    help="set the run folder's disk budget (disk.max_gb), also when resuming; kept in its config.yaml")
    dm.set_defaults(func=_daemon)

    st = sub.add_parser("status", formatter_class=fmt, help="progress, rates and last errors of a run folder")
    st.add_argument("run_dir", type=Path)
    st.set_defaults(func=_status)

    sh = sub.add_parser("sheets", formatter_class=fmt, help="draw a run's contact sheets again",
                        description="Rebuilds RUN_DIR/sheets/iter-NNNNNN.png (images; .html for text runs) from the "
                                    "run folder alone: per iteration, the accepted items grouped by the query that "
                                    "found them and the best-scored rejected ones with why. A live run writes them "
                                    "after every iteration; this draws them for a finished, copied or replayed run.")
    sh.add_argument("run_dir", type=Path)
    sh.add_argument("--replay", action="store_true",
                    help="draw the replay's iterations (replay-metrics.jsonl) as sheets/replay-iter-NNNNNN.*")
    sh.set_defaults(func=_sheets)

    sv = sub.add_parser("serve-run", formatter_class=fmt, help="the dashboard of a finished run in the browser",
                        description="Serves RUN_DIR's dashboard (read-only): the page at /, the JSON of "
                                    "`explorer status` at /status, accepted images at /item/KEY.png and the contact "
                                    "sheets at /sheets/NAME, until Ctrl-C.")
    sv.add_argument("run_dir", type=Path)
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.set_defaults(func=_serve_run)

    rep = sub.add_parser("report", formatter_class=fmt, help="tables and plots of run folders (markdown + PNG)",
                         description="Reads run folders (or folders holding them, searched recursively), groups them "
                                     "by condition (policy, and the gp's acquisition) and writes OUT/report.md with "
                                     "the acquisition-efficiency and representation tables (mean and 95% interval "
                                     "over seeds), PNG plots of precision and reward vs queries and of accuracy vs "
                                     "images acquired, runs.csv (every run's curve) and summary.json.")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", type=Path, default=None, help="report folder (default: FIRST_RUN_DIR/report)")
    rep.add_argument("--title", default="explorer report")
    rep.set_defaults(func=_report)

    pl = sub.add_parser("plan", formatter_class=fmt, help="fit L(N, D) to runs and plan a FLOP budget",
                        description="Fits the scaling law L(N, D) = E + A/N^alpha + B/D^beta to finished runs "
                                    "(Huber loss on log-loss, L-BFGS from a grid of starts, bootstrap intervals), "
                                    "computes the compute-optimal N and D for the budget, and says whether the "
                                    "next compute should acquire more data, grow the model, or train.")
    pl.add_argument("--budget", type=float, help="FLOPs left to spend, e.g. 1e15")
    pl.add_argument("--runs", type=Path, help="JSON or CSV of finished runs with n_params, tokens, loss")
    pl.add_argument("--tokens", type=float, help="tokens of text available now")
    pl.add_argument("--current-params", type=float, default=None, help="the current model's parameters")
    pl.add_argument("--resamples", type=int, default=100, help="bootstrap resamples (0: none)")
    pl.add_argument("--routed-law", type=Path, default=None, metavar="FIT_JSON",
                    help="the routed law log L = a log N + b log E + c log N log E + d (bench/exp_routing.py's "
                         "fit.json): also weigh restarting at the same active size with more experts")
    pl.add_argument("--experts", type=int, default=1, help="experts per routed layer of the current model (1: dense)")
    pl.add_argument("--expert-options", type=int, nargs="+", default=None, metavar="E",
                    help="expert counts the model may restart with (with --routed-law), e.g. 4 16 64")
    pl.add_argument("--repeats", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                    help="instead: fit R*, how fast repeated tokens lose their worth (text.repeat_decay), to "
                         "a text run that trained on its target alone (text.strategy: train), evaluated often; "
                         "given runs on sets of different sizes (the target, the target with web documents "
                         "added), also how the overfitting point moves with the unique tokens "
                         "(text.max_passes_exponent)")
    pl.set_defaults(func=_plan)

    sw = sub.add_parser("sweep", formatter_class=fmt, help="isoFLOP sweep of the LM (GPU if any), then fit L(N, D)",
                        description="For every FLOP budget C and model size N in CONFIG (see configs/isoflop.yaml), "
                                    "trains a fresh LM on D = C / (6N) tokens of Wikipedia-lead text and records its "
                                    "held-out loss on the target topic as one line of RUN_DIR/sweep.jsonl (rerunning "
                                    "skips finished runs). Then fits L(N, D) = E + A/N^alpha + B/D^beta with bootstrap "
                                    "intervals and isoFLOP parabolas, and writes RUN_DIR/fit.json (N_opt and D_opt per "
                                    "budget and an extrapolated one), isoflop.png and law_contours.png.")
    sw.add_argument("config", type=Path, help="sweep YAML (budgets, sizes, seq_len, batch_size, topic, seed, ...)")
    sw.add_argument("--out", type=Path, default=None, help="run folder, RUN_DIR (default runs/NAME from the config)")
    sw.add_argument("--budget-flops", type=float, default=None, metavar="X",
                    help="also print the `explorer plan` for X FLOPs from the sweep's runs")
    sw.add_argument("--tokens", type=float, default=None,
                    help="tokens available for that plan (default: the sweep's training text)")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep field, e.g. --set lm.router=sbase --set lm.num_experts=16 (a routed "
                         "sweep: N is then the active parameters, one expert per token)")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sw.set_defaults(func=_sweep)

    d = sub.add_parser("demo", formatter_class=fmt, help="the offline demo: gp vs random vs base, one table",
                       description="Builds the config's web if missing (the world web: once, a few minutes), "
                                   "starts the local engine, pretrains a shared base encoder on the target, runs a "
                                   "GP-policy experiment, a random-policy baseline and a target-only control from it, "
                                   "and prints a table (acquired and relevant images, kNN and linear-probe accuracy, "
                                   "raw pixels beside) that it also writes to DEMO/table.md.")
    d.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    d.add_argument("--out", type=Path, default=None, help="demo folder (default runs/demo-TIME)")
    d.add_argument("--jobs", type=int, default=None,
                   help="processes for the gp run, the random run and the target-only control (unset: all 3 side "
                        "by side, cores / 3 torch threads each, on a machine with >= 2 cores; 1: one after another)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"explorer: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from explorer.run.ranks import RankLost

        if not isinstance(e, RankLost):
            raise
        print(f"explorer: error: {e}", file=sys.stderr)  # under torchrun: another rank died
        return 1


if __name__ == "__main__":
    sys.exit(main())
