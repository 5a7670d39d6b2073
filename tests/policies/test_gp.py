"""The GP policy on real MiniLM embeddings of concept words: does it generalise rewards by meaning?"""

import numpy as np
import pytest
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

from explorer.web.text_encoder import default_encoder
from policies import Query, build_policy
from policies.gp import GPConfig, fit_gp, gp_posterior, latest_distinct
from policies.random_policy import QueryLog

FOOTWEAR = ["shoe", "boot", "sandal", "sneaker", "slipper", "loafer", "moccasin", "clog",
            "flip-flop", "high heel", "ankle boot", "running shoe", "wellington boot",
            "espadrille", "stiletto"]
OTHER = ["shirt", "t-shirt", "dress", "coat", "trousers", "pullover", "sweater", "jacket", "skirt",
         "jeans", "dog", "cat", "horse", "cow", "elephant", "tiger", "rabbit", "sparrow", "salmon",
         "frog", "car", "truck", "tractor", "bicycle", "bus", "train", "airplane", "motorcycle",
         "boat", "helicopter", "banana", "apple", "bread", "cheese", "pizza", "carrot", "rice",
         "soup", "chocolate", "orange", "guitar", "hammer", "computer", "telephone", "clock", "book",
         "chair", "lamp", "mountain", "river"]
CONCEPTS = FOOTWEAR + OTHER
REWARDED = ["sneaker", "slipper", "loafer", "high heel", "shoe", "moccasin"]
UNREWARDED = ["dog", "car", "apple", "pizza", "truck", "cat", "guitar", "chair", "horse", "bread",
              "bus", "computer"]


@pytest.fixture(scope="module")
def embeddings():
    return default_encoder().encode(CONCEPTS)


def observed_gp(embeddings, seed: int = 0, **config):
    """A GP policy that heard: footwear words reward 0.8, unrelated words 0.3."""
    policy = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=seed, **config)
    queries = [Query(c, CONCEPTS.index(c)) for c in REWARDED + UNREWARDED]
    policy.update(queries, [0.8] * len(REWARDED) + [0.3] * len(UNREWARDED))
    return policy


def footwear_share(policy, batches: int = 8, n: int = 4) -> float:
    picks = [q.text in FOOTWEAR for _ in range(batches) for q in policy.propose(n)]
    return float(np.mean(picks))


def test_untried_concepts_near_rewarded_ones_are_predicted_higher(embeddings):
    policy = observed_gp(embeddings)
    mean, std = policy.predict()
    at = {c: mean[i] for i, c in enumerate(CONCEPTS)}
    assert min(at["boot"], at["sandal"]) > max(at["tractor"], at["banana"])
    untried_footwear = [at[c] for c in FOOTWEAR if c not in REWARDED]
    untried_other = [at[c] for c in OTHER if c not in UNREWARDED]
    assert np.mean(untried_footwear) > np.mean(untried_other) + 0.05
    assert np.all(std > 0) and std.shape == (len(CONCEPTS),)


def test_softmax_proposals_concentrate_on_the_rewarded_region(embeddings):
    gp_share = footwear_share(observed_gp(embeddings, acquisition="softmax"))
    baseline = build_policy("random", concepts=CONCEPTS, seed=0)
    baseline.update([Query(c, CONCEPTS.index(c)) for c in REWARDED + UNREWARDED],
                    [0.0] * (len(REWARDED) + len(UNREWARDED)))
    random_share = footwear_share(baseline)
    # 9 of the 47 untried concepts are footwear: random picks ~19% of them.
    assert gp_share >= 0.6 and gp_share > 2 * random_share, (gp_share, random_share)


def test_lower_temperature_concentrates_more(embeddings):
    cold = footwear_share(observed_gp(embeddings, temperature=0.1), batches=12)
    hot = footwear_share(observed_gp(embeddings, temperature=3.0), batches=12)
    assert cold > hot, (cold, hot)


def test_ucb_trades_mean_against_uncertainty(embeddings):
    greedy = observed_gp(embeddings, acquisition="ucb", ucb_beta=0.0)
    mean, std = greedy.predict()
    untried = ~greedy.log.tried
    best_mean = np.flatnonzero(untried)[np.argmax(mean[untried])]
    assert greedy.propose(1)[0].concept == best_mean
    assert CONCEPTS[best_mean] in FOOTWEAR

    curious = observed_gp(embeddings, acquisition="ucb", ucb_beta=100.0)
    most_uncertain = np.flatnonzero(untried)[np.argmax(std[untried])]
    assert curious.propose(1)[0].concept == most_uncertain
    assert most_uncertain != best_mean


def test_explore_share_draws_part_of_every_batch_uniformly(embeddings):
    greedy = observed_gp(embeddings, acquisition="ucb", ucb_beta=0.0, explore_share=0.0).propose(8)
    shares = [observed_gp(embeddings, seed, acquisition="ucb", ucb_beta=0.0, explore_share=0.5) for seed in (1, 2)]
    batches = [policy.propose(8) for policy in shares]
    for batch in batches:
        assert batch[:4] == greedy[:4]  # the GP's own picks come first, in its order
        explored = [q.concept for q in batch[4:]]
        assert len(set(explored)) == 4 and not set(explored) & {q.concept for q in batch[:4]}
        assert not any(shares[0].log.tried[explored])
    assert batches[0][4:] != batches[1][4:]  # drawn with the policy's RNG, not by score
    assert all(CONCEPTS[q.concept] in FOOTWEAR for q in greedy[:4])


def test_repeat_penalty_lets_a_good_concept_be_asked_again(embeddings):
    untried_only = observed_gp(embeddings, acquisition="ucb", ucb_beta=0.0)
    assert not untried_only.log.tried[untried_only.propose(1)[0].concept]
    repeats = observed_gp(embeddings, acquisition="ucb", ucb_beta=0.0, repeat_penalty=0.0)
    top = repeats.propose(1)[0].text
    assert top in REWARDED  # the observed 0.8s beat any prediction for an untried concept


def test_free_text_queries_are_embedded_and_learned_from(embeddings):
    policy = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, explore_first=4)
    texts = ["leather shoes and boots", "summer sandals", "farm machinery", "tropical fruit",
             "wild animals", "sports cars"]
    policy.update([Query(t) for t in texts], [0.9, 0.9, 0.2, 0.2, 0.2, 0.2])
    assert sorted(policy.text_vectors) == sorted(texts)
    assert policy.fitted().points.shape == (len(texts), embeddings.shape[1])
    mean, _ = policy.predict([CONCEPTS.index(c) for c in ("sandal", "boot", "tractor", "banana")])
    assert min(mean[:2]) > max(mean[2:])


def test_explore_first_proposals_match_the_random_policy(embeddings):
    gp = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=3, explore_first=10)
    uniform = build_policy("random", concepts=CONCEPTS, seed=3)
    for _ in range(2):  # 8 observations < explore_first: still uniform exploration
        batch = gp.propose(4)
        assert batch == uniform.propose(4)
        gp.update(batch, [0.5] * 4)
        uniform.update(batch, [0.5] * 4)


def test_refit_after_load_reproduces_the_model(embeddings):
    policy = observed_gp(embeddings, optimizer_restarts=2)
    reloaded = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=99)
    reloaded.load_state_dict(policy.state_dict())
    a, b = policy.fitted(), reloaded.fitted()
    assert (a.length_scale, a.amplitude, a.noise) == (b.length_scale, b.amplitude, b.noise)
    np.testing.assert_array_equal(a.alpha, b.alpha)


def test_posterior_by_matmul_matches_sklearn_predict():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((40, 16)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    targets = points[:, 0] * 2.0 + 0.1 * rng.standard_normal(40)
    fitted = fit_gp(points, targets, GPConfig(), random_state=0)
    queries = rng.standard_normal((300, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    mean, std = gp_posterior(fitted, queries, with_std=True, chunk=64)

    kernel = (ConstantKernel(fitted.amplitude) * RBF(fitted.length_scale)
              + WhiteKernel(fitted.noise))
    reference = GaussianProcessRegressor(kernel, optimizer=None).fit(
        points, (targets - fitted.target_mean) / fitted.target_scale)
    ref_mean, ref_std = reference.predict(queries, return_std=True)  # ref_std includes the noise
    np.testing.assert_allclose(mean, fitted.target_mean + fitted.target_scale * ref_mean, atol=1e-4)
    np.testing.assert_allclose(std**2 + fitted.noise * fitted.target_scale**2,
                               (fitted.target_scale * ref_std) ** 2, rtol=1e-3, atol=1e-5)


def test_latest_distinct_merges_repeats_and_keeps_the_newest():
    log = QueryLog(num_concepts=5)
    log.record([Query("a", 0), Query("b", 1), Query("x"), Query("a", 0), Query("c", 2)],
               [1.0, 2.0, 3.0, 5.0, 4.0])
    keys, targets = latest_distinct(log, limit=3)
    assert keys == ["x", 0, 2]  # "b" was issued least recently; "a" was re-issued after "x"
    np.testing.assert_allclose(targets, [3.0, 3.0, 4.0])


def test_config_errors_name_the_problem(embeddings):
    with pytest.raises(ValueError, match="softmax, ucb"):
        build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, acquisition="thompson")
    with pytest.raises(ValueError, match="temperature"):
        GPConfig(temperature=0.0)
    with pytest.raises(ValueError, match="explore_share"):
        GPConfig(explore_share=1.5)
    with pytest.raises(ValueError, match="embeddings for"):
        build_policy("gp", concepts=CONCEPTS, embeddings=embeddings[:10])


def test_a_failed_encoding_leaves_the_log_untouched(embeddings):
    def broken_encoder(texts):
        raise RuntimeError("encoder unavailable")

    policy = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings,
                          text_encoder=broken_encoder)
    policy.update([Query("boot", CONCEPTS.index("boot"))], [0.7])  # vocabulary: no encoding
    with pytest.raises(RuntimeError, match="encoder unavailable"):
        policy.update([Query("sandal", CONCEPTS.index("sandal")), Query("winter boots")], [0.5, 0.6])
    assert policy.log.texts == ["boot"] and policy.text_vectors == {}


def test_observed_background_queries_steer_the_first_batch(embeddings):
    """`observe` (the run's background queries, which the policy did not choose) is evidence like its
    own: the first batch already follows it instead of being uniform; off, nothing is heard."""
    queries = [Query(c, CONCEPTS.index(c)) for c in REWARDED + UNREWARDED]
    rewards = [0.8] * len(REWARDED) + [0.3] * len(UNREWARDED)
    policy = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=0, acquisition="ucb",
                          explore_first=8, explore_share=0.0, observe_background=True)
    assert policy.observe(queries, rewards) is True
    assert len(policy.log) == len(queries) and policy.log.tried[CONCEPTS.index("sneaker")]
    first = [q.text for q in policy.propose(4)]
    assert sum(t in FOOTWEAR for t in first) >= 3 and not set(first) & set(REWARDED + UNREWARDED), first
    deaf = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=0)  # the default
    assert deaf.observe(queries, rewards) is False and len(deaf.log) == 0


def test_captions_of_well_scored_images_lead_to_the_concepts_they_name(embeddings):
    """`observe_captions` (a round's best-scored images' captions, heard as free text): when every
    query so far earned little, two shoe captions worth a typical target image's yield raise the
    prediction at the footwear concepts above every other untried one, and the next batch takes the
    two they name (without them: 'loafer, running shoe, rice, boot', far from what was tried);
    off (the default), nothing is heard."""
    queries = [Query(c, CONCEPTS.index(c)) for c in UNREWARDED]
    rewards = [0.02, 0.01, 0.03, 0.0, 0.02, 0.01, 0.0, 0.02, 0.01, 0.03, 0.0, 0.02]
    captions = ["kids' ankle boot", "new arrival slipper"]
    policy = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=0, acquisition="ucb",
                          explore_first=4, explore_share=0.0, caption_feedback=8)
    policy.update(queries, rewards)
    assert policy.captions_wanted == 8
    assert policy.observe_captions(captions, [0.5, 0.45]) is True
    assert policy.log.texts[-2:] == captions and policy.log.rewards[-2:] == [0.5, 0.45]
    assert not policy.log.tried[CONCEPTS.index("slipper")]  # free text: no concept counts as tried
    mean, _ = policy.predict()
    at = {c: m for c, m in zip(CONCEPTS, mean)}
    assert min(at["ankle boot"], at["slipper"], at["boot"]) > max(at[c] for c in OTHER if c not in UNREWARDED)
    batch = [q.text for q in policy.propose(4)]
    assert {"ankle boot", "slipper"} <= set(batch), batch
    deaf = build_policy("gp", concepts=CONCEPTS, embeddings=embeddings, seed=0)
    assert deaf.captions_wanted == 0 and deaf.observe_captions(captions, [0.5, 0.45]) is False
    assert len(deaf.log) == 0
    with pytest.raises(ValueError, match="caption_feedback"):
        GPConfig(caption_feedback=-1)
