import json
import math

import numpy as np
import pytest
import torch

from explorer.analysis.plan import format_plan, load_observations, plan_from_runs, repeat_decay_from_run
from learners.budget import (
    AcquisitionRound,
    RoutedLaw,
    ScalingLaw,
    bootstrap_intervals,
    decide,
    effective_tokens,
    fit_repeat_decay,
    fit_scaling_law,
    isoflop_fit,
    overfit_passes,
    plan_with_costs,
)
from learners.flops import (
    CATEGORIES,
    SIZE_TABLE,
    AcquisitionCosts,
    FlopLedger,
    ModelShape,
    embedding_params,
    nearest_size,
    swiglu_ffn_dim,
)

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _synthetic_runs(noise: float, seed: int, n_sizes: int = 7, n_tokens: int = 9):
    """Losses from the Chinchilla law on a grid of N in 1e6..1e9 and D in 1e7..1e11, times exp(N(0, noise))."""
    n, d = (x.ravel() for x in np.meshgrid(np.logspace(6, 9, n_sizes), np.logspace(7, 11, n_tokens)))
    loss = CHINCHILLA.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.shape))
    return n, d, loss


@pytest.fixture(scope="module")
def chinchilla_fit():
    n, d, loss = _synthetic_runs(noise=1e-3, seed=0)
    return fit_scaling_law(n, d, loss)


def test_fit_recovers_known_law_within_5_percent(chinchilla_fit):
    assert chinchilla_fit.n_observations == 63
    for name, true in CHINCHILLA.as_dict().items():
        fitted = chinchilla_fit.law.as_dict()[name]
        assert fitted == pytest.approx(true, rel=0.05), name
    assert chinchilla_fit.law.n_exponent == pytest.approx(CHINCHILLA.n_exponent, abs=0.01)


def test_huber_objective_gradient_matches_finite_differences():
    from scipy.optimize import check_grad

    from learners.budget import _objective

    n, d, loss = _synthetic_runs(noise=0.01, seed=4, n_sizes=4, n_tokens=4)
    logs = (np.log(n), np.log(d), np.log(loss), 1e-3)
    for theta in ([6.0, 6.0, 0.5, 0.34, 0.28], [10.0, 3.0, -0.5, 1.0, 0.2]):
        value = lambda t: _objective(t, *logs)[0]  # noqa: E731
        grad = lambda t: _objective(t, *logs)[1]  # noqa: E731
        assert check_grad(value, grad, np.array(theta), epsilon=1e-7) < 1e-4 * max(1.0, np.linalg.norm(grad(theta)))


@pytest.mark.parametrize("flops", [1e17, 1e20, 1e24])
def test_closed_form_optimum_matches_brute_force_search(flops):
    n_opt, d_opt = CHINCHILLA.compute_optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-9)
    n_grid = np.logspace(3, 15, 1_200_001)  # log10 step 1e-5: relative resolution ~2.3e-5
    losses = CHINCHILLA.loss(n_grid, flops / (6 * n_grid))
    n_best = n_grid[np.argmin(losses)]
    assert n_opt == pytest.approx(n_best, rel=1e-3)
    assert CHINCHILLA.loss(n_opt, d_opt) <= losses.min() + 1e-12


def test_isoflop_profiles_recover_the_allocation_exponents():
    rows = []
    for flops in np.logspace(17, 21, 5):
        n_centre = CHINCHILLA.compute_optimal(flops)[0]  # a sweep brackets the optimum by a decade each side
        rows += [(n, flops / (6 * n)) for n in n_centre * np.logspace(-1, 1, 11)]
    n, d = map(np.array, zip(*rows))
    loss = CHINCHILLA.loss(n, d) * np.exp(np.random.default_rng(1).normal(0.0, 1e-3, n.shape))
    fit = isoflop_fit(n, d, loss)
    assert len(fit.budgets) == 5
    assert fit.a == pytest.approx(CHINCHILLA.n_exponent, abs=0.02)  # beta / (alpha + beta) = 0.452
    assert fit.b == pytest.approx(CHINCHILLA.d_exponent, abs=0.02)
    n_pred, _ = fit.predict(1e19)
    assert n_pred == pytest.approx(CHINCHILLA.compute_optimal(1e19)[0], rel=0.1)


def test_isoflop_rejects_budgets_without_a_minimum():
    n = np.array([1e6, 1e7, 1e8] * 2)
    flops = np.repeat([1e18, 1e19], 3)
    with pytest.raises(ValueError, match="compute budgets"):
        isoflop_fit(n, flops / (6 * n), loss=-np.log(n) + np.repeat([0.0, 1.0], 3), flops=flops)  # monotone: no minimum


def test_bootstrap_intervals_cover_the_true_law_on_noisy_runs():
    n, d, loss = _synthetic_runs(noise=0.01, seed=1, n_sizes=6, n_tokens=6)
    point = fit_scaling_law(n, d, loss).law
    intervals = bootstrap_intervals(n, d, loss, point, n_resamples=30, level=0.95, seed=0)
    for name, true in CHINCHILLA.as_dict().items():
        low, high = intervals.bounds[name]
        assert low < high, name
        assert intervals.contains(name, true), (name, true, intervals.bounds[name])
    assert intervals.contains("n_exponent", CHINCHILLA.n_exponent)
    assert intervals.bounds["alpha"][1] - intervals.bounds["alpha"][0] < 0.1  # informative, not unbounded
    small = [bootstrap_intervals(n, d, loss, point, n_resamples=4, seed=7).bounds for _ in range(2)]
    assert small[0] == small[1]  # seeded


BUDGET = 1e17  # Chinchilla's law puts N_opt at 2.85e7 params and D_opt at 5.85e8 tokens here


def test_decide_acquires_when_data_limited():
    decision = decide(CHINCHILLA, BUDGET, tokens_available=1e8, current_params=3e7)
    n_opt, d_opt = CHINCHILLA.compute_optimal(BUDGET)
    assert decision.action == "acquire"
    assert decision.d_target == pytest.approx(d_opt)
    assert f"{d_opt - 1e8:.3g}" in decision.reason and f"{d_opt:.3g}" in decision.reason


def test_decide_grows_a_model_far_below_n_opt():
    decision = decide(CHINCHILLA, BUDGET, tokens_available=1e10, current_params=1e6)
    assert decision.action == "grow_model"
    assert decision.n_target == SIZE_TABLE["30M"].non_embedding_params  # nearest to N_opt = 2.85e7
    assert decision.d_target == pytest.approx(BUDGET / (6 * decision.n_target))
    assert "30M" in decision.reason and f"{CHINCHILLA.compute_optimal(BUDGET)[0]:.3g}" in decision.reason


def test_decide_trains_when_balanced():
    decision = decide(CHINCHILLA, BUDGET, tokens_available=1e9, current_params=3e7)
    assert decision.action == "train"
    assert decision.n_target == 3e7
    assert decision.d_target == pytest.approx(BUDGET / (6 * 3e7))
    assert f"{BUDGET / (6 * 3e7):.3g}" in decision.reason and "3e+07" in decision.reason


def test_decide_rejects_a_spent_budget():
    with pytest.raises(ValueError, match="need budget_flops > 0"):
        decide(CHINCHILLA, 0.0, tokens_available=1e9, current_params=3e7)


def test_effective_tokens_discount_repeats():
    u = 1.0e4
    assert effective_tokens(u, 0.5 * u) == pytest.approx(0.5 * u)  # not all seen once yet
    assert effective_tokens(u, u) == pytest.approx(u)
    assert effective_tokens(u, 2 * u) == pytest.approx(2 * u, rel=0.04)  # one repeat is almost new data
    many = effective_tokens(u, np.array([10, 100, 1000]) * u)
    assert np.all(np.diff(many) > 0) and 0.99 * u * (1 + 15.4) < many[-1] <= u * (1 + 15.4)
    assert effective_tokens(2 * u, 20 * u) > effective_tokens(u, 20 * u)  # new tokens beat repeats


PRIOR = ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)


def _plan(budget, flops_per_round, tokens_per_round=3.0e3, **kw):
    args = {"unique_tokens": 2.7e4, "trained_tokens": 6.5e4, "current_params": 1.0e6, "rounds_left": 6,
            "acquisition": AcquisitionRound(flops=flops_per_round, tokens=tokens_per_round)} | kw
    return plan_with_costs(PRIOR, budget, **args)


def test_plan_with_costs_acquires_only_when_a_round_pays_for_its_flops():
    assert _plan(1.0e13, 7.0e11).action == "acquire"  # rounds are 7% of the budget: worth their tokens
    small = _plan(1.0e12, 7.0e11)  # one round would eat 70% of the budget's training
    assert small.action == "train" and "does not pay" in small.reason
    assert _plan(1.0e13, 7.0e11, tokens_per_round=0.0).action == "train"  # rounds that add nothing
    assert _plan(1.0e13, 1.0e13).action == "train"  # a round costs the whole budget
    # the first iteration measures a round; no rounds left means no acquisition
    assert _plan(1.0e13, 0.0, acquisition=None).action == "acquire"
    assert _plan(1.0e13, 7.0e11, rounds_left=0).action == "train"
    # a budget the run cannot spend on training (its iterations end first) leaves FLOPs for rounds
    assert _plan(1.0e12, 7.0e11, max_train_tokens=3.0e4).action == "acquire"


def test_plan_with_costs_grows_when_the_law_rewards_parameters():
    from learners.flops import ModelShape

    big = {"micro": ModelShape(d_model=192, n_layers=7, n_heads=6, ffn_dim=512)}
    law = ScalingLaw(E=1.0, A=1.0e3, B=1.0e-6, alpha=0.3, beta=0.3)  # data is worth nothing
    d = plan_with_costs(law, 1.0e14, unique_tokens=2.7e4, trained_tokens=6.5e4, current_params=1.0e6,
                        acquisition=AcquisitionRound(flops=7.0e11, tokens=3.0e3), rounds_left=6, size_table=big)
    assert d.action == "grow_model" and d.n_target == big["micro"].non_embedding_params
    assert plan_with_costs(law, 1.0e14, unique_tokens=2.7e4, trained_tokens=6.5e4, current_params=1.0e6,
                           acquisition=AcquisitionRound(flops=7.0e11, tokens=3.0e3), rounds_left=6).action == "train"


def _repeat_curve(r_star, unique=3.0e4, beta=0.3658):
    """Held-out loss of a run training on `unique` tokens: the law's D-term with discounted repeats,
    then an overfitting rise (loss up again) the discount cannot express."""
    trained = unique * np.arange(1, 41) / 2.0
    loss = 2.5 + 200.0 * effective_tokens(unique, trained, r_star) ** -beta
    return trained, loss + 0.02 * np.maximum(trained / unique - 12.0, 0.0)


@pytest.mark.parametrize("r_star", [2.0, 6.0])
def test_fit_repeat_decay_recovers_r_star_from_the_curve_up_to_its_lowest_loss(r_star):
    trained, loss = _repeat_curve(r_star)
    fit = fit_repeat_decay(3.0e4, trained, loss, beta=0.3658)
    assert fit.r_star == pytest.approx(r_star, rel=0.05) and fit.rmse < 5e-3
    assert fit.points == int(np.argmin(loss)) + 1 and fit.overfit_after == pytest.approx(trained[fit.points - 1] / 3.0e4)
    assert fit_repeat_decay(3.0e4, trained[::-1], loss[::-1], beta=0.3658).r_star == fit.r_star  # any order
    # a start-up plateau (the loss falls slowly at first) is left out: the fit starts at the steepest fall
    plateau = fit_repeat_decay(3.0e4, np.r_[0.5e4, trained], np.r_[loss[0] + 0.01, loss], beta=0.3658)
    assert plateau.points == fit.points and plateau.r_star == pytest.approx(fit.r_star)
    with pytest.raises(ValueError, match="need >= 4 evaluations"):  # lowest at the third evaluation
        fit_repeat_decay(3.0e4, trained[:3], loss[:3] + [0.0, 0.0, -1.0], beta=0.3658)
    with pytest.raises(ValueError, match="fell for 2 evaluation"):  # up, then one fall: nothing to fit
        fit_repeat_decay(3.0e4, [1.5e4, 3.0e4, 6.0e4, 1.2e5], [5.0, 6.0, 6.0, 4.99], beta=0.3658)


def test_a_small_r_star_turns_training_on_repeats_into_acquiring():
    """The benchmark's 5e12 case: the first round costs half the budget. With R* = 15.4 thirty passes
    over the target still look worth 13x its tokens, so the planner trains; with R* fitted at this
    scale (about 6) the same round pays."""
    args = {"unique_tokens": 3.05e4, "trained_tokens": 6.55e4, "current_params": 1.0e6, "rounds_left": 60,
            "acquisition": AcquisitionRound(flops=6.56e11, tokens=3.66e4, measured=False),
            "first_round_extra": 1.75e12}
    assert plan_with_costs(PRIOR, 4.6e12, **args).action == "train"
    assert plan_with_costs(PRIOR, 4.6e12, **args, r_star=6.0).action == "acquire"
    assert plan_with_costs(PRIOR, 2.6e12, **args, r_star=6.0).action == "train"  # too small a budget still


def test_past_its_overfitting_point_training_is_worth_nothing_so_the_plan_acquires():
    """With `max_passes` (a learner that keeps its best weights: training beyond that many passes over
    the unique tokens changes nothing) a run already past it can only gain from new tokens, so it
    acquires where plain repeats (R* = 15.4: every pass still worth a little) would train, and says
    how many rounds its plan runs."""
    args = {"unique_tokens": 4.0e4, "trained_tokens": 2.0e5, "current_params": 1.0e6, "rounds_left": 40,
            "acquisition": AcquisitionRound(flops=5.0e11, tokens=2.0e3)}
    plain = plan_with_costs(PRIOR, 3.0e12, **args)
    assert plain.action == "train" and plain.rounds == 0
    capped = plan_with_costs(PRIOR, 3.0e12, **args, max_passes=3.0)
    assert capped.action == "acquire" and capped.rounds > 1 and "up to 3 passes" in capped.reason
    assert plan_with_costs(PRIOR, 3.0e12, **args, max_passes=100.0).action == "train"  # never reached: as before


def test_an_overfitting_point_that_moves_with_the_unique_tokens_buys_fewer_rounds():
    """Measured on 4e4 tokens, 3 passes; with an exponent the point lies further out on the larger
    sets that rounds make, so more of the budget's training counts there and the plan buys fewer
    rounds than the fixed point's; at the tokens it was measured on the two agree."""
    args = {"unique_tokens": 4.0e4, "trained_tokens": 2.0e5, "current_params": 1.0e6, "rounds_left": 60,
            "acquisition": AcquisitionRound(flops=2.0e11, tokens=3.0e3), "max_passes": 3.0}
    fixed = plan_with_costs(PRIOR, 8.0e12, **args)
    moving = plan_with_costs(PRIOR, 8.0e12, **args, passes_exponent=0.5, passes_at=4.0e4)
    assert fixed.action == moving.action == "acquire" and 0 < moving.rounds < fixed.rounds
    assert moving.d_target > fixed.d_target and "^0.5 beyond" in moving.reason
    assert overfit_passes(3.0, np.array([4.0e4, 1.6e5]), 0.5, 4.0e4) == pytest.approx([3.0, 6.0])
    assert overfit_passes(3.0, 1.6e5) == 3.0
    with pytest.raises(ValueError, match="passes_at"):
        plan_with_costs(PRIOR, 8.0e12, **args, passes_exponent=0.5)


def test_overfit_exponent_is_the_slope_of_log_passes_over_log_unique_tokens(tmp_path, capsys):
    from explorer.analysis.plan import format_overfit_exponent, overfit_exponent

    assert overfit_exponent([(3.0e4, 3.0), (1.2e5, 6.0)]) == pytest.approx(0.5)
    assert overfit_exponent([(1.2e5, 3.0), (3.0e4, 3.0), (6.0e4, 3.0)]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two sets"):
        overfit_exponent([(3.0e4, 3.0), (3.5e4, 4.0)])
    runs = []
    for unique, overfit in ((3.0e4, 12.0), (1.2e5, 24.0)):  # curves that rise after 12 and 24 passes
        run = tmp_path / f"u{unique:.0f}"
        run.mkdir()
        (run / "config.yaml").write_text("modality: text\n")
        trained = unique * np.arange(1, 61) / 2.0
        loss = 2.5 + 200.0 * effective_tokens(unique, trained, 4.0) ** -0.3658
        loss = loss + 0.02 * np.maximum(trained / unique - overfit, 0.0)
        rows = [{"iteration": i, "tokens_available": unique, "lm_size": "nano", "tokens_trained": float(t),
                 "eval_loss": float(v)} for i, (t, v) in enumerate(zip(trained, loss))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    text = format_overfit_exponent(runs)
    assert "text.max_passes 12, text.max_passes_at 30000, text.max_passes_exponent 0.5)" in text
    from explorer.cli import main  # explorer plan --repeats RUN RUN: each run's R*, then the exponent

    assert main(["plan", "--repeats", *map(str, runs)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("R* = ") == 2 and text in printed


def test_repeat_decay_from_run_reads_a_target_only_run_and_refuses_others(tmp_path):
    from explorer.run.config import PRIOR_LAW

    trained, loss = _repeat_curve(4.0)
    (tmp_path / "config.yaml").write_text("modality: text\n")
    rows = [{"iteration": i, "tokens_available": 30000, "lm_size": "nano", "tokens_trained": float(t),
             "eval_loss": float(v)} for i, (t, v) in enumerate(zip(trained, loss))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = repeat_decay_from_run(tmp_path)
    assert PRIOR_LAW["beta"] == 0.3658 and fit.r_star == pytest.approx(4.0, rel=0.05)
    rows[5]["tokens_available"] = 31000  # a round acquired text: repeats are no longer counted right
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="its text grew"):
        repeat_decay_from_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics"):
        repeat_decay_from_run(tmp_path / "missing")


def test_flop_ledger_round_trips_and_rejects_unknown_categories():
    ledger = FlopLedger(costs=AcquisitionCosts(flops_per_query=1e9))
    ledger.add_training(n_params=1e6, tokens=1e7)
    ledger.add_queries(10)
    ledger.add_fetch(n_bytes=1_000_000, n_items=50)
    ledger.add_scoring(50)
    assert ledger.spent["train"] == 6e13 and ledger.spent["query"] == 1e10
    assert ledger.spent["score"] == pytest.approx(2 * 1.06e7 * 128 * 50)
    state = json.loads(json.dumps(ledger.state_dict()))  # plain data, fits in a run's checkpoint
    restored = FlopLedger()
    restored.load_state_dict(state)
    assert restored.spent == ledger.spent and restored.total == ledger.total
    assert set(restored.spent) == set(CATEGORIES)
    assert restored.remaining(ledger.total + 5.0) == 5.0
    restored.add("eval", 7.0)  # logged, not charged
    assert restored.total == ledger.total + 7.0 and restored.remaining(ledger.total + 5.0) == 5.0
    with pytest.raises(KeyError, match="valid"):
        ledger.add("training", 1.0)
    with pytest.raises(KeyError):
        restored.load_state_dict({"spent": {"bogus": 1.0}})


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_param_count_matches_a_real_llama(n_kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ModelShape(d_model=128, n_layers=4, n_heads=4, ffn_dim=swiglu_ffn_dim(128), n_kv_heads=n_kv_heads)
    vocab = 256
    model = LlamaForCausalLM(LlamaConfig(**shape.llama_config_kwargs(vocab), tie_word_embeddings=False))
    named = dict(model.named_parameters())
    embeddings = named["model.embed_tokens.weight"].numel() + named["lm_head.weight"].numel()
    total = sum(p.numel() for p in model.parameters())
    assert total - embeddings == shape.non_embedding_params
    assert embeddings == embedding_params(shape, vocab)
    assert 5e5 < shape.non_embedding_params < 2e6
    torch.manual_seed(0)
    assert model(torch.randint(0, vocab, (1, 8))).logits.shape == (1, 8, vocab)


def test_size_table_is_ordered_and_near_its_labels():
    sizes = [shape.non_embedding_params for shape in SIZE_TABLE.values()]
    assert sizes == sorted(sizes)
    for label, size in zip(SIZE_TABLE, sizes):
        assert size == pytest.approx(float(label.rstrip("M")) * 1e6, rel=0.1), label
    assert nearest_size(2.9e7)[0] == "30M" and nearest_size(1.5e6)[0] == "1M" and nearest_size(1e12)[0] == "100M"


def test_plan_from_a_csv_file_fits_and_explains(tmp_path):
    n, d, loss = _synthetic_runs(noise=1e-3, seed=2, n_sizes=5, n_tokens=5)
    path = tmp_path / "runs.csv"
    path.write_text("n_params,tokens,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in zip(n, d, loss)))
    plan = plan_from_runs(path, budget_flops=BUDGET, tokens_available=1e8, current_params=3e7, n_resamples=5)
    assert plan.fit.n_observations == 25
    assert plan.n_opt == pytest.approx(CHINCHILLA.compute_optimal(BUDGET)[0], rel=0.1)
    assert plan.decision.action == "acquire"
    text = format_plan(plan)
    assert "decision: acquire" in text and f"{plan.n_opt:.3g}" in text and "bootstrap CI" in text
    assert len(text.splitlines()) >= 9


def test_plan_reads_json_and_defaults_to_the_largest_run(tmp_path):
    n, d, loss = _synthetic_runs(noise=1e-3, seed=3, n_sizes=5, n_tokens=5)
    runs = [{"n_params": a, "tokens": b, "loss": c, "name": f"run{i}"} for i, (a, b, c) in enumerate(zip(n, d, loss))]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": runs}))
    assert load_observations(path) == load_observations(runs)
    plan = plan_from_runs(path, budget_flops=BUDGET, tokens_available=1e12, n_resamples=0)
    assert plan.current_params == 1e9 and plan.intervals is None
    assert plan.decision.action == "train"  # a 1e9 model is already far above N_opt = 2.85e7
    with pytest.raises(KeyError, match="loss"):
        load_observations([{"n_params": 1.0, "tokens": 2.0}])
    lines = tmp_path / "sweep.jsonl"  # as `explorer sweep` writes its runs: one JSON object per line
    lines.write_text("".join(json.dumps(run) + "\n" for run in runs) + "\n")
    assert load_observations(lines) == load_observations(runs)
    lines.write_text(json.dumps(runs[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"sweep.jsonl:2: not a JSON object"):
        load_observations(lines)


def test_law_rejects_non_positive_parameters():
    with pytest.raises(ValueError, match=r"all law parameters must be > 0, got ScalingLaw\(.*alpha=-0\.1"):
        ScalingLaw(E=1.0, A=1.0, B=1.0, alpha=-0.1, beta=0.3)
    assert math.isfinite(float(CHINCHILLA.loss(1e6, 1e7)))


def test_bootstrap_drops_and_counts_degenerate_refits(monkeypatch):
    import learners.budget as budget

    law = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    n = np.repeat([1e7, 3e7, 1e8, 3e8], 4)
    d = np.tile([1e9, 3e9, 1e10, 3e10], 4)
    real, calls = budget._law_from_theta, {"n": 0}

    def every_third_runs_off(theta):  # injected fault: a refit that ends at A = inf
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise OverflowError("A = exp(700) overflows")
        return real(theta)

    monkeypatch.setattr(budget, "_law_from_theta", every_third_runs_off)
    intervals = bootstrap_intervals(n, d, law.loss(n, d), law, n_resamples=9)
    assert (intervals.dropped, intervals.n_resamples) == (3, 6)
    assert intervals.contains("alpha", 0.34)


def test_plan_with_costs_adds_experts_when_the_routed_law_says_they_pay():
    helps = RoutedLaw(a=-0.1, b=-0.05, c=0.0, d=1.0)  # 16 experts: loss x 16^-0.05 = 0.87
    args = {"unique_tokens": 1.0e6, "trained_tokens": 0.0, "current_params": 1.0e6, "rounds_left": 0,
            "acquisition": None}
    d = plan_with_costs(PRIOR, 1.0e13, **args, routed=helps, experts=1, expert_options=(4, 16))
    assert d.action == "add_experts" and d.experts == 16 and d.n_target == 1.0e6
    assert "restart with 16 experts" in d.reason and "now 1" in d.reason
    # the gain shrinks with N: at c = b / -log(1e6) the law's gain is gone at this size
    fades = RoutedLaw(a=-0.1, b=-0.05, c=0.05 / np.log(1.0e6) + 1e-4, d=1.0)
    assert plan_with_costs(PRIOR, 1.0e13, **args, routed=fades, experts=1, expert_options=(4, 16)).action == "train"
    # no routed law, or only counts at or below the current one: never
    assert plan_with_costs(PRIOR, 1.0e13, **args, expert_options=(16,)).action == "train"
    assert plan_with_costs(PRIOR, 1.0e13, **args, routed=helps, experts=16, expert_options=(4, 16)).action == "train"
    # a restart throws away what the current model trained on: with enough trained tokens it does not pay
    trained = plan_with_costs(PRIOR, 1.0e12, **{**args, "trained_tokens": 1.0e7}, routed=helps, experts=1,
                              expert_options=(4, 16))
    assert trained.action == "train"
    assert helps.factor(1.0e6, 1) == 1.0 and helps.factor(1.0e6, 16) == pytest.approx(16 ** -0.05)


def test_explorer_plan_weighs_more_experts_with_a_routed_law(tmp_path, capsys):
    """`explorer plan --routed-law FIT_JSON`: a law where experts lower the loss turns a 'train'
    decision into add_experts at the same active size; one where they raise it leaves the decision
    and says why; a data-limited decision stays 'acquire'; --expert-options alone is an error."""
    from explorer.cli import main

    n, d, loss = _synthetic_runs(noise=1e-3, seed=3, n_sizes=5, n_tokens=5)
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps([{"n_params": a, "tokens": b, "loss": c} for a, b, c in zip(n, d, loss)]))
    helps, hurts = tmp_path / "helps.json", tmp_path / "hurts.json"
    helps.write_text(json.dumps({"a": -0.1, "b": -0.05, "c": 0.0, "d": 1.0, "form": "log L = ..."}))
    hurts.write_text(json.dumps({"a": -0.1, "b": 0.02, "c": 0.0, "d": 1.0}))
    base = ["plan", "--budget", str(BUDGET), "--runs", str(runs), "--resamples", "0"]

    assert main([*base, "--tokens", "1e12"]) == 0
    assert "decision: train" in capsys.readouterr().out  # the 1e9 model is far above N_opt
    assert main([*base, "--tokens", "1e12", "--routed-law", str(helps), "--expert-options", "4", "16"]) == 0
    out = capsys.readouterr().out
    assert "decision: add_experts -> N = 1e+09" in out and "16 experts per routed layer" in out
    plan = plan_from_runs(runs, BUDGET, 1e12, n_resamples=0, routed=RoutedLaw(a=-0.1, b=-0.05, c=0.0, d=1.0),
                          expert_options=(4, 16))
    trained = plan.fit.law.loss(1e9, min(1e12, BUDGET / 6e9))
    assert plan.decision.experts == 16 and f"{float(trained) * 16 ** -0.05:.4f}" in plan.decision.reason
    assert main([*base, "--tokens", "1e12", "--routed-law", str(hurts), "--expert-options", "4", "16"]) == 0
    out = capsys.readouterr().out
    assert "decision: train" in out and "would not beat it" in out
    assert main([*base, "--tokens", "1e3", "--routed-law", str(helps), "--expert-options", "16"]) == 0
    assert "decision: acquire" in capsys.readouterr().out  # experts do not make up for missing tokens
    assert main([*base, "--tokens", "1e12", "--expert-options", "16"]) == 2
    assert "--expert-options needs --routed-law" in capsys.readouterr().err
