"""isoFLOP sweep: real tiny LM runs on Wikipedia leads, resumable rows, strict config, law recovery."""

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest

from explorer.analysis.sweep import (
    FIT_FILE,
    ISOFLOP_PLOT,
    LAW_PLOT,
    ROWS_FILE,
    TOKENIZER_FILE,
    SweepConfig,
    append_row,
    bootstrap_law,
    fit_run_dir,
    load_sweep_config,
    prepare_text,
    read_rows,
    resolve_size,
    run_key,
    run_sweep,
    train_one,
)
from explorer.cli import build_parser, main
from explorer.run.config import ConfigError, LMRoutingConfig
from learners.budget import ScalingLaw, fit_scaling_law
from learners.lm import LMConfig, build_lm, non_embedding_params

TINY_SWEEP = """\
name: tiny
budgets: [2.0e8, 4e8]        # the second as YAML reads it: a string, parsed by the config
sizes: [3000, 13000, 27000]  # d_model 16 x 1 layer, 32 x 1, 32 x 2
seq_len: 32
batch_size: 4
vocab_size: 512
max_train_docs: 400
eval_tokens: 2048
bootstrap_resamples: 5
fit_starts: 4
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The tiny sweep run once through the CLI (with a plan), plus its folder and stdout."""
    root = tmp_path_factory.mktemp("sweep")
    config = root / "tiny.yaml"
    config.write_text(TINY_SWEEP)
    out = root / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["sweep", str(config), "--out", str(out), "--quiet", "--budget-flops", "1e9"])
    assert code == 0
    return load_sweep_config(config), out, stdout.getvalue()


def test_sweep_rows_spend_the_budget_as_6nd(tiny_sweep):
    cfg, out, _ = tiny_sweep
    rows = read_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(run_key(b, str(s)) for b in (2e8, 4e8) for s in cfg.sizes)
    for row in rows:
        shape = resolve_size(row["size"])[1]
        model = build_lm(LMConfig(shape=shape, vocab_size=512, seq_len=32))
        assert row["n_params"] == non_embedding_params(model)  # the N the law uses is the model's own
        assert row["tokens"] == row["steps"] * 4 * 32
        assert row["flops"] == pytest.approx(6 * row["n_params"] * row["tokens"])
        assert row["flops"] == pytest.approx(row["budget_flops"], rel=0.1)  # whole steps round D
        assert math.isfinite(row["loss"])
    longest = max(rows, key=lambda r: r["steps"])
    assert longest["loss"] < math.log(512)  # better than a uniform guess over the vocabulary


def test_sweep_writes_fit_and_plots(tiny_sweep):
    cfg, out, stdout = tiny_sweep
    fit = json.loads((out / FIT_FILE).read_text())
    assert set(fit["law"]) == {"E", "A", "B", "alpha", "beta"}
    assert [o["extrapolated"] for o in fit["compute_optimal"]] == [False, False, True]
    assert fit["compute_optimal"][-1]["flops"] == pytest.approx(4e8 * cfg.extrapolate_factor)
    assert all(o["n_opt"] * o["d_opt"] * 6 == pytest.approx(o["flops"]) for o in fit["compute_optimal"])
    assert set(fit["intervals"]["bounds"]) >= {"E", "alpha", "beta", "n_exponent"}
    assert fit["intervals"]["n_resamples"] + fit["intervals"]["dropped"] == cfg.bootstrap_resamples
    for name in (ISOFLOP_PLOT, LAW_PLOT):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert (out / TOKENIZER_FILE).exists()
    assert "N_opt=" in stdout and "decision:" in stdout  # summary table, then the plan
    baselines = json.loads((out / "baselines.json").read_text())  # the count floor, on the same tokens
    assert 0 < baselines["bigram"] < baselines["unigram"] and baselines["train_tokens"] > 0
    assert f"bigram {baselines['bigram']:.4f}" in stdout


def test_rerun_skips_finished_rows_and_repairs_a_torn_one(tiny_sweep):
    cfg, out, _ = tiny_sweep
    rows_path = out / ROWS_FILE
    before = rows_path.read_bytes()
    tokenizer_mtime = (out / TOKENIZER_FILE).stat().st_mtime_ns
    again = run_sweep(cfg, out, progress=False)
    assert again.trained == 0 and rows_path.read_bytes() == before
    # An interrupted sweep: the last run's row is lost and a half-written line is left behind.
    lines = before.decode().splitlines(keepends=True)
    rows_path.write_text("".join(lines[:-1]) + lines[-1][:25])
    resumed = run_sweep(cfg, out, progress=False)
    assert resumed.trained == 1
    after = rows_path.read_text().splitlines(keepends=True)
    assert after[:-1] == lines[:-1] and len(after) == len(lines)
    redone, original = json.loads(after[-1]), json.loads(lines[-1])
    assert redone["key"] == original["key"] and redone["loss"] == pytest.approx(original["loss"], abs=1e-4)
    assert (out / TOKENIZER_FILE).stat().st_mtime_ns == tokenizer_mtime  # trained once per sweep


def test_run_folder_refuses_a_config_that_changes_results(tiny_sweep, tmp_path):
    _, out, _ = tiny_sweep
    changed = tmp_path / "changed.yaml"
    changed.write_text(TINY_SWEEP.replace("seq_len: 32", "seq_len: 16"))
    with pytest.raises(ConfigError, match="seq_len"):
        run_sweep(load_sweep_config(changed), out, progress=False)


@pytest.mark.parametrize("line, field", [
    ("batch_sise: 4", "batch_sise"),
    ("sizes: [3000, huge]", "sizes[1]"),
    ("budgets: [2.0e8, lots]", "budgets[1]"),
    ("budgets: [-1.0e8]", "budgets[0]"),
    ("seq_len: long", "seq_len"),
    ("train_text: web", "train_text"),
    ("budgets: [1.0e5]", "min_steps"),
])
def test_malformed_config_names_the_field(tmp_path, capsys, line, field):
    key = line.split(":")[0]
    text = "\n".join(x for x in TINY_SWEEP.splitlines() if not x.startswith(key + ":")) + f"\n{line}\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_sweep_config(path)
    assert main(["sweep", str(path), "--out", str(tmp_path / "run")]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fit_recovers_a_known_law_from_synthetic_rows(tmp_path):
    """Rows from 5 budgets x 7 sizes on isoFLOP lines, losses from a known law: the fit, the closed-form
    N_opt and the isoFLOP parabolas all recover it."""
    truth = ScalingLaw(E=1.8, A=60.0, B=900.0, alpha=0.35, beta=0.45)
    budgets = np.geomspace(1e12, 1e16, 5)
    for c in budgets:
        n_opt = float(truth.compute_optimal(c)[0])
        for n in n_opt * np.geomspace(1 / 8, 8, 7):
            d = c / (6 * n)
            append_row(tmp_path, {"key": run_key(c, f"{n:.0f}"), "budget_flops": c, "size": f"{n:.0f}",
                                  "n_params": n, "tokens": d, "flops": 6 * n * d, "loss": float(truth.loss(n, d))})
    cfg = SweepConfig(budgets=tuple(budgets), bootstrap_resamples=10)
    fit = fit_run_dir(cfg, tmp_path)
    for name, value in truth.as_dict().items():
        assert fit["law"][name] == pytest.approx(value, rel=0.05), name
    for optimum in fit["compute_optimal"]:
        true_n, true_d = (float(x) for x in truth.compute_optimal(optimum["flops"]))
        assert optimum["n_opt"] == pytest.approx(true_n, rel=0.05)
        assert optimum["d_opt"] == pytest.approx(true_d, rel=0.05)
    assert fit["isoflop"]["a"] == pytest.approx(truth.n_exponent, abs=0.03)
    assert json.loads((tmp_path / FIT_FILE).read_text())["law"] == fit["law"]
    assert (tmp_path / ISOFLOP_PLOT).read_bytes().startswith(PNG_MAGIC)


# (N, D, held-out loss) of the 15 runs of `explorer sweep configs/isoflop.yaml`
MEASURED_RUNS = [
    [6736, 742400, 4.7721], [13408, 372736, 4.7991], [26784, 186880, 5.1984], [50368, 99328, 5.477],
    [100672, 49664, 5.8008], [6736, 2474496, 4.5068], [13408, 1243136, 4.3714], [26784, 622080, 4.4822],
    [50368, 330752, 5.0597], [100672, 165376, 5.2783], [6736, 7422976, 4.3666], [13408, 3728896, 4.1588],
    [26784, 1866752, 4.1382], [50368, 992768, 4.1137], [100672, 496640, 4.314],
]


def test_bootstrap_of_measured_runs_completes():
    """Resamples of the real sweep can refit to alpha ~16 with A overflowing or E = 0; every resample
    is either used or counted as dropped (the fault-injected version is in tests/learners/test_budget.py)."""
    n, d, loss = (np.array(col, float) for col in zip(*MEASURED_RUNS))
    point = fit_scaling_law(n, d, loss).law
    intervals = bootstrap_law(SweepConfig(bootstrap_resamples=8), n, d, loss, point)
    assert intervals.n_resamples + intervals.dropped == 8 and intervals.n_resamples >= 2
    assert all(np.isfinite(bound).all() and bound[0] <= bound[1] for bound in intervals.bounds.values())


def test_sweep_command_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["sweep", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "6N" in help_text and "--budget-flops" in help_text and "sweep.jsonl" in help_text


def test_routed_rows_carry_what_the_routers_did_and_the_sanity_losses(tiny_sweep):
    """A routed run's row: the mean gate and evaluation load of its routers; hash rows the loss with
    scrambled routing ids, S-BASE rows the loss on the balanced assignment and the agreement of the
    two assignments; dense rows none of these."""
    cfg, out, _ = tiny_sweep
    text = prepare_text(cfg, out)
    rows = {router: train_one(dataclasses.replace(cfg, lm=LMRoutingConfig(router=router, num_experts=2)), 2e8,
                              cfg.sizes[1], text) for router in ("hash", "sbase", "dense-wide")}
    hashed, sbase, wide = rows["hash"], rows["sbase"], rows["dense-wide"]
    assert hashed["mean_gate"] == 1.0 and hashed["eval_load"] >= 1 and math.isfinite(hashed["loss_scrambled_ids"])
    assert hashed["loss_scrambled_ids"] != hashed["loss"] and "agreement" not in hashed
    assert 0 < sbase["mean_gate"] < 1 and 0 <= sbase["agreement"] <= 1 and math.isfinite(sbase["loss_balanced_eval"])
    assert "loss_scrambled_ids" not in sbase
    assert not {"mean_gate", "loss_scrambled_ids", "loss_balanced_eval"} & set(wide)
    assert wide["n_params"] == wide["n_params_total"] > hashed["n_params"]  # every parameter active
