"""PPO math on hand-made numbers; the LM policy learning a toy reward; state round trip; the loop."""

import io

import numpy as np
import pytest
import torch

from explorer.run.image import ImageLoop
from policies import Query, QueryPolicy, build_policy, ppo
from policies.llm_models import ByteTokenizer, clean_query, malformed_reason, query_text, response_mask
from policies.ppo_llm import LLMPolicyConfig
from policies.ppo_update import INVALID_QUERY_PENALTY

CONCEPTS = ["shoe", "boot", "sandal", "sneaker", "slipper", "coat", "dress", "shirt", "trousers",
            "bag", "dog", "cat", "horse", "car", "truck", "tractor", "banana", "apple", "bread",
            "guitar", "hammer", "clock", "chair", "lamp"]
FAST = {"model": "tiny", "warmup_steps": 20, "warmup_batch": 16, "history": 1, "max_query_tokens": 12}


# ---------------------------------------------------------------- pure PPO math

def test_clipped_loss_ignores_ratios_pushed_past_the_clip():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))  # ratios 0.5, 0.9, 1.1, 1.5
    mask = torch.ones(1, 4)
    # Per-token objective min(r A, clip(r) A): the ratios it uses for A = +1 and A = -1.
    for sign, used in ((1.0, [0.5, 0.9, 1.1, 1.2]), (-1.0, [0.8, 0.9, 1.1, 1.5])):
        new_ = new.clone().requires_grad_(True)
        loss, fraction = ppo.clipped_policy_loss(new_, old, torch.full((1, 4), sign), mask, clip=0.2)
        loss.backward()
        # A positive advantage stops pulling once the ratio passes 1.2, a negative one below 0.8.
        frozen = [False, False, False, True] if sign > 0 else [True, False, False, False]
        assert [bool(g == 0) for g in new_.grad[0]] == frozen
        assert fraction.item() == pytest.approx(0.25)
        assert loss.item() == pytest.approx(-sign * float(np.mean(used)), rel=1e-5)


def test_masked_tokens_do_not_count():
    logprobs = torch.tensor([[-1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = ppo.clipped_policy_loss(logprobs, logprobs, torch.tensor([[1.0, 3.0, 100.0]]), mask, 0.2)
    assert loss.item() == pytest.approx(-2.0)


def test_kl_estimates_have_the_right_sign():
    torch.manual_seed(0)
    logits_p, logits_q = torch.randn(8), torch.randn(8)
    p, q = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    samples = torch.multinomial(p.exp(), 200_000, replacement=True)
    exact = (p.exp() * (p - q)).sum()
    k3 = ppo.approx_kl(p[samples], q[samples])
    assert (k3 >= 0).all()  # every k3 sample is non-negative
    assert k3.mean().item() == pytest.approx(exact.item(), rel=0.05)
    assert ppo.token_kl(p[samples], q[samples]).mean().item() == pytest.approx(exact.item(), rel=0.05)
    assert ppo.approx_kl(p, p).abs().max() == 0


def test_advantages_are_whitened_over_response_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = ppo.whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert w[1, 1:].abs().max() == 0


def test_gae_spreads_the_final_score_and_the_kl_penalty():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logprobs, ref = torch.tensor([[-1.0, -1.0, -1.0, 0.0]]), torch.tensor([[-2.0, -1.0, -1.0, 0.0]])
    rewards = ppo.token_rewards(torch.tensor([1.0]), logprobs, ref, mask, kl_coef=0.5)
    assert rewards.tolist() == [[-0.5, 0.0, 1.0, 0.0]]  # KL on token 0, score on the last token
    advantages, returns = ppo.gae(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    assert returns.tolist() == [[0.5, 1.0, 1.0, 0.0]]  # Monte-Carlo returns when values are 0
    values = torch.tensor([[0.5, 1.0, 1.0, 7.0]])  # perfect values: no advantage anywhere
    advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert advantages.abs().max().item() == pytest.approx(0.0, abs=1e-6)


def test_value_loss_is_clipped_around_the_old_values():
    old, returns, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    far = ppo.clipped_value_loss(torch.full((1, 1), 3.0), old, returns, mask, clip=0.2)
    assert far.item() == pytest.approx(0.5 * 4.0)  # max(|3-1|^2, |0.2-1|^2) / 2


def test_running_moments_match_numpy():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=50)
    moments = ppo.RunningMoments()
    for chunk in np.array_split(values, 7):
        moments.update(chunk.tolist())
    assert moments.mean == pytest.approx(values.mean())
    assert moments.std == pytest.approx(values.std())
    assert np.mean(moments.normalise(values.tolist())) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- tokenizer and query checks

def test_the_adaptive_kl_coefficient_moves_towards_its_target_by_at_most_the_clipped_error():
    controller = ppo.AdaptiveKL(0.05, target=1.0, horizon=32)
    controller.update(kl=1.1, n=16)  # 10% over the target: the coefficient rises by 0.1 * 16 / 32
    assert controller.coef == pytest.approx(0.05 * 1.05)
    controller.update(kl=6.0, n=16)  # far over: the error is clipped at +0.2
    assert controller.coef == pytest.approx(0.05 * 1.05 * 1.1)
    controller.update(kl=0.0, n=32)  # far under: clipped at -0.2 over a whole horizon
    assert controller.coef == pytest.approx(0.05 * 1.05 * 1.1 * 0.8)
    fixed = ppo.AdaptiveKL(0.05)  # no target: a fixed coefficient
    fixed.update(kl=6.0, n=16)
    assert fixed.coef == 0.05


def test_the_log_reward_shape_pays_most_for_the_first_finds():
    shaped = [ppo.shape_reward(finds / 40, "log", 40.0) for finds in (0, 1, 2, 4, 40)]
    assert shaped[0] == 0.0 and shaped[-1] == pytest.approx(1.0)
    assert shaped[1] == pytest.approx(np.log(2) / np.log(41))  # one new find of 40 earns 0.19, not 0.025
    gains = np.diff(shaped)
    assert (gains > 0).all() and gains[0] > gains[1] > 0  # rising, with diminishing returns
    assert ppo.shape_reward(-0.1, "log", 40.0) == -ppo.shape_reward(0.1, "log", 40.0)
    assert ppo.shape_reward(0.3, "raw", 40.0) == 0.3
    with pytest.raises(ValueError, match="unknown reward shape 'tiers'"):
        ppo.shape_reward(0.3, "tiers", 40.0)
    with pytest.raises(ValueError, match="reward_shape must be one of raw, log"):
        LLMPolicyConfig(reward_shape="square")
    with pytest.raises(ValueError, match="kl_target must be None or > 0"):
        LLMPolicyConfig(kl_target=0.0)


def test_the_policy_trains_on_the_shaped_reward_and_keeps_its_adapted_kl_coefficient():
    policy = build_policy("ppo", concepts=CONCEPTS, seed=5, **FAST, reward_shape="log", kl_target=0.5,
                          kl_horizon=4)
    batch = policy.propose(4)
    rewards = [0.0, 0.025, 0.1, 1.0]
    valid = [r for r, bad in zip(rewards, policy.rollout.invalid) if not bad]
    shaped = [ppo.shape_reward(r, "log", 40.0) for r in valid]
    scores = policy._scores(policy.rollout, rewards)  # normalised by the moments of the shaped rewards
    assert policy.moments.mean == pytest.approx(np.mean(shaped))
    policy.update(batch, rewards)
    kl = policy.stats["kl_to_reference"]
    assert policy.stats["kl_coef"] == 0.05  # this update used the start value ...
    step = min(max(kl / 0.5 - 1, -0.2), 0.2) * 4 / 4
    assert policy.kl.coef == pytest.approx(0.05 * (1 + step)) and policy.kl.coef != 0.05  # ... the next one moved
    resumed = build_policy("ppo", concepts=CONCEPTS, seed=5, **{**FAST, "warmup_steps": 0})
    resumed.load_state_dict(policy.state_dict())
    assert resumed.kl.coef == policy.kl.coef and resumed.config.reward_shape == "log"
    assert len(scores) == 4


def test_word_novelty_is_one_minus_the_largest_word_overlap_with_an_earlier_query():
    from policies.ppo_llm import word_novelty

    before = [{"leather", "boot"}, {"red", "dress"}]
    assert word_novelty("Leather Boot", before) == 0.0  # the same words, in other case
    assert word_novelty("leather sandal", before) == pytest.approx(1 - 1 / 3)
    assert word_novelty("wool coat", before) == 1.0
    assert word_novelty("anything", []) == 1.0


def test_the_prompt_lists_what_was_found_and_the_novelty_bonus_is_paid():
    policy = build_policy("ppo", concepts=CONCEPTS, seed=6, **FAST, found_in_prompt=2, novelty_bonus=1.0)
    policy.update([Query("boot"), Query("red dress"), Query("cat"), Query("Boot")], [0.2, 0.1, 0.0, 0.3])
    assert policy.found() == ["boot", "red dress"]  # newest first, distinct, only those that found something
    prompt = policy._few_shot([("boot", 0.25)], policy.found())
    assert "Found already, so search for something else: boot, red dress.\n" in prompt
    assert "Found already" not in policy._few_shot([("boot", 0.25)])
    policy.propose(4)
    rollout = policy.rollout
    issued = [set(t.lower().split()) for t in ("boot", "red dress", "cat", "Boot")]
    from policies.ppo_llm import word_novelty
    expected = [0.0 if bad else word_novelty(q.text, issued) for q, bad in zip(rollout.queries, rollout.invalid)]
    assert rollout.novelty == pytest.approx(expected)
    policy._scores(rollout, [0.0] * 4)  # no reward at all: what the moments saw is the novelty bonus
    earned = [n for n, bad in zip(expected, rollout.invalid) if not bad]
    assert policy.moments.mean == pytest.approx(np.mean(earned))
    with pytest.raises(ValueError, match="hybrid has no found_in_prompt"):
        build_policy("hybrid", concepts=CONCEPTS, seed=0, **FAST, novelty_bonus=0.5)


def test_meaning_novelty_pays_little_for_a_paraphrase_whose_words_are_new():
    from explorer.web.text_encoder import default_encoder
    from policies.ppo_llm import meaning_novelty, word_novelty

    unit = np.eye(3, dtype=np.float32)
    assert meaning_novelty(unit[:2], unit[:1]).tolist() == [0.0, 1.0]  # the same direction, orthogonal
    assert meaning_novelty(unit[:1], -unit[:1]).tolist() == [1.0]  # opposite: floored similarity
    assert meaning_novelty(unit[:2], unit[:0]).tolist() == [1.0, 1.0]  # nothing before
    before = "best price to buy more"
    paraphrase, other = "buying more at a lower price", "wool winter coat"
    assert word_novelty(paraphrase, [set(before.split())]) > 0.7  # its words are mostly new ...
    encoder = default_encoder()
    paid = meaning_novelty(encoder.encode([paraphrase, other]), encoder.encode([before]))
    assert paid[0] < 0.5 < paid[1]  # ... its meaning is not
    policy = build_policy("ppo", concepts=CONCEPTS, seed=6, **FAST, novelty_bonus=1.0, novelty_measure="meaning")
    first = policy.propose(4)  # nothing issued before: every valid sample is new
    assert policy.rollout.novelty == [0.0 if bad else 1.0 for bad in policy.rollout.invalid]
    policy.update(first, [0.0] * 4)
    policy.update([Query(before), Query("boot")], [0.2, 0.0])
    policy.propose(4)
    rollout = policy.rollout
    valid = [q.text for q, bad in zip(rollout.queries, rollout.invalid) if not bad]
    issued = sorted({q.text for q in first} | {"boot", before})
    expected = iter(meaning_novelty(encoder.encode(valid), encoder.encode(issued)))
    assert rollout.novelty == pytest.approx([0.0 if bad else next(expected) for bad in rollout.invalid], abs=1e-5)
    quiet = build_policy("ppo", concepts=CONCEPTS, seed=6, **FAST, novelty_measure="meaning")
    quiet.propose(4)
    assert quiet.rollout.novelty == [0.0] * 4  # no bonus, nothing embedded
    with pytest.raises(ValueError, match="novelty_measure must be one of words, meaning"):
        LLMPolicyConfig(novelty_measure="tokens")


def test_byte_tokenizer_and_query_validation():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("Käse boot")) == "Käse boot"
    assert tok.decode([0xC3]) is None and tok.decode([65, tok.eos]) is None
    assert query_text("  red   boot \n") == "red boot"
    assert query_text("") is None and query_text("123 !") is None and query_text("a\x07b") is None
    assert response_mask(torch.tensor([[5, tok.eos, tok.pad], [5, 6, 7]]), tok.eos).tolist() == \
        [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_a_pretrained_lms_line_is_cleaned_into_a_query_or_rejected_with_its_reason():
    assert clean_query("leather ankle boot (reward 0.82)\n- more") == ("leather ankle boot", "ok")
    assert clean_query(' - "summer dress": 0.4') == ("summer dress", "ok")
    assert clean_query("red sneakers 0.91") == ("red sneakers", "ok")
    assert clean_query("4x5 shirt") == ("4x5 shirt", "ok")  # numbers that are no reward stay
    assert clean_query("iphone 12 case") == ("iphone 12 case", "ok")
    assert clean_query("boots reward 0.3") == ("boots", "ok")
    for cut in ("10 year loan (reward 0", "10 year loan (reward", "10 year loan ("):  # cut off by the length cap
        assert clean_query(cut) == ("10 year loan", "ok"), cut
    assert clean_query("https://example.com/shoes") == (None, "url")
    assert clean_query("www.shoes.com") == (None, "url")
    assert clean_query("a b c d e f g h i j") == (None, "too_long")
    assert clean_query("   \n") == (None, "empty") and clean_query("(0.5)") == (None, "empty")
    assert clean_query("123 456") == (None, "not_text") and clean_query(None) == (None, "not_text")
    # malformed: what a person would not type into a search box scores the invalid penalty instead
    assert clean_query("(hums 1.23 (turn54))") == (None, "malformed")
    assert malformed_reason("hums (turn)") == "brackets or symbols"
    assert malformed_reason("hums 1.23 shoes") == "a number with a fraction"
    assert malformed_reason("turn54 shoes") == "letters glued to digits"
    assert malformed_reason("3695. some each case 2. more") == "list numbering"  # PPO's numbered lines
    assert clean_query("7087. more price on large price") == (None, "malformed")
    assert clean_query("10 cm thick jeans") == ("10 cm thick jeans", "ok")  # a measure is no numbering
    assert malformed_reason("2x07 show 11") == "mostly numbers" and clean_query("1x07") == (None, "malformed")
    assert malformed_reason("4x5 shirt") is None and malformed_reason("85 kg boxes") is None  # half or fewer
    assert malformed_reason("xqzt blorf shoes") == "non-words" and clean_query("xqzt blorf") == (None, "malformed")
    assert malformed_reason("iphone") == "non-words"  # one word, not English
    for ok in ("running shoes", "darker wool coats", "t-shirt with stripes", "mice", "4x5 shirt"):
        assert malformed_reason(ok) is None, ok  # inflected and irregular forms are words
    # stop tokens: a response ends at any of them; a list of stops works like one EOS
    assert response_mask(torch.tensor([[5, 9, 7], [5, 6, 8]]), [8, 9]).tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]


def test_llm_config_names_its_model_and_rejects_unknown_ones():
    assert LLMPolicyConfig().pretrained and LLMPolicyConfig().compute_threads is None
    assert not LLMPolicyConfig(model="tiny").pretrained and LLMPolicyConfig(model="tiny").compute_threads == 1
    assert LLMPolicyConfig(model="tiny", model_path="/some/lm").pretrained
    with pytest.raises(ValueError, match="unknown model 'gpt9'"):
        LLMPolicyConfig(model="gpt9")
    with pytest.raises(ValueError, match="llm-prompt never updates"):
        build_policy("llm-prompt", concepts=CONCEPTS, seed=0, **FAST, ppo_updates=True)


# ---------------------------------------------------------------- the policy

def letter_reward(query: Query, target: str = "bot") -> float:
    """Toy reward: the share of the query's letters that are in `target`."""
    letters = [c for c in query.text if c.isalpha()]
    return sum(c in target for c in letters) / max(1, len(letters))


@pytest.fixture(scope="module")
def trained():
    policy = build_policy("ppo", concepts=CONCEPTS, seed=0, **FAST)
    means = []
    for _ in range(30):
        batch = policy.propose(8)
        rewards = [letter_reward(q) for q in batch]
        policy.update(batch, rewards)
        means.append(float(np.mean(rewards)))
    return policy, means


def test_ppo_raises_a_toy_reward(trained):
    policy, means = trained
    assert isinstance(policy, QueryPolicy) and policy.name == "ppo"
    first, last = np.mean(means[:5]), np.mean(means[-5:])
    assert last > first + 0.3, (first, last, means)


def test_kl_to_the_reference_stays_bounded(trained):
    policy, _ = trained
    # Summed over a query's tokens, in nats: the KL penalty keeps the LM near its warm-up self.
    assert 0.0 < policy.stats["kl_to_reference"] < 15.0, policy.stats


def test_the_prompt_runs_once_for_all_responses_and_gives_what_the_whole_sequences_give():
    """response_outputs shares the prompt's keys and values among the responses; its logits, values
    and gradients equal those of each prompt + response run whole (the way PPO scored before)."""
    from policies.llm_models import response_outputs

    policy = build_policy("ppo", concepts=CONCEPTS, seed=2, **FAST)
    policy.propose(6)
    prompt, responses, model = policy.rollout.prompts[0], policy.rollout.responses, policy.model
    model.train()

    def whole():
        logits, values = model(torch.cat([prompt.expand(len(responses), -1), responses], dim=1),
                               responses.shape[1] + 1)
        return logits[:, :-1], values[:, :-1]

    grads = []
    for outputs in (whole, lambda: response_outputs(model, prompt, responses)):
        model.zero_grad()
        logits, values = outputs()
        grads.append([logits, values])
        (torch.log_softmax(logits, -1).gather(-1, responses[..., None]).sum() + values.sum()).backward()
        grads[-1].append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (a_logits, a_values, a_grad), (b_logits, b_values, b_grad) = grads
    assert a_logits.shape == b_logits.shape and a_values.shape == b_values.shape
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_values, a_values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_grad, a_grad, rtol=1e-3, atol=1e-4)
    # the reference (a bare LM) takes the same path without values
    logits, values = response_outputs(policy.reference, prompt, responses)
    assert values is None and logits.shape == a_logits.shape


def test_invalid_samples_are_replaced_and_penalised():
    policy = build_policy("ppo", concepts=CONCEPTS, seed=3, **{**FAST, "warmup_steps": 0})
    batch = policy.propose(16)  # an untrained byte LM writes mostly garbage
    invalid = policy.rollout.invalid
    assert any(invalid)
    for query, bad in zip(batch, invalid):
        if bad:  # a vocabulary concept stands in, so the search still runs
            assert query.concept is not None and query.text == CONCEPTS[query.concept]
    scores = policy._scores(policy.rollout, [0.5] * len(batch))
    assert all(s == INVALID_QUERY_PENALTY for s, bad in zip(scores.tolist(), invalid) if bad)


def play(policy, rounds: int, n: int) -> list[list[Query]]:
    batches = []
    for _ in range(rounds):
        batch = policy.propose(n)
        policy.update(batch, [letter_reward(q) for q in batch])
        batches.append(batch)
    return batches


@pytest.mark.parametrize("name", ["ppo", "hybrid"])
def test_state_round_trip_gives_identical_next_proposals(name, hybrid_kwargs):
    extra = hybrid_kwargs if name == "hybrid" else {}
    original = build_policy(name, concepts=CONCEPTS, seed=0, **FAST, **extra)
    play(original, rounds=2, n=4)
    original.propose(4)  # a batch still waiting for its rewards is part of the state
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # as the loop checkpoints it
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = build_policy(name, concepts=CONCEPTS, seed=7, **{**FAST, "warmup_steps": 0}, **extra)
    resumed.load_state_dict(state)
    pending = original.rollout.queries
    for policy in (original, resumed):  # reward the pending batch: PPO runs on the cached samples
        policy.update(pending, [letter_reward(q) for q in pending])
    assert play(resumed, rounds=2, n=4) == play(original, rounds=2, n=4)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), original.model.parameters()))


def test_a_kept_generation_is_read_back_instead_of_sampled(tmp_path, monkeypatch):
    import policies.ppo_llm as ppo_llm

    recorded, replayed = (build_policy("ppo", concepts=CONCEPTS, seed=4, **FAST) for _ in range(2))
    for policy in (recorded, replayed):
        policy.use_generation_cache(tmp_path)
    batch = recorded.propose(4)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and "cached_generations" not in recorded.stats

    def no_sampling(*args, **kwargs):  # the fault: sampling would now be an error
        raise AssertionError("sampled")

    monkeypatch.setattr(ppo_llm, "sample_responses", no_sampling)
    assert [q.text for q in replayed.propose(4)] == [q.text for q in batch]
    assert replayed.stats["cached_generations"] == 1
    assert torch.equal(replayed.generator.get_state(), recorded.generator.get_state())  # as if it had sampled
    recorded.update(batch, [letter_reward(q) for q in batch])  # new weights, new prompt: a new batch
    with pytest.raises(AssertionError, match="sampled"):
        recorded.propose(4)


def test_same_seed_same_queries_other_seed_other_queries():
    runs = [play(build_policy("ppo", concepts=CONCEPTS, seed=s, **FAST), rounds=2, n=4) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.fixture(scope="module")
def hybrid_kwargs():
    from explorer.web.text_encoder import default_encoder

    encode = default_encoder().encode
    return {"embeddings": encode(CONCEPTS), "text_encoder": encode, "gp": {"explore_first": 4},
            "candidates_per_query": 3}


def posterior_mean(gp, vectors: np.ndarray) -> np.ndarray:
    """The GP posterior mean in reward units, written out: m + s * k(x, X) @ alpha, RBF on chords."""
    sq = ((vectors[:, None, :].astype(np.float64) - gp.points[None, :, :].astype(np.float64)) ** 2).sum(-1)
    cross = gp.amplitude * np.exp(-sq / (2 * gp.length_scale ** 2))
    return gp.target_mean + gp.target_scale * cross @ gp.alpha


def test_hybrid_issues_gp_ranked_expansions_of_concepts(hybrid_kwargs):
    gp = {**hybrid_kwargs["gp"], "acquisition": "ucb", "ucb_beta": 0.0}  # rank by posterior mean alone
    policy = build_policy("hybrid", concepts=CONCEPTS, seed=0, **FAST, **{**hybrid_kwargs, "gp": gp})
    encode = hybrid_kwargs["text_encoder"]
    ranked = []  # the candidate texts each propose() hands to its ranking (a spy: the real method runs)
    rank = policy._rank
    policy._rank = lambda texts, n: ranked.append(list(texts)) or rank(texts, n)
    batches = []
    for round_ in range(3):
        batch = policy.propose(4)
        candidates = ranked[-1]
        assert {q.text for q in batch} <= set(candidates) and len(candidates) >= 4
        if round_ > 0:  # explore_first=4 queries were heard: from now on the GP decides
            vectors = np.asarray(encode(candidates), dtype=np.float64)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            mean = posterior_mean(policy.bandit.fitted(), vectors)
            tried = [t in policy.bandit.log.texts for t in candidates]
            order = sorted(range(len(candidates)), key=lambda i: (tried[i], -mean[i]))  # untried first
            assert len(set(np.round(mean, 9))) == len(mean)  # no ties, so the order is unique
            assert [q.text for q in batch] == [candidates[i] for i in order[:4]], (candidates, mean)
        # rewards that differ between texts: while all rewards are equal the GP explores uniformly
        rewards = [letter_reward(q) + (sum(map(ord, q.text)) % 13) / 100 for q in batch]
        assert np.ptp(rewards) > 0
        policy.update(batch, rewards)
        batches.append(batch)
    texts = [q.text for batch in batches for q in batch]
    assert all(len(batch) == 4 and len({q.text for q in batch}) == 4 for batch in batches)
    assert any(len(c) > 4 for c in ranked[1:])  # the GP had expansions to rank against their seeds
    assert any(q.concept is None for batch in batches for q in batch)  # free-text expansions go out
    assert len(policy.bandit.log) == len(texts) == 12  # the GP heard every issued query
    for batch in batches:  # every free-text query is a descriptor plus a vocabulary concept
        assert all(q.text.split()[-1] in CONCEPTS for q in batch if q.concept is None)


# ---------------------------------------------------------------- the acquisition loop

@pytest.mark.parametrize("name, iterations", [("ppo", 2), ("hybrid", 1)])
def test_policy_runs_in_the_acquisition_loop(name, iterations, tiny_experiment, engine, tmp_path):
    options = {**FAST, "warmup_steps": 60, "target_description": "clothes and shoes"}
    if name == "hybrid":
        options.update(gp={"explore_first": 2}, candidates_per_query=2)
    policy = {"name": name, "queries_per_iteration": 4, "options": options}
    cfg = tiny_experiment(policy=policy, iterations=iterations)
    loop = ImageLoop(cfg, tmp_path, engine_url=engine.url, progress=False)
    rows = loop.run(log=lambda line: None)
    assert [r["iteration"] for r in rows] == list(range(iterations + 1))
    queries = [q for r in rows[1:] for q in r["queries"]]
    assert len(queries) == 4 * iterations and all(isinstance(q, str) and q for q in queries)
    vocabulary = set(loop.vocab.concepts)
    assert any(q not in vocabulary for q in queries)  # free text reached the search engine
    from explorer.run.checkpoints import load_latest_checkpoint

    state = load_latest_checkpoint(tmp_path).state["policy"]
    assert state["policy"] == name and len(state["log"]["rewards"]) == 4 * iterations
    if name == "hybrid":  # expansions keep their seed concept, so they find something at once
        assert sum(sum(r["results"]) for r in rows[1:]) > 0


def test_an_update_without_the_failed_searches_trains_on_the_answered_queries_only():
    """The loop leaves out queries whose search failed: PPO trains on the other samples' rows (each
    pointed at its query's reward) and the invalid samples' penalties, never on a failed query's."""
    policy = build_policy("ppo", concepts=CONCEPTS, seed=0, **FAST)
    batch = policy.propose(6)
    rollout = policy.rollout
    answered = [0, 2, 5]
    sub = rollout.observed([batch[i] for i in answered])
    kept = [r for r in range(6) if r in answered or rollout.invalid[r]]
    assert sub.queries == [batch[i] for i in answered] and sub.responses.shape[0] == len(kept)
    assert sub.query_index == [answered.index(r) if r in answered else -1 for r in kept]
    assert torch.equal(sub.logprobs, rollout.logprobs[kept]) and torch.equal(sub.values, rollout.values[kept])
    weights = [p.detach().clone() for p in policy.model.parameters() if p.requires_grad]
    policy.update([batch[i] for i in answered], [0.1, 0.9, 0.4])
    assert "ppo_seconds" in policy.stats and policy.log.texts == [batch[i].text for i in answered]
    after = [p for p in policy.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(weights, after))  # PPO stepped on the subset


def test_ppo_defaults_are_the_measured_configuration_and_earlier_commands_pin_theirs():
    """`ppo` with no options is BENCHMARKS 8's ppo-meaning-nofound for a pretrained LM; the tiny LM,
    llm-prompt and hybrid keep the config's defaults; options given win; and the commands behind the
    numbers measured before (the simulation's and the loop grid's `ppo`, ppo-shaped) still build the
    configuration they ran."""
    from bench.acquisition_grid import CONDITIONS
    from bench.exp_llm_simulation import POLICIES as SIMULATED
    from policies.hybrid import HybridPolicy
    from policies.ppo_llm import LLMQueryPolicy, PromptOnlyPolicy

    def built(options):
        return LLMPolicyConfig(**LLMQueryPolicy.with_defaults(options))

    measured = LLMPolicyConfig(**SIMULATED["ppo-meaning-nofound"][1])
    assert built({}) == measured == built(CONDITIONS["ppo-meaning-nofound"][1])
    assert built({"model": "tiny"}) == LLMPolicyConfig(model="tiny")
    assert PromptOnlyPolicy.with_defaults({}) == {} and HybridPolicy.with_defaults({}) == {}
    assert built({"ppo_epochs": 4}).ppo_epochs == 4 and built({"ppo_epochs": 4}).kl_target == 1.0
    earlier = LLMPolicyConfig()  # what `ppo` with no options built before its defaults changed
    assert built(SIMULATED["ppo"][1]) == earlier == built(CONDITIONS["ppo"][1])
    assert built(SIMULATED["ppo-shaped"][1]) == LLMPolicyConfig(**SIMULATED["ppo-shaped"][1])
    assert built(SIMULATED["ppo-shaped"][1]).novelty_measure == "words"
