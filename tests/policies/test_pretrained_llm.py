"""The pretrained query writer: Gemma 3 270M from PyPI with LoRA adapters, PPO on a toy reward.

One module-scoped policy (loading the model takes seconds once it is dequantised, about a minute the
first time on a machine). Run alone with `pytest -m slow tests/policies/test_pretrained_llm.py`.
"""

import math

import pytest
import torch

from policies import build_policy

pytestmark = pytest.mark.slow

CONCEPTS = ["boot", "sandal", "sneaker", "dress", "shirt", "coat", "volcano", "tax law", "piano", "river"]
OPTIONS = {"target_description": "product photos of clothes and shoes", "max_query_tokens": 8,
           "ppo_epochs": 2, "learning_rate": 1e-3, "threads": 2, "base_dtype": "float32"}


def footwear(text: str) -> float:
    return 1.0 if any(w in text.lower() for w in ("shoe", "boot", "sandal", "sneaker", "heel")) else 0.0


@pytest.fixture(scope="module")
def policy():
    return build_policy("ppo", concepts=CONCEPTS, seed=0, **OPTIONS)


def base_and_adapters(policy):
    named = dict(policy.model.lm.named_parameters())
    base = {k: v.detach().clone() for k, v in named.items() if "lora_" not in k}
    lora = {k: v.detach().clone() for k, v in named.items() if "lora_" in k}
    return base, lora


def test_ppo_trains_the_adapters_only_and_keeps_a_finite_kl(policy):
    assert type(policy.model.lm.get_base_model()).__name__ == "Gemma3ForCausalLM"
    trainable = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    assert trainable < 0.01 * sum(p.numel() for p in policy.model.parameters())  # LoRA + value head
    base, lora = base_and_adapters(policy)
    for _ in range(2):
        batch = policy.propose(4)
        assert len(batch) == 4 and all(q.text for q in batch)
        policy.update(batch, [footwear(q.text) for q in batch])
    assert math.isfinite(policy.stats["kl_to_reference"]) and policy.stats["kl_to_reference"] >= -1e-3
    assert policy.stats["generate_seconds"] > 0 and policy.stats["ppo_seconds"] > 0
    after_base, after_lora = base_and_adapters(policy)
    assert all(torch.equal(base[k], after_base[k]) for k in base)  # the pretrained weights are untouched
    assert any(not torch.equal(lora[k], after_lora[k]) for k in lora)  # PPO moved the adapters
    assert sum(policy.cleanup.values()) >= 8  # every sample was cleaned up and counted


def test_state_holds_the_adapters_not_the_model_and_resumes_exactly(policy):
    state = policy.state_dict()
    stored = sum(v.numel() for v in state["adapters"].values()) + sum(v.numel() for v in state["value_head"].values())
    assert "model" not in state and stored < 3_000_000  # adapters and value head, not 268M weights
    resumed = build_policy("ppo", concepts=CONCEPTS, seed=5, **{**OPTIONS, "max_query_tokens": 3})
    resumed.load_state_dict(state)
    assert [q.text for q in resumed.propose(4)] == [q.text for q in policy.propose(4)]


def test_ppo_runs_with_its_defaults_under_the_options_given(policy):
    """`ppo` with a pretrained LM: BENCHMARKS 8's measured configuration fills what the options leave."""
    cfg = policy.config
    assert (cfg.reward_shape, cfg.novelty_measure, cfg.novelty_bonus, cfg.kl_target) == ("log", "meaning", 0.3, 1.0)
    assert (cfg.max_query_tokens, cfg.ppo_epochs, cfg.base_dtype) == (8, 2, "float32")  # given: theirs


def test_llm_prompt_is_the_same_lm_without_updates():
    ablation = build_policy("llm-prompt", concepts=CONCEPTS, seed=0, **OPTIONS)
    _, lora = base_and_adapters(ablation)
    batch = ablation.propose(4)
    ablation.update(batch, [footwear(q.text) for q in batch])
    assert "ppo_seconds" not in ablation.stats and "good" not in ablation.prompt()
    assert ablation.prompt().startswith("Web search queries that find product photos of clothes and shoes")
    assert (ablation.config.reward_shape, ablation.config.novelty_bonus) == ("raw", 0.0)  # no ppo defaults
    assert all(torch.equal(v, dict(ablation.model.lm.named_parameters())[k]) for k, v in lora.items())


def test_a_bfloat16_base_halves_the_frozen_weights_and_still_trains_float32_adapters(policy):
    from policies.llm_models import GEMMA, models_home

    float32 = dict(policy.model.lm.named_parameters())
    policy = build_policy("ppo", concepts=CONCEPTS, seed=1, **{**OPTIONS, "base_dtype": "bfloat16"})
    assert (models_home() / f"{GEMMA}-bfloat16" / "model.safetensors").exists()  # read from its bf16 copy
    named = dict(policy.model.lm.named_parameters())
    assert {v.dtype for k, v in named.items() if "lora_" not in k} == {torch.bfloat16}
    assert {v.dtype for k, v in named.items() if "lora_" in k} == {torch.float32}
    assert all(torch.equal(v, float32[k].detach().to(torch.bfloat16)) for k, v in named.items() if "lora_" not in k)
    _, lora = base_and_adapters(policy)
    batch = policy.propose(8)
    assert not all(policy.rollout.invalid)  # an all-invalid batch gives PPO nothing to compare
    policy.update(batch, [footwear(q.text) for q in batch])
    assert policy.rollout is None and math.isfinite(policy.stats["kl_to_reference"])
    assert policy.stats["value_loss"] >= 0
    _, after = base_and_adapters(policy)
    assert any(not torch.equal(lora[k], after[k]) for k in lora)  # PPO moved the float32 adapters
