"""Compute-budget planning: fit a scaling law to finished runs and decide where the next FLOPs go.

The law is L(N, D) = E + A/N^α + B/D^β (N non-embedding parameters, D training tokens). It is fitted
as in Hoffmann et al. 2022 (approach 3) and its replication by Besiroglu et al. 2024: with
a = log A, b = log B, e = log E the prediction is log L = LSE(a - α log N, b - β log D, e), the
objective is the Huber loss (δ = 1e-3) between that and log observed loss, minimised with L-BFGS
from a grid of starting points, keeping the best. Bootstrap resampling gives percentile intervals.

Approach 2 (isoFLOP profiles) needs no functional form: for each compute budget C, a parabola in
log N through the runs with that C gives N_opt(C), and log-log regressions give N_opt ∝ C^a and
D_opt ∝ C^b. Under C = 6·N·D the law's own optimum is closed-form (`ScalingLaw.compute_optimal`).

Everything here is pure math over arrays; no I/O.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp, softmax
from threadpoolctl import threadpool_limits

from learners.flops import ModelShape, nearest_size, training_flops

LAW_PARAMS = ("E", "A", "B", "alpha", "beta")


@dataclass(kw_only=True, frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^α + B/D^β; E is the irreducible loss of the text distribution."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __post_init__(self):
        if min(self.E, self.A, self.B) <= 0 or min(self.alpha, self.beta) <= 0:
            raise ValueError(f"all law parameters must be > 0, got {self}")

    def loss(self, n_params, tokens):
        n, d = np.asarray(n_params, float), np.asarray(tokens, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def n_exponent(self) -> float:
        """a in N_opt ∝ C^a: β/(α+β)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exponent(self) -> float:
        """b in D_opt ∝ C^b: α/(α+β)."""
        return self.alpha / (self.alpha + self.beta)

    def compute_optimal(self, flops):
        """(N_opt, D_opt) minimising L subject to 6·N·D = C.

        Setting dL/dN = 0 along D = C/(6N) gives αA N^-α = βB D^-β, hence
        N_opt = G (C/6)^(β/(α+β)), D_opt = G^-1 (C/6)^(α/(α+β)), G = (αA/(βB))^(1/(α+β)).
        """
        c6 = np.asarray(flops, float) / 6.0
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return g * c6**self.n_exponent, c6**self.d_exponent / g

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in LAW_PARAMS}


def _grid(*values: float) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclass(kw_only=True, frozen=True)
class FitConfig:
    """How `fit_scaling_law` searches. The grid is the replication's: 6·6·5·5·5 = 4,500 points."""

    huber_delta: float = 1e-3  # residuals in log loss beyond this count linearly (robust to outlier runs)
    a_grid: tuple[float, ...] = _grid(0, 5, 10, 15, 20, 25)  # log A
    b_grid: tuple[float, ...] = _grid(0, 5, 10, 15, 20, 25)  # log B
    e_grid: tuple[float, ...] = _grid(-1, -0.5, 0, 0.5, 1)  # log E
    alpha_grid: tuple[float, ...] = _grid(0, 0.5, 1, 1.5, 2)
    beta_grid: tuple[float, ...] = _grid(0, 0.5, 1, 1.5, 2)
    # L-BFGS runs from the `n_starts` grid points with the lowest objective (the whole grid is
    # scored in one vectorised pass); None runs it from every grid point, as the replication did;
    # 0 only from explicitly given starts (bootstrap refits from the point estimate).
    n_starts: int | None = 24
    max_iter: int = 1000

    def __post_init__(self):
        if self.huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
        if self.n_starts is not None and self.n_starts < 0:
            raise ValueError(f"n_starts must be >= 0 or None, got {self.n_starts}")
        grids = (self.a_grid, self.b_grid, self.e_grid, self.alpha_grid, self.beta_grid)
        if any(len(g) == 0 for g in grids):
            raise ValueError("every initialisation grid needs at least one value")

    def starts(self) -> np.ndarray:
        """(G, 5) starting points as (a, b, e, α, β)."""
        grids = (self.a_grid, self.b_grid, self.e_grid, self.alpha_grid, self.beta_grid)
        return np.array(list(itertools.product(*grids)))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta: np.ndarray, log_n, log_d, log_loss, delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log-space residuals and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, M)
    r = logsumexp(terms, axis=0) - log_loss  # (M,)
    weights = softmax(terms, axis=0)  # d LSE / d term
    dh = np.clip(r, -delta, delta)  # Huber derivative
    grad = np.array([
        dh @ weights[0], dh @ weights[1], dh @ weights[2],
        -(dh * weights[0]) @ log_n, -(dh * weights[1]) @ log_d,
    ])
    return float(_huber(r, delta).sum()), grad


def _grid_objective(starts: np.ndarray, log_n, log_d, log_loss, delta: float) -> np.ndarray:
    """Objective at every start at once: (G,)."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))])
    return _huber(logsumexp(terms, axis=0) - log_loss, delta).sum(axis=1)


@dataclass(kw_only=True, frozen=True)
class LawFit:
    law: ScalingLaw
    objective: float  # summed Huber loss at the optimum
    n_observations: int


def _as_observations(n_params, tokens, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, l = (np.asarray(x, float).ravel() for x in (n_params, tokens, loss))
    if not (len(n) == len(d) == len(l)):
        raise ValueError(f"n_params, tokens and loss differ in length: {len(n)}, {len(d)}, {len(l)}")
    if len(n) < len(LAW_PARAMS):
        raise ValueError(f"need at least {len(LAW_PARAMS)} observations to fit 5 parameters, got {len(n)}")
    if min(n.min(), d.min(), l.min()) <= 0 or not np.isfinite(np.concatenate([n, d, l])).all():
        raise ValueError("n_params, tokens and loss must all be finite and > 0")
    return np.log(n), np.log(d), np.log(l)


def _fit_logs(log_n, log_d, log_loss, config: FitConfig, extra_starts=()) -> tuple[np.ndarray, float]:
    starts = config.starts()
    if config.n_starts is not None and config.n_starts < len(starts):
        scores = _grid_objective(starts, log_n, log_d, log_loss, config.huber_delta)
        starts = starts[np.argsort(scores, kind="stable")[: config.n_starts]]
    starts = np.vstack([np.asarray(extra_starts, float).reshape(-1, 5), starts])
    if len(starts) == 0:
        raise ValueError("no starting points: n_starts=0 needs explicit starts")
    # The objective is ~1e-6 per point, so L-BFGS-B's default ftol (relative to max(|f|, 1)) can stop
    # early; tolerances are set far below the objective's scale.
    options = {"maxiter": config.max_iter, "ftol": 1e-15, "gtol": 1e-10}
    bounds = [(None, None)] * 3 + [(1e-6, None)] * 2  # exponents stay positive
    best_theta, best_value = None, math.inf
    for start in starts:
        with threadpool_limits(limits=1, user_api="blas"):  # 5-vectors: BLAS threads only add contention
            result = minimize(_objective, np.maximum(start, [-np.inf] * 3 + [1e-6] * 2), jac=True,
                              args=(log_n, log_d, log_loss, config.huber_delta), method="L-BFGS-B",
                              bounds=bounds, options=options)
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    if best_theta is None:
        raise RuntimeError("no L-BFGS start produced a finite fit")
    return best_theta, best_value


def _law_from_theta(theta: np.ndarray) -> ScalingLaw:
    a, b, e, alpha, beta = theta
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta))


def fit_scaling_law(n_params, tokens, loss, config: FitConfig | None = None) -> LawFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to observed (N, D, loss) runs (approach 3)."""
    config = config or FitConfig()
    log_n, log_d, log_loss = _as_observations(n_params, tokens, loss)
    theta, value = _fit_logs(log_n, log_d, log_loss, config)
    return LawFit(law=_law_from_theta(theta), objective=value, n_observations=len(log_n))


def _theta(law: ScalingLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


@dataclass(kw_only=True, frozen=True)
class LawIntervals:
    """Percentile bootstrap intervals: name -> (low, high) for E, A, B, alpha, beta, n_exponent, d_exponent."""

    level: float
    n_resamples: int  # refits the intervals are taken over
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    dropped: int = 0  # resamples whose refit ran off to a degenerate law (A, B or E of 0 or inf)

    def contains(self, name: str, value: float) -> bool:
        low, high = self.bounds[name]
        return low <= value <= high


def bootstrap_intervals(n_params, tokens, loss, point: ScalingLaw, *, n_resamples: int = 100,
                        level: float = 0.8, seed: int = 0, config: FitConfig | None = None) -> LawIntervals:
    """Resample runs with replacement, refit each resample, take percentile intervals.

    Each refit starts from the point estimate only (set `config.n_starts` to add the best grid points
    of each resample): a resample of the same runs shares the full-data basin, and on synthetic
    Chinchilla data adding a grid start changed no interval while doubling the time.
    """
    if n_resamples <= 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples > 1 and 0 < level < 1, got {n_resamples}, {level}")
    config = config or FitConfig(n_starts=0)
    log_n, log_d, log_loss = _as_observations(n_params, tokens, loss)
    rng = np.random.default_rng(seed)
    samples, dropped = [], 0
    for _ in range(n_resamples):
        pick = rng.integers(0, len(log_n), len(log_n))
        try:  # a resample that leaves out the runs pinning one term can send it off to 0 or inf
            theta, _ = _fit_logs(log_n[pick], log_d[pick], log_loss[pick], config, extra_starts=_theta(point))
            law = _law_from_theta(theta)
        except (OverflowError, ValueError, FloatingPointError):
            dropped += 1
            continue
        samples.append([*law.as_dict().values(), law.n_exponent, law.d_exponent])
    if len(samples) < 2:
        raise ValueError(f"only {len(samples)} of {n_resamples} bootstrap refits gave a usable law")
    names = (*LAW_PARAMS, "n_exponent", "d_exponent")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.array(samples), [tail, 100 - tail], axis=0)
    return LawIntervals(level=level, n_resamples=len(samples), dropped=dropped,
                        bounds={k: (float(lo), float(hi)) for k, lo, hi in zip(names, low, high)})


@dataclass(kw_only=True, frozen=True)
class IsoFlopFit:
    """Approach 2: N_opt = n_coef·C^a, D_opt = d_coef·C^b, and the per-budget optima they came from."""

    a: float
    b: float
    n_coef: float
    d_coef: float
    budgets: tuple[float, ...]
    n_opt: tuple[float, ...]
    d_opt: tuple[float, ...]

    def predict(self, flops):
        c = np.asarray(flops, float)
        return self.n_coef * c**self.a, self.d_coef * c**self.b


def _group_budgets(flops: np.ndarray, rel_tol: float) -> list[np.ndarray]:
    """Indices of runs sharing one compute budget (equal within `rel_tol` in log space)."""
    order = np.argsort(flops)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if math.log(flops[i] / flops[current[0]]) <= rel_tol:
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    return groups + [np.array(current)]


def isoflop_fit(n_params, tokens, loss, flops=None, rel_tol: float = 0.05) -> IsoFlopFit:
    """Approach 2 over runs grouped by compute budget (given, or 6·N·D when `flops` is None).

    A budget enters the fit only with >= 3 distinct sizes and a parabola whose minimum lies inside
    the sizes swept (an extrapolated vertex is not a measurement).
    """
    n, d, l = (np.asarray(x, float).ravel() for x in (n_params, tokens, loss))
    c = training_flops(n, d) if flops is None else np.asarray(flops, float).ravel()
    budgets, n_opts = [], []
    for group in _group_budgets(c, rel_tol):
        x = np.log(n[group])
        if len(np.unique(x)) < 3:
            continue
        curvature, slope, _ = np.polyfit(x, l[group], 2)  # loss ≈ k2·x² + k1·x + k0, x = log N
        vertex = -slope / (2 * curvature) if curvature > 0 else math.inf
        if not x.min() <= vertex <= x.max():  # no minimum, or the sweep does not bracket it
            continue
        budgets.append(float(np.exp(np.log(c[group]).mean())))
        n_opts.append(float(np.exp(vertex)))
    if len(budgets) < 2:
        raise ValueError(f"need >= 2 compute budgets with >= 3 sizes and a minimum each, got {len(budgets)}")
    budgets, n_opts = np.array(budgets), np.array(n_opts)
    d_opts = budgets / (6.0 * n_opts)
    a, log_n_coef = np.polyfit(np.log(budgets), np.log(n_opts), 1)
    b, log_d_coef = np.polyfit(np.log(budgets), np.log(d_opts), 1)
    return IsoFlopFit(a=float(a), b=float(b), n_coef=float(np.exp(log_n_coef)), d_coef=float(np.exp(log_d_coef)),
                      budgets=tuple(budgets), n_opt=tuple(n_opts), d_opt=tuple(d_opts))


ACTIONS = ("acquire", "grow_model", "train", "add_experts")


@dataclass(kw_only=True, frozen=True)
class Decision:
    action: str  # one of ACTIONS
    n_target: float  # non-embedding parameters to train next (active ones for a routed model)
    d_target: float  # tokens to train on next
    reason: str
    experts: int | None = None  # add_experts: experts per routed layer of the restarted model
    rounds: int | None = None  # plan_with_costs: the acquisition rounds its plan runs from now (this one included)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; valid: {', '.join(ACTIONS)}")


def _sci(x: float) -> str:
    return f"{x:.3g}"


def decide(law: ScalingLaw, budget_flops: float, tokens_available: float, current_params: float, *,
           grow_factor: float = 2.0, size_table: dict[str, ModelShape] | None = None,
           routed: RoutedLaw | None = None, experts: int = 1, expert_options: tuple[int, ...] = ()) -> Decision:
    """What to do with `budget_flops` of remaining training compute.

    - data-limited (compute-optimal D_opt > tokens available): acquire the missing tokens;
    - parameter-limited (current model < N_opt / `grow_factor`): grow to the table size nearest N_opt;
    - otherwise train the current model on min(tokens available, C / 6N) tokens.

    With a `routed` law, a decision that is not `acquire` gives way to restarting the current model
    with more experts per routed layer (`expert_options` above `experts`) when the law predicts a
    lower loss for that (`_with_experts`).
    """
    if budget_flops <= 0 or tokens_available < 0 or current_params <= 0 or grow_factor < 1:
        raise ValueError("need budget_flops > 0, tokens_available >= 0, current_params > 0, grow_factor >= 1")
    _check_experts(experts, expert_options)
    decision = _decide(law, budget_flops, tokens_available, current_params, grow_factor, size_table)
    if routed is None or decision.action == "acquire":  # experts do not make up for missing tokens
        return decision
    return _with_experts(law, decision, routed, budget_flops, tokens_available, current_params, experts,
                         expert_options)


def _check_experts(experts: int, expert_options: tuple[int, ...]) -> None:
    if experts < 1 or any(e < 1 for e in expert_options):
        raise ValueError("experts and expert_options must be >= 1")


def _with_experts(law: ScalingLaw, decision: Decision, routed: RoutedLaw, budget_flops: float,
                  tokens_available: float, current_params: float, experts: int,
                  expert_options: tuple[int, ...]) -> Decision:
    """The decision, or restarting the current model with more experts per routed layer when the
    routed law predicts a lower loss for it: at the same active size (the same FLOPs per token) on
    the tokens the budget trains, against the decision's own predicted loss (the law of the runs,
    at the current experts)."""
    options = sorted(e for e in expert_options if e > experts)
    if not options:
        return decision
    n = float(current_params)
    tokens = min(tokens_available, budget_flops / (6.0 * n))
    own = float(law.loss(decision.n_target, decision.d_target))
    losses = {e: float(law.loss(n, tokens) * routed.factor(n, e) / routed.factor(n, experts)) for e in options}
    best = min(losses, key=losses.get)
    compare = ", ".join(f"E={e}: {v:.4f}" for e, v in losses.items())
    if losses[best] >= own * (1 - 1e-9):
        return replace(decision, reason=f"{decision.reason}; more experts per routed layer would not beat it "
                                        f"(predicted {own:.4f}; {compare})")
    return Decision(action="add_experts", n_target=n, d_target=tokens, experts=best,
                    reason=f"the routed law: restart with {best} experts per routed layer (now {experts}) at the "
                           f"same {n:.3g} active params and train on {tokens:.3g} tokens, predicted loss "
                           f"{losses[best]:.4f} against {own:.4f} for '{decision.action}' ({compare})")


def _decide(law: ScalingLaw, budget_flops: float, tokens_available: float, current_params: float,
            grow_factor: float, size_table: dict[str, ModelShape] | None) -> Decision:
    """`decide` without a routed law."""
    n_opt, d_opt = (float(x) for x in law.compute_optimal(budget_flops))
    optimum = (f"for C={_sci(budget_flops)} FLOPs the compute-optimal split is "
               f"N_opt={_sci(n_opt)} params, D_opt={_sci(d_opt)} tokens")
    if d_opt > tokens_available:
        return Decision(action="acquire", n_target=n_opt, d_target=d_opt,
                        reason=f"data-limited: {optimum}, but only {_sci(tokens_available)} tokens are available "
                               f"({tokens_available / d_opt:.0%} of D_opt); "
                               f"acquire {_sci(d_opt - tokens_available)} more tokens")
    if current_params * grow_factor < n_opt:
        name, shape = nearest_size(n_opt, size_table)
        n_new = float(shape.non_embedding_params)
        if n_new > current_params:
            d_new = min(tokens_available, budget_flops / (6.0 * n_new))
            return Decision(action="grow_model", n_target=n_new, d_target=d_new,
                            reason=f"parameter-limited: {optimum}; the current model has {_sci(current_params)} "
                                   f"params ({n_opt / current_params:.1f}x below N_opt); grow to {name} "
                                   f"({_sci(n_new)} params, d_model={shape.d_model}, n_layers={shape.n_layers}) "
                                   f"and train on {_sci(d_new)} tokens")
    d_train = min(tokens_available, budget_flops / (6.0 * current_params))
    return Decision(action="train", n_target=float(current_params), d_target=d_train,
                    reason=f"balanced: {optimum}; the current model ({_sci(current_params)} params, "
                           f"{current_params / n_opt:.2g}x N_opt) needs no growth and {_sci(tokens_available)} tokens "
                           f"cover D_opt; train on {_sci(d_train)} tokens "
                           f"(predicted loss {float(law.loss(current_params, d_train)):.3f})")


@dataclass(kw_only=True, frozen=True)
class RoutedLaw:
    """log L(N, E) = a·log N + b·log E + c·log N·log E + d, the routed law's form (Clark et al. 2022),
    as `bench/exp_routing.py` fits it (N: dense non-embedding parameters, E experts per routed layer,
    E = 1 dense). The planner uses only its E-dependence: at a fixed N (fixed active FLOPs) going
    from E to E' multiplies the loss by exp((b + c·log N)·(log E' - log E))."""

    a: float
    b: float
    c: float
    d: float

    def factor(self, n_params, experts):
        """L(N, E) / L(N, 1)."""
        return np.exp((self.b + self.c * np.log(np.asarray(n_params, float))) * np.log(np.asarray(experts, float)))


# Repeated tokens are worth less than new ones. After R repeats of U unique tokens a law in D sees
# D' = U + U·R*·(1 - exp(-R/R*)) effective tokens (Muennighoff et al. 2023, data-constrained
# scaling; fitted R*_D ≈ 15.4): about U·(1 + R) for the first few repeats, never more than U·(1 + R*).
REPEAT_DECAY = 15.4


def effective_tokens(unique, trained, r_star: float = REPEAT_DECAY):
    """Effective training tokens of `trained` tokens drawn from `unique` distinct ones (array-safe)."""
    unique, trained = np.asarray(unique, float), np.asarray(trained, float)
    repeats = np.maximum(trained / np.maximum(unique, 1.0) - 1.0, 0.0)
    return np.minimum(trained, unique) + unique * r_star * (1.0 - np.exp(-repeats / r_star))


@dataclass(kw_only=True, frozen=True)
class RepeatFit:
    """R* fitted to one run's held-out loss as it trained again and again on the same tokens."""

    r_star: float
    offset: float  # E' of L = E' + B'·D'^(-beta): the law's shape, the run's own level
    scale: float  # B'
    points: int  # evaluations used: the curve from its steepest fall to its lowest loss
    rmse: float
    overfit_after: float  # repeats (trained / unique) at the lowest loss


def fit_repeat_decay(unique: float, trained, loss, *, beta: float,
                     grid: np.ndarray | None = None) -> RepeatFit:
    """The R* of `effective_tokens` that best explains a run that kept training on `unique` tokens.

    `trained` and `loss` are the run's evaluations (tokens trained so far, held-out loss). The law's
    D-term keeps its exponent `beta`; level and scale are the run's own (L = E' + B'·D'^(-beta), least
    squares for each R* of `grid`, log-spaced 0.3-100 by default, refined about the best). Only the
    curve from its steepest fall to its lowest loss is fitted. Before the steepest fall the loss is
    still in its start-up plateau (warm-up, the first steps of a fresh model), which no power law in
    D has: fitted, that one point moved R* from 5.5 to 18.6 on the benchmark's calibration run. Past
    the lowest loss the model overfits, which discounted repeats cannot express (they only ever add
    less), and the planner should not plan beyond it anyway.
    """
    trained, loss = np.asarray(trained, float), np.asarray(loss, float)
    if trained.shape != loss.shape or trained.ndim != 1 or unique <= 0 or not np.all(np.isfinite(loss)):
        raise ValueError("need unique > 0 and matching 1-d arrays of trained tokens and finite losses")
    order = np.argsort(trained)
    trained, loss = trained[order], loss[order]
    lowest = int(np.argmin(loss))
    fall = -np.diff(loss[:lowest + 1]) / np.diff(trained[:lowest + 1])  # loss lost per token, between evaluations
    steepest = int(np.argmax(fall)) if len(fall) else 0
    trained, loss = trained[steepest:lowest + 1], loss[steepest:lowest + 1]
    if len(trained) < 4 or trained[-1] <= unique:
        raise ValueError(f"the held-out loss fell for {len(trained)} evaluation(s) and "
                         f"{trained[-1] / unique:.1f} pass(es) over the tokens: need >= 4 evaluations and more "
                         "than one pass before its lowest point (train longer, evaluate more often)")
    def fit(r_star: float) -> RepeatFit:
        x = np.column_stack([np.ones_like(trained), effective_tokens(unique, trained, r_star) ** -beta])
        (offset, scale), *_ = np.linalg.lstsq(x, loss, rcond=None)
        rmse = float(np.sqrt(np.mean((x @ (offset, scale) - loss) ** 2)))
        return RepeatFit(r_star=float(r_star), offset=float(offset), scale=float(scale), points=len(trained),
                         rmse=rmse if scale > 0 else math.inf, overfit_after=float(trained[-1] / unique))

    grid = np.geomspace(0.3, 100.0, 121) if grid is None else np.asarray(grid, float)
    fits = [fit(r) for r in grid]
    i = int(np.argmin([f.rmse for f in fits]))
    best = fits[i]
    if not math.isfinite(best.rmse):
        raise ValueError("no R* fits: the held-out loss does not fall with the tokens trained")
    if len(grid) > 2:  # refine between the grid's neighbours of the best
        lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
        refined = fit(float(np.exp(minimize_scalar(lambda v: fit(np.exp(v)).rmse, bounds=(lo, hi),
                                                    method="bounded", options={"xatol": 1e-4}).x)))
        best = min(best, refined, key=lambda f: f.rmse)
    return best


@dataclass(kw_only=True, frozen=True)
class AcquisitionRound:
    """What one more acquisition round costs and adds, as measured on the run's past rounds."""

    flops: float  # queries, fetching and scoring
    tokens: float  # new tokens accepted into training
    measured: bool = True  # False: a bound set before any round ran

    def __post_init__(self):
        if not (self.flops >= 0 and self.tokens >= 0):
            raise ValueError(f"an acquisition round needs flops >= 0 and tokens >= 0, got {self}")


def overfit_passes(max_passes: float, unique, exponent: float = 0.0, at: float | None = None):
    """Passes over `unique` tokens after which training gains nothing: `max_passes`, measured on `at`
    unique tokens, scaled by (unique / at)^exponent (exponent 0: the same at every size)."""
    if not exponent:
        return max_passes
    if not (at and at > 0):
        raise ValueError("a moving overfitting point needs the unique tokens it was measured at (passes_at > 0)")
    return max_passes * (np.asarray(unique, dtype=float) / at) ** exponent


def plan_with_costs(law: ScalingLaw, budget_flops: float, *, unique_tokens: float, trained_tokens: float,
                    current_params: float, acquisition: AcquisitionRound | None, rounds_left: int,
                    first_round_extra: float = 0.0, max_train_tokens: float = math.inf,
                    size_table: dict[str, ModelShape] | None = None, r_star: float = REPEAT_DECAY,
                    max_passes: float | None = None, passes_exponent: float = 0.0,
                    passes_at: float | None = None, deferred_tokens: float = 0.0,
                    routed: RoutedLaw | None = None, experts: int = 1,
                    expert_options: tuple[int, ...] = ()) -> Decision:
    """What to do with `budget_flops`, choosing the plan of least predicted final loss.

    Every plan is (model size, k acquisition rounds, then training with what is left): the current
    model keeps its `trained_tokens` and trains (C - k·round FLOPs) / 6N more; a larger table size
    starts over (the loop restarts the LM when it grows) and trains (C - k·round) / 6N'. Unique
    tokens grow by k·round tokens; repeats count as `effective_tokens`. Acquisition thus pays only
    when its tokens lower the law's loss more than the training its FLOPs would have bought.
    `first_round_extra` is paid once with the first round (the reward's background sample);
    `max_train_tokens` caps the tokens still trained whatever the budget (a run's last iteration). With no
    estimate of a round (`acquisition` None) the answer is `acquire`; callers that can bound a round
    pass an optimistic one instead (the loop: every result accepted). The law is the planner's prior
    or a fit (`explorer plan`); k is at most `rounds_left` (one round per iteration). With `max_passes`
    (the run's overfitting point) tokens trained beyond `max_passes` passes over the unique tokens
    count nothing: a learner that keeps its best weights gains nothing from them, so past that point
    only new tokens (or a larger model) can lower the loss; with `passes_exponent` the point moves
    with the unique tokens U, `max_passes`·(U / `passes_at`)^exponent (`overfit_passes`: a model
    overfits a larger, more varied set later). `deferred_tokens`: rounds run back to back
    (`text.rounds_first`), each round but the last takes an iteration that trains nothing, so
    `max_train_tokens` shrinks by this many tokens per such round.

    With a `routed` law, more experts are one more way to grow: each E' of `expert_options` above the
    current `experts` is a plan that restarts the model at the same active size (the same FLOPs per
    token) with E' experts; every plan's loss is scaled by `RoutedLaw.factor` at its own E.
    """
    if (budget_flops <= 0 or unique_tokens < 0 or trained_tokens < 0 or current_params <= 0 or rounds_left < 0
            or first_round_extra < 0):
        raise ValueError("need budget_flops > 0, unique and trained tokens >= 0, current_params > 0, "
                         "rounds_left >= 0, first_round_extra >= 0")
    if acquisition is None and rounds_left > 0:
        return Decision(action="acquire", n_target=float(current_params), d_target=float(unique_tokens),
                        reason="no acquisition round measured yet: one round measures what a round costs and adds")
    rnd = acquisition or AcquisitionRound(flops=0.0, tokens=0.0)
    k_max = rounds_left if rnd.flops <= 0 else min(rounds_left, int(budget_flops // rnd.flops))
    k = np.arange(k_max + 1, dtype=float)
    left = budget_flops - k * rnd.flops - np.where(k > 0, first_round_extra, 0.0)  # for training after k rounds
    k, left = k[left > 0], left[left > 0]
    unique = unique_tokens + k * rnd.tokens
    _check_experts(experts, expert_options)
    plans = [("current", float(current_params), float(trained_tokens), experts)]
    plans += [(name, float(s.non_embedding_params), 0.0, experts) for name, s in (size_table or {}).items()
              if s.non_embedding_params > current_params]
    if routed is not None:
        plans += [(f"{e} experts", float(current_params), 0.0, e) for e in sorted(expert_options) if e > experts]
    # tokens worth training after k rounds: past the overfitting point none (the same for every plan)
    worth = math.inf if max_passes is None else overfit_passes(max_passes, unique, passes_exponent, passes_at) * unique
    best = None
    for name, n, done, e in plans:
        tokens = done + np.minimum(left / (6.0 * n), max_train_tokens - np.maximum(k - 1, 0) * deferred_tokens)
        tokens = np.minimum(tokens, worth)
        loss = law.loss(n, effective_tokens(unique, tokens, r_star))
        if routed is not None:
            loss = loss * routed.factor(n, e)
        i = int(np.argmax(loss <= loss.min() * (1 + 1e-9)))  # fewest rounds among (numerical) ties
        if best is None or loss[i] < best[0] * (1 - 1e-9):  # a larger model must be strictly better
            best = (float(loss[i]), name, n, int(k[i]), float(tokens[i]), e)
        if name == "current":
            stay = (float(loss[0]), float(loss[i]), int(k[i]))  # train only; best with rounds at this size
    loss, name, n, rounds, tokens, e = best
    extra = f" (+{_sci(first_round_extra)} once)" if first_round_extra else ""
    bound = "" if rnd.measured else " at most (no round measured yet)"
    costs = (f"a round costs {_sci(rnd.flops)} FLOPs{extra} for {_sci(rnd.tokens)} new tokens{bound}; "
             f"predicted final loss: train only {stay[0]:.4f}, "
             f"{stay[2]} round(s) then train {stay[1]:.4f}"
             + (f" (training counted up to {max_passes:.3g} passes over the unique tokens"
                + (f" at {_sci(passes_at)}, x(U/{_sci(passes_at)})^{passes_exponent:.3g} beyond" if passes_exponent
                   else "") + ")" if max_passes else ""))
    if e != experts:
        gain = 1.0 - float(routed.factor(n, e) / routed.factor(n, experts))
        return Decision(action="add_experts", n_target=n, d_target=tokens, experts=e, rounds=rounds,
                        reason=f"{costs}, restart with {e} experts per routed layer (now {experts}; the same "
                               f"{_sci(n)} active params, the routed law's loss x{1 - gain:.4f}) with {rounds} "
                               f"round(s) {loss:.4f} (best)")
    if name != "current":
        return Decision(action="grow_model", n_target=n, d_target=tokens, rounds=rounds,
                        reason=f"{costs}, grow to {name} ({_sci(n)} params) with {rounds} round(s) {loss:.4f} (best)")
    if rounds > 0:
        return Decision(action="acquire", n_target=n, d_target=tokens, rounds=rounds,
                        reason=f"{costs} (best): acquire; {_sci(unique_tokens)} unique tokens now")
    return Decision(action="train", n_target=n, d_target=tokens, rounds=0,
                    reason=f"{costs}: another round does not pay for its FLOPs; train")
