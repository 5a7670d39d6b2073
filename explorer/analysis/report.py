"""`explorer report RUN_DIR...`: run folders -> a markdown report with tables, CSVs and PNG plots.

Runs are grouped by condition (the policy, and the gp's acquisition) and aggregated over seeds as
mean ± 95% confidence half-width (Student t over seeds; one seed gives no interval). Every seed's
final row is also written to `runs.csv`, so nothing is averaged away unseen.

What a run folder holds and what is read from it:
    config.yaml     policy, options and seed (the condition and the seed)
    metrics.jsonl   line 0: the starting encoder's scores (the 'base' row for its seed);
                    line i: iteration i's queries, rewards, accepted count and precision, eval scores
and, beside the run (its parent folder), the controls of the same base if they were run:
`target-only.json` and `pixels.json` (bench/acquisition_grid.py) or `summary.json` with
`target_only` and `pixels` entries (`explorer demo`). Each condition's accuracy is also reported as
a paired difference from the target-only control of its own seed (same base, same probe split).
The report ends with pictures (explorer/analysis/gallery.py): per condition, the best-rewarded
accepted images and each run's last contact sheet.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from explorer.analysis.gallery import gallery_section

ACCURACIES = ("eval_knn_accuracy", "eval_linear_probe_accuracy")


@dataclass(frozen=True, kw_only=True)
class RunCurves:
    """One run's cumulative curves, one entry per finished iteration (index 0 = before acquiring)."""

    path: Path
    condition: str
    seed: int
    base: str  # the starting checkpoint: runs that share it share the base and target-only controls
    queries: np.ndarray  # (I+1,) queries issued so far
    reward: np.ndarray  # (I+1,) summed query reward so far
    accepted: np.ndarray  # (I+1,) images accepted for training so far
    precision: np.ndarray  # (I+1,) share of accepted images that are target-relevant so far (nan before any)
    relevant: np.ndarray  # (I+1,) target-relevant images accepted so far (nan without ground truth)
    knn: np.ndarray  # (I+1,) kNN accuracy after each iteration (nan where not evaluated)
    probe: np.ndarray  # (I+1,) linear-probe accuracy after each iteration
    seconds: float  # wall time of the acquisition iterations


def condition_name(config: dict) -> str:
    """'gp-ucb', 'random', ...: the policy, plus the gp's acquisition function."""
    policy = config.get("policy", {})
    name = policy.get("name", "?")
    if name == "gp":
        name += "-" + (policy.get("options") or {}).get("acquisition", "softmax")
    return name


def read_run(path: Path) -> RunCurves:
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}/metrics.jsonl is empty")
    steps = lines[1:]
    n_queries = np.array([0] + [len(m.get("queries", [])) for m in steps])
    reward = np.array([0.0] + [float(sum(r for r in m.get("query_rewards", []) if r is not None))  # None: failed
                               for m in steps])
    accepted = np.array([0] + [int(m.get("accepted", 0)) for m in steps])
    truth = any(m.get("precision_accepted") is not None for m in steps)
    relevant = np.array([0.0] + [(m.get("precision_accepted") or 0.0) * m.get("accepted", 0) for m in steps])
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.cumsum(relevant) / np.cumsum(accepted)
    if not truth:  # a user's own target: nothing says what is relevant
        precision = relevant = np.full(len(accepted), np.nan)
    accuracy = {key: np.array([m.get(key, math.nan) for m in lines], dtype=float) for key in ACCURACIES}
    run_json = path / "run.json"
    base = json.loads(run_json.read_text()).get("base_checkpoint") if run_json.exists() else None
    seed = int(config.get("seed", 0))
    return RunCurves(path=path, condition=condition_name(config), seed=seed, base=base or f"{path} (own)",
                     queries=np.cumsum(n_queries), reward=np.cumsum(reward), accepted=np.cumsum(accepted),
                     precision=precision, relevant=np.round(np.cumsum(relevant)), knn=accuracy["eval_knn_accuracy"],
                     probe=accuracy["eval_linear_probe_accuracy"],
                     seconds=float(sum(m.get("seconds", 0.0) for m in steps)))


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders given directly or found below the given folders, in a stable order."""
    found = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").exists():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.rglob("metrics.jsonl")))
        else:
            raise FileNotFoundError(f"{path}: not a run folder (no metrics.jsonl) and not a folder of runs")
    if not found:
        raise FileNotFoundError(f"no run folders (with metrics.jsonl) in {', '.join(map(str, paths))}")
    return list(dict.fromkeys(p.resolve() for p in found))


CONTROLS = {"target only": ("target-only.json", "target_only"), "pixels": ("pixels.json", "pixels"),
            "pixels (centred)": ("pixels-centred.json", "pixels_centred")}


def control_scores(run_dir: Path, name: str) -> dict | None:
    """The scores of control `name` (a key of CONTROLS) saved beside this run, if any."""
    file, key = CONTROLS[name]
    grid = run_dir.parent / file
    if grid.exists():
        return json.loads(grid.read_text())
    demo = run_dir.parent / "summary.json"
    if demo.exists():
        return json.loads(demo.read_text()).get(key)
    return None


def target_only_scores(run_dir: Path) -> dict | None:
    """The target-only control run beside this run, if any."""
    return control_scores(run_dir, "target only")


def mean_ci(values) -> tuple[float, float, int]:
    """Mean, 95% t-interval half-width (nan for one value) and the count of finite values."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan, 0
    if x.size == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half), int(x.size)


def fmt(mean: float, half: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if not np.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def group(runs: list[RunCurves]) -> dict[str, list[RunCurves]]:
    groups = defaultdict(list)
    for run in runs:
        groups[run.condition].append(run)
    return dict(sorted(groups.items()))


def controls(runs: list[RunCurves]) -> dict[str, dict[str, dict]]:
    """Per base checkpoint: its scores (iteration 0 of its runs) and those of the controls beside it."""
    found = {"pixels": {}, "pixels (centred)": {}, "base": {}, "target only": {}}
    for run in runs:
        found["base"].setdefault(run.base, {"eval_knn_accuracy": run.knn[0], "eval_linear_probe_accuracy": run.probe[0]})
        for name in CONTROLS:
            scores = control_scores(run.path, name)
            if scores is not None:
                found[name].setdefault(run.base, scores)
    return found


def paired_difference(runs: list[RunCurves], reference: dict[str, dict], key: str, attr: str):
    """Mean, 95% half-width and n of (final accuracy - the same base's reference accuracy) over runs."""
    return mean_ci(getattr(r, attr)[-1] - reference[r.base][key] for r in runs
                   if r.base in reference and reference[r.base].get(key) is not None)


def efficiency_table(groups: dict[str, list[RunCurves]]) -> list[str]:
    lines = ["| condition | runs | queries | accepted | relevant accepted | relevant per query | precision of accepted "
             "| cumulative reward | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in groups.items():
        cells = [mean_ci(getattr(r, key)[-1] for r in runs) for key in ("queries", "accepted", "relevant",
                                                                          "precision", "reward")]
        per_query = mean_ci(r.relevant[-1] / r.queries[-1] for r in runs if r.queries[-1])
        secs = mean_ci(r.seconds for r in runs)
        lines.append(f"| {name} | {len(runs)} | {cells[0][0]:.0f} | {fmt(*cells[1][:2], 0)} | {fmt(*cells[2][:2], 0)} "
                     f"| {fmt(*per_query[:2], 2)} | {fmt(*cells[3][:2])} | {fmt(*cells[4][:2], 2)} | {secs[0]:.0f} |")
    return lines


def representation_table(groups: dict[str, list[RunCurves]], control: dict[str, dict[str, dict]]) -> list[str]:
    """Accuracy per encoder, and each acquisition condition's paired difference from its own seed's
    target-only control (blank where no control was run)."""
    lines = ["| encoder | runs | images acquired | kNN accuracy | linear-probe accuracy | Δ kNN vs target only "
             "| Δ probe vs target only |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, per_seed in control.items():
        if per_seed:
            knn = mean_ci(s.get("eval_knn_accuracy") for s in per_seed.values())
            probe = mean_ci(s.get("eval_linear_probe_accuracy") for s in per_seed.values())
            lines.append(f"| {name} | {len(per_seed)} | 0 | {fmt(*knn[:2])} | {fmt(*probe[:2])} | | |")
    reference = control.get("target only", {})
    for name, runs in groups.items():
        acquired = mean_ci(r.accepted[-1] for r in runs)
        knn, probe = mean_ci(r.knn[-1] for r in runs), mean_ci(r.probe[-1] for r in runs)
        deltas = [paired_difference(runs, reference, key, attr)
                  for key, attr in (("eval_knn_accuracy", "knn"), ("eval_linear_probe_accuracy", "probe"))]
        cells = " | ".join(_signed(*d[:2]) if d[2] else "" for d in deltas)
        lines.append(f"| {name} | {len(runs)} | {acquired[0]:.0f} | {fmt(*knn[:2])} | {fmt(*probe[:2])} | {cells} |")
    return lines


PIXEL_MARGIN = 0.03  # an encoder that is not this much better than raw pixels has not learned much


def pixel_gate(control: dict[str, dict[str, dict]]) -> list[str]:
    """The sanity gate: does target-only SSL beat raw pixels (and centred pixels) on kNN by PIXEL_MARGIN?"""
    reference = control.get("target only", {})
    lines = []
    for name in ("pixels", "pixels (centred)"):
        runs = control.get(name, {})
        diffs = [reference[b]["eval_knn_accuracy"] - runs[b]["eval_knn_accuracy"] for b in runs if b in reference]
        if diffs:
            mean, half, n = mean_ci(diffs)
            verdict = "passes" if mean >= PIXEL_MARGIN else "FAILS"
            lines.append(f"Sanity gate: target-only kNN − {name} kNN = {_signed(mean, half)} (n={n}): {verdict} "
                         f"the required +{PIXEL_MARGIN:.2f}.")
    return lines


def gain_per_relevant(groups: dict[str, list[RunCurves]], control: dict[str, dict[str, dict]]) -> list[str]:
    """Across every acquisition run with a target-only control of its base: the least-squares slope
    of the paired kNN gain on the relevant images it acquired (exploratory: runs of one seed share
    their control, so the points are not independent)."""
    from scipy import stats

    reference = control.get("target only", {})
    points = [(r.relevant[-1], r.knn[-1] - reference[r.base]["eval_knn_accuracy"]) for runs in groups.values()
              for r in runs if r.base in reference and np.isfinite(r.relevant[-1]) and np.isfinite(r.knn[-1])]
    if len(points) < 4 or len({x for x, _ in points}) < 2:
        return []
    x, y = np.array(points, dtype=np.float64).T
    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
    return [f"Gain per relevant image (all {len(x)} acquisition runs, exploratory): Δ kNN vs target only = "
            f"{fit.intercept:+.4f} + ({1000 * fit.slope:+.4f} ± {1000 * half:.4f}) per 1,000 relevant images "
            f"acquired; r = {fit.rvalue:.2f}, p = {fit.pvalue:.3g}."]


def _signed(mean: float, half: float, digits: int = 3) -> str:
    text = f"{mean:+.{digits}f}"
    return text if not np.isfinite(half) else f"{text} ± {half:.{digits}f}"


# The report's figures (matplotlib, Agg): mean curve per condition with a 95% band over seeds.
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _band(runs: list[RunCurves], x_attr: str, y_attr: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean y and the y half-width per iteration, over the runs that reached it."""
    length = min(len(getattr(r, y_attr)) for r in runs)
    xs, ys, hs = [], [], []
    for i in range(length):
        xs.append(np.mean([getattr(r, x_attr)[i] for r in runs]))
        mean, half, _ = mean_ci(getattr(r, y_attr)[i] for r in runs)
        ys.append(mean)
        hs.append(half if np.isfinite(half) else 0.0)
    return np.array(xs), np.array(ys), np.array(hs)


def _curve(ax, runs: list[RunCurves], x_attr: str, y_attr: str, label: str) -> None:
    x, y, h = _band(runs, x_attr, y_attr)
    line, = ax.plot(x, y, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
    ax.fill_between(x, y - h, y + h, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_efficiency(groups: dict[str, list[RunCurves]], out: Path) -> None:
    plt = _pyplot()
    for y_attr, ylabel, name in (("precision", "precision of accepted images (cumulative)", "precision_vs_queries"),
                                 ("reward", "cumulative query reward", "reward_vs_queries")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, runs in groups.items():
            _curve(ax, runs, "queries", y_attr, label)
        ax.set_xlabel("queries issued")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)


def plot_accuracy(groups: dict[str, list[RunCurves]], control: dict[str, dict[str, dict]], out: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (y_attr, key, title) in zip(axes, (("knn", "eval_knn_accuracy", "kNN accuracy"),
                                               ("probe", "eval_linear_probe_accuracy", "linear-probe accuracy"))):
        for label, runs in groups.items():
            _curve(ax, runs, "accepted", y_attr, label)
        for (name, per_seed), style in zip(control.items(), (":", "--")):
            mean = mean_ci(s.get(key) for s in per_seed.values())[0]
            if np.isfinite(mean):
                ax.axhline(mean, color="gray", linestyle=style, label=f"{name} (n={len(per_seed)})")
        ax.set_xlabel("images acquired (accepted for training)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_images.png", dpi=120)
    plt.close(fig)


def write_runs_csv(runs: list[RunCurves], path: Path, control: dict[str, dict[str, dict]] | None = None) -> None:
    """Every run's curve, one row per iteration; then one row per control (base, target only,
    pixels) and seed, so that every paired difference of the report can be recomputed from it."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["condition", "seed", "iteration", "queries", "accepted", "relevant", "precision",
                      "cumulative_reward", "knn_accuracy", "linear_probe_accuracy", "run"])
        for run in runs:
            for i in range(len(run.queries)):
                out.writerow([run.condition, run.seed, i, int(run.queries[i]), int(run.accepted[i]),
                              _num(run.relevant[i]), _num(run.precision[i]), _num(run.reward[i]), _num(run.knn[i]),
                              _num(run.probe[i]), str(run.path)])
        seeds = {run.base: run.seed for run in runs}
        for name, per_base in (control or {}).items():
            for base, scores in per_base.items():
                out.writerow([name, seeds[base], "", "", "", "", "", "",
                              _num(float(scores.get("eval_knn_accuracy", math.nan))),
                              _num(float(scores.get("eval_linear_probe_accuracy", math.nan))), base])


def _num(x: float) -> str:
    return "" if not np.isfinite(x) else f"{x:.6g}"


def web_lines(runs: list[RunCurves]) -> list[str]:
    """The web every image run searched, with its size and the base rate of the target's kind (the
    share of the web a random draw finds relevant), from the corpus's corpus.json when it is here."""
    from explorer.web.presets import DEFAULT_PRESET, corpus_location

    webs = set()
    for run in runs:
        config = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
        local = (config.get("search") or {}).get("backend", "local") == "local"
        if config.get("modality", "image") != "image" or not local:
            continue
        target = config.get("target") or {}
        kinds = tuple(target.get("relevant") or ())
        webs.add((str(config.get("corpus") or DEFAULT_PRESET), target.get("name", "fashion-mnist"), kinds))
    lines = []
    for corpus, kind, kinds in sorted(webs):
        root = corpus_location(corpus)[0]
        if not (root / "corpus.json").exists():
            lines.append(f"Web: {corpus} (its corpus.json is not on this machine: base rate unknown).")
            continue
        meta = json.loads((root / "corpus.json").read_text())
        rate = (meta.get("base_rate") or {}).get(kind)
        name = Path(kind).name  # a target folder by its name, not the path it had on the machine that ran it
        if kinds:  # the kinds the run's hidden truth counts (`target.relevant`)
            from explorer.run.image import GroundTruth
            from explorer.web.corpus import WebCorpus

            rate = GroundTruth(WebCorpus(root), frozenset(kinds)).base_rate()
            name = f"{name} target's kind ({', '.join(kinds)})"
        else:
            name = f"{name} target's kind"
        lines.append(f"Web: {corpus}, {meta['items']:,} images; base rate of the {name}: "
                     + (f"{rate:.1%}." if rate is not None else "not recorded by this corpus's build."))
    return lines


def write_report(paths: list[Path], out: Path, *, title: str = "explorer report",
                 sections: tuple[str, ...] = ("efficiency", "representation", "pictures")) -> Path:
    """Reads the runs, writes out/report.md, out/runs.csv and the PNG plots; returns report.md."""
    runs = [read_run(p) for p in find_runs(paths)]
    out.mkdir(parents=True, exist_ok=True)
    groups, control = group(runs), controls(runs)
    write_runs_csv(runs, out / "runs.csv", control)
    lines = [f"# {title}", "", f"{len(runs)} runs: " + ", ".join(f"{k} ({len(v)})" for k, v in groups.items()),
             "", "Mean ± 95% confidence half-width over seeds (Student t); every run's curve is in `runs.csv`.", ""]
    web = web_lines(runs)
    if web:
        lines += [*web, ""]
    if "efficiency" in sections:
        plot_efficiency(groups, out)
        lines += ["## Acquisition efficiency", "",
                  "Precision = share of accepted images whose hidden ground truth is target-relevant.", "",
                  *efficiency_table(groups), "", "![precision](precision_vs_queries.png)",
                  "![reward](reward_vs_queries.png)", ""]
    if "representation" in sections:
        plot_accuracy(groups, control, out)
        lines += ["## Representation on the target's held-out split", "",
                  "All encoders of a seed start from the same base and train the same number of SSL steps.", "",
                  *representation_table(groups, control), "", *pixel_gate(control), "",
                  *gain_per_relevant(groups, control), "",
                  "![accuracy](accuracy_vs_images.png)", ""]
    if "pictures" in sections:
        lines += gallery_section(groups, out)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(_summary(groups, control), indent=1) + "\n")
    return report


def _summary(groups: dict[str, list[RunCurves]], control: dict[str, dict[str, dict]]) -> dict:
    """Machine-readable final numbers: per condition, mean/ci95/n of each final quantity."""
    summary = {name: {key: _stat(s.get(key) for s in per_seed.values()) for key in ACCURACIES}
               for name, per_seed in control.items() if per_seed}
    for name, runs in groups.items():
        summary[name] = {key: _stat(getattr(r, attr)[-1] for r in runs)
                         for key, attr in (("queries", "queries"), ("accepted", "accepted"),
                                           ("relevant", "relevant"), ("precision", "precision"),
                                           ("cumulative_reward", "reward"),
                                           ("eval_knn_accuracy", "knn"), ("eval_linear_probe_accuracy", "probe"))}
    return summary


def _stat(values) -> dict:
    mean, half, n = mean_ci(values)
    return {"mean": mean if np.isfinite(mean) else None, "ci95": half if np.isfinite(half) else None, "n": n}
