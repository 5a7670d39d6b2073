"""The routed LM layers (learners/routing.py): the three routers, the controls (switch-unit, random,
dense-wide), balance, FLOP accounting, state, and what routing_stats measures."""

import math

import numpy as np
import pytest
import torch

from learners.lm import (
    LMConfig,
    LMLearner,
    LMShape,
    active_non_embedding_params,
    non_embedding_params,
)
from learners.routing import (
    HashRouter,
    RoutedMLP,
    balanced_assignment,
    load_imbalance,
    routed_layers,
    routing_stats,
    sinkhorn,
)
from learners.text_data import PackedTextStream

SHAPE = LMShape(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
VOCAB, SEQ = 96, 16


def _docs(seed=0, n=40):
    """Zipf-distributed token documents: frequent tokens repeat, as in text."""
    rng = np.random.default_rng(seed)
    return [list((rng.zipf(1.3, 60) - 1) % (VOCAB - 1)) for _ in range(n)]


def _stream(seed=0):
    return PackedTextStream(_docs(), seq_len=SEQ, eos_id=VOCAB - 1, seed=seed)


def _learner(router, **kw):
    cfg = dict(shape=SHAPE, vocab_size=VOCAB, seq_len=SEQ, batch_size=8, lr=3e-3, warmup=2, total_steps=100,
               router=router, num_experts=4)
    return LMLearner(LMConfig(**{**cfg, **kw}), device="cpu")


@pytest.mark.parametrize("router", ["switch", "switch-unit", "sbase", "hash", "random"])
def test_router_trains_end_to_end_with_one_expert_per_token(router):
    learner = _learner(router)
    layers = routed_layers(learner.model)
    assert len(layers) == SHAPE.num_layers and all(layer.experts.gate_up_proj.shape[0] == 4 for layer in layers)
    batch = _stream().next_batch(8)
    logits = learner.model(input_ids=batch[:, :-1]).logits
    assert logits.shape == (8, SEQ, VOCAB)
    assert all(int(layer.tokens_per_expert.sum()) == 8 * SEQ for layer in layers)  # each token exactly once
    losses = learner.train_steps(_stream(), 15)
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-3:]) < losses[0] - 0.3


@pytest.mark.parametrize("router", ["switch", "switch-unit", "sbase"])
def test_router_learns_from_the_language_modelling_loss_alone(router):
    learner = _learner(router, router_aux_loss_coef=0.0)
    before = [layer.router.weight.detach().clone() for layer in routed_layers(learner.model)]
    learner.train_steps(_stream(), 2)
    assert all(layer.router.weight.grad is None for layer in routed_layers(learner.model))  # zeroed after the step
    moved = [float((layer.router.weight.detach() - w).abs().max()) for layer, w in zip(routed_layers(learner.model), before)]
    assert min(moved) > 1e-4  # gradient reached every router through the expert output's weight


def test_switch_balancing_loss_is_one_when_balanced_and_grows_with_collapse():
    learner = _learner("switch")
    router = routed_layers(learner.model)[0].router
    hidden = torch.randn(64, SHAPE.hidden_size).abs()
    with torch.no_grad():
        router.weight.zero_()  # uniform probabilities: argmax ties all go to expert 0, f = (1, 0, 0, 0)
    router(hidden)
    assert float(router.aux_loss.detach()) == pytest.approx(1.0)  # E · 1 · 1/E
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2] = 10.0  # one expert takes every token with probability ~1
    router(hidden)
    assert float(router.aux_loss.detach()) > 3.5  # -> E at full collapse


def test_sbase_training_assignment_is_balanced_and_evaluation_is_top1():
    learner = _learner("sbase", num_experts=8)
    learner.train_steps(_stream(), 5)
    batch = _stream(seed=1).next_batch(8)[:, :-1]
    learner.model.train()
    learner.model(input_ids=batch)
    tokens = batch.numel()
    for layer in routed_layers(learner.model):
        assert int(layer.tokens_per_expert.max()) <= math.ceil(tokens / 8)  # capacity ⌈T/E⌉
    assert load_imbalance(learner.model) <= 1.0 + 8 / tokens
    learner.model.eval()
    seen = []
    handle = routed_layers(learner.model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        learner.model(input_ids=batch)
    handle.remove()
    layer = routed_layers(learner.model)[0]
    top1 = torch.bincount((seen[0].reshape(-1, SHAPE.hidden_size) @ layer.router.weight.T).argmax(1), minlength=8)
    assert torch.equal(layer.tokens_per_expert, top1)


def test_balanced_assignment_keeps_the_best_scores_under_capacity():
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
    assert balanced_assignment(scores).tolist() == [0, 0, 1, 1]  # token 2 loses expert 0 to better tokens
    identical = torch.zeros(10, 4)  # identical rows: argmax alone would put all on one expert
    assert torch.bincount(balanced_assignment(identical), minlength=4).max() == 3
    plan = sinkhorn(torch.randn(50, 5) * 3)
    assert torch.allclose(plan.exp().sum(0), torch.full((5,), 1 / 5), atol=1e-3)
    assert torch.allclose(plan.exp().sum(1), torch.full((50,), 1 / 50), atol=1e-3)


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    a, b = _learner("hash"), _learner("hash")
    batch = _stream().next_batch(4)[:, :-1]
    for learner in (a, b):
        learner.model(input_ids=batch)
        for layer in routed_layers(learner.model):  # each token went to table[token id]
            assert torch.equal(layer.tokens_per_expert, torch.bincount(layer.router.table[batch].flatten(), minlength=4))
    router = routed_layers(a.model)[0].router
    assert isinstance(router, HashRouter) and not list(router.parameters())
    assert torch.equal(router.table, routed_layers(b.model)[0].router.table)  # same seed, same table
    a.train_steps(_stream(), 3)
    assert torch.equal(router.table, routed_layers(b.model)[0].router.table)  # training never changes it
    other = _learner("hash", seed=1)
    assert not torch.equal(router.table, routed_layers(other.model)[0].router.table)


def test_route_every_other_layer_and_active_parameter_count():
    dense = _learner("dense")
    every = _learner("sbase", num_experts=4)
    half = _learner("sbase", num_experts=4, route_every=2)
    assert [isinstance(layer.mlp, RoutedMLP) for layer in half.model.model.layers] == [False, True]
    mlp = 3 * SHAPE.hidden_size * SHAPE.intermediate_size
    router = 4 * SHAPE.hidden_size
    n = non_embedding_params(dense.model)
    assert non_embedding_params(every.model) == n + SHAPE.num_layers * (3 * mlp + router)
    assert active_non_embedding_params(every.model) == n + SHAPE.num_layers * router
    assert non_embedding_params(half.model) == n + 3 * mlp + router
    assert active_non_embedding_params(half.model) == n + router
    assert active_non_embedding_params(dense.model) == n


@pytest.mark.parametrize("router", ["switch", "sbase", "hash", "random", "dense-wide"])
def test_state_round_trip_resumes_identically(router, tmp_path):
    learner = _learner(router)
    learner.train_steps(_stream(), 3)
    learner.save(tmp_path / "lm.pt")
    resumed = LMLearner.load(tmp_path / "lm.pt", device="cpu")
    routed = 0 if router == "dense-wide" else SHAPE.num_layers
    assert resumed.config.router == router and len(routed_layers(resumed.model)) == routed
    assert resumed.train_steps(resumed.data, 2) == learner.train_steps(learner.data, 2)
    assert all(torch.equal(p, q) for p, q in zip(learner.model.state_dict().values(),
                                                 resumed.model.state_dict().values()))


def test_config_names_the_valid_routers_and_rejects_the_old_moe_flag():
    valid = "dense, dense-wide, switch, switch-unit, sbase, hash, random"
    with pytest.raises(ValueError, match=f"unknown router 'topk'; valid: {valid}"):
        LMConfig(router="topk")
    with pytest.raises(ValueError, match="route_every must be 1"):
        LMConfig(router="hash", route_every=3)
    with pytest.raises(ValueError, match="`moe` was replaced by `router`"):
        LMConfig.from_dict({"moe": True})


def test_dense_wide_has_the_routed_models_total_parameters_all_active():
    routed, wide = _learner("sbase", num_experts=4), _learner("dense-wide", num_experts=4)
    router = 4 * SHAPE.hidden_size
    assert non_embedding_params(wide.model) == non_embedding_params(routed.model) - SHAPE.num_layers * router
    assert active_non_embedding_params(wide.model) == non_embedding_params(wide.model)  # no expert sits idle
    assert all(layer.mlp.intermediate_size == 4 * SHAPE.intermediate_size for layer in wide.model.model.layers)
    half = _learner("dense-wide", num_experts=4, route_every=2)
    assert [layer.mlp.intermediate_size for layer in half.model.model.layers] == [SHAPE.intermediate_size,
                                                                                   4 * SHAPE.intermediate_size]
    losses = wide.train_steps(_stream(), 15)
    assert np.mean(losses[-3:]) < losses[0] - 0.3


def test_switch_unit_gate_is_one_where_the_switch_gate_is_the_chosen_probability():
    hidden = torch.randn(64, SHAPE.hidden_size)
    plain, unit = (routed_layers(_learner(r).model)[0].router for r in ("switch", "switch-unit"))
    unit.load_state_dict(plain.state_dict())
    i_plain, g_plain = plain(hidden)
    i_unit, g_unit = unit(hidden)
    assert torch.equal(i_plain, i_unit) and float(g_plain.detach().max()) < 1  # the same choice
    assert torch.allclose(g_unit, torch.ones(64))
    g_unit.sum().backward()  # yet the router has a gradient: that of log p
    assert float(unit.weight.grad.abs().max()) > 0


def test_random_routing_is_uniform_changes_every_training_pass_and_repeats_under_its_seed():
    def router():
        return routed_layers(_learner("random").model)[0].router

    a, b = router(), router()
    hidden = torch.randn(4000, SHAPE.hidden_size)
    first, _ = a(hidden)
    second, _ = a(hidden)
    assert not torch.equal(first, second) and int(a.calls) == 2  # a new draw per training pass
    assert torch.equal(b(hidden)[0], first)  # the same seed repeats it
    counts = torch.bincount(first, minlength=4).float()
    assert float(counts.max() / counts.min()) < 1.15  # uniform
    a.eval()
    assert torch.equal(a(hidden)[0], a(hidden)[0]) and int(a.calls) == 2  # evaluation: fixed, not counted


def test_routing_stats_measure_gates_load_agreement_and_scrambled_hash():
    batch = _stream().next_batch(8)
    switch = _learner("switch").model.eval()
    with torch.no_grad(), routing_stats(switch) as stats:
        switch(input_ids=batch[:, :-1])
    probs = [layer.router for layer in routed_layers(switch)]
    assert 1 / 4 <= stats["mean_gate"] < 1 and stats["eval_load"] >= 1 and "agreement" not in stats
    assert all(r.stats is None for r in probs)  # measuring ends with the block

    sbase = _learner("sbase").model.eval()
    with torch.no_grad(), routing_stats(sbase) as stats:
        sbase(input_ids=batch[:, :-1])
    assert 0 <= stats["agreement"] <= 1
    with torch.no_grad(), routing_stats(sbase, balanced_eval=True) as balanced:
        sbase(input_ids=batch[:, :-1])
    assert balanced["eval_load"] == 1.0  # 128 tokens over 4 experts: exactly even under its capacity
    assert stats["eval_load"] > 1.0  # the argmax it is evaluated with is not

    hashed = _learner("hash").model.eval()
    table = routed_layers(hashed)[0].router.table
    with torch.no_grad(), routing_stats(hashed) as stats:
        hashed(input_ids=batch[:, :-1])
    assert torch.equal(routed_layers(hashed)[0].tokens_per_expert,
                       torch.bincount(table[batch[:, :-1].reshape(-1)], minlength=4))
    with torch.no_grad(), routing_stats(hashed, scramble_hash=True):
        hashed(input_ids=batch[:, :-1])
    assert not torch.equal(routed_layers(hashed)[0].tokens_per_expert,
                           torch.bincount(table[batch[:, :-1].reshape(-1)], minlength=4))
    with torch.no_grad():
        hashed(input_ids=batch[:, :-1])  # scrambling ends with the block
    assert torch.equal(routed_layers(hashed)[0].tokens_per_expert,
                       torch.bincount(table[batch[:, :-1].reshape(-1)], minlength=4))
    assert stats["mean_gate"] == 1.0
