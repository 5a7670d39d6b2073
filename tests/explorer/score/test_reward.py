import math

import numpy as np
import pytest

from explorer.score.reward import (
    QUERY_AGGREGATES,
    BackgroundSample,
    RewardCalibration,
    RewardConfig,
    TargetIndex,
    centred,
    contrast_reward,
    dedupe_within,
    knn_reward,
    leave_one_out_rewards,
    mean_pairwise_cosine,
    near_duplicates,
    query_reward,
    query_yield,
    select_for_training,
    unit_rows,
    web_offset,
)

R = 1 / math.sqrt(2)
COMPASS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)  # 4 unit targets in 2-D


def brute_force_reward(candidates, targets, k):
    sims = unit_rows(candidates) @ unit_rows(targets).T
    return np.sort(sims, axis=1)[:, ::-1][:, :k].mean(axis=1)


# --- knn_reward ---------------------------------------------------------------------------------

def test_knn_reward_matches_hand_computed_2d():
    index = TargetIndex(COMPASS)
    candidates = np.array([[1, 0], [R, R], [5, 0]], dtype=np.float32)
    # (1,0): cosines 1, 0, 0, -1 -> top-2 mean 0.5, top-3 mean 1/3.
    # (R,R): cosines R, R, -R, -R -> top-2 mean R, top-3 mean R/3.
    # (5,0): same direction as (1,0), so the same reward (inputs are normalised).
    np.testing.assert_allclose(knn_reward(candidates, index, k=2), [0.5, R, 0.5], atol=1e-6)
    np.testing.assert_allclose(knn_reward(candidates, index, k=3), [1 / 3, R / 3, 1 / 3], atol=1e-6)


def test_knn_reward_matches_hand_computed_3d():
    targets = np.array([[1, 0, 0], [0, 1, 0], [R, R, 0]], dtype=np.float32)
    index = TargetIndex(targets)
    candidates = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    # e1: cosines 1, R, 0 -> top-2 mean (1 + R) / 2.  e3 is orthogonal to every target -> 0.
    np.testing.assert_allclose(knn_reward(candidates, index, k=2), [(1 + R) / 2, 0.0], atol=1e-6)


def test_knn_clips_k_to_the_number_of_targets():
    index = TargetIndex(COMPASS)
    sims, ids = index.knn(np.array([[1, 0]], dtype=np.float32), k=50)
    assert sims.shape == ids.shape == (1, 4)
    assert ids[0, 0] == 0 and ids[0, -1] == 2  # best (itself) first, the opposite vector last
    np.testing.assert_allclose(knn_reward(np.array([[1, 0]]), index, k=50), [0.0], atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 10_000])
def test_chunked_reward_equals_unchunked_and_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(300, 16)).astype(np.float32)
    candidates = rng.normal(size=(1000, 16)).astype(np.float32)
    index = TargetIndex(targets)
    whole = knn_reward(candidates, index, k=5, chunk_size=len(candidates))
    chunked = knn_reward(candidates, index, k=5, chunk_size=chunk_size)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(whole, brute_force_reward(candidates, targets, 5), atol=1e-5)


def test_refresh_changes_rewards():
    index = TargetIndex(COMPASS[:1])  # only (1, 0)
    candidate = np.array([[0, 1]], dtype=np.float32)
    before = knn_reward(candidate, index, k=1)
    index.refresh(np.array([[0, 1], [0, -1], [1, 0]], dtype=np.float32))
    after = knn_reward(candidate, index, k=1)
    np.testing.assert_allclose(before, [0.0], atol=1e-6)
    np.testing.assert_allclose(after, [1.0], atol=1e-6)
    assert len(index) == 3


def test_empty_candidates_and_bad_targets():
    index = TargetIndex(COMPASS)
    assert knn_reward(np.zeros((0, 2), np.float32), index).shape == (0,)
    with pytest.raises(ValueError, match="empty"):
        TargetIndex(np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        TargetIndex(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="dim"):
        index.knn(np.ones((1, 3), np.float32), k=1)


# --- query_reward -------------------------------------------------------------------------------

def test_query_reward_aggregates():
    rewards = np.array([0.1, 0.9, 0.2, 0.8, 0.0])
    assert query_reward(rewards, how="mean_top", top_m=2) == pytest.approx(0.85)
    assert query_reward(rewards, how="mean_top", top_m=100) == pytest.approx(0.4)  # all 5
    assert query_reward(rewards, how="mean") == pytest.approx(0.4)
    assert query_reward(rewards, how="max") == pytest.approx(0.9)
    assert set(QUERY_AGGREGATES) >= {"mean_top", "mean", "max"}


def test_query_reward_of_an_empty_or_all_invalid_query_is_the_fixed_finite_value():
    assert query_reward(np.array([])) == 0.0
    assert query_reward([], empty=-1.0) == -1.0
    assert query_reward(np.array([np.nan, np.inf])) == 0.0
    # Non-finite rewards are ignored, not propagated.
    assert query_reward(np.array([0.5, np.nan]), how="mean") == pytest.approx(0.5)


def test_query_reward_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid"):
        query_reward([0.5], how="median")
    with pytest.raises(ValueError, match="top_m must be >= 1"):
        query_reward([0.5], top_m=0)
    with pytest.raises(ValueError, match="empty-query reward must be finite"):
        query_reward([0.5], empty=float("nan"))


# --- select_for_training ------------------------------------------------------------------------

def test_select_threshold_path_accepts_exactly_those_at_or_above():
    rewards = np.array([0.1, 0.6, 0.5, 0.9, 0.49])
    mask = select_for_training(rewards, threshold=0.5, top_fraction=0.2)
    assert mask.tolist() == [False, True, True, True, False]


def test_select_falls_back_to_top_fraction_when_nothing_passes():
    rewards = np.array([0.1, 0.6, 0.5, 0.9, 0.3])
    mask = select_for_training(rewards, threshold=0.95, top_fraction=0.4)
    assert mask.tolist() == [False, True, False, True, False]  # ceil(0.4 * 5) = 2 best
    assert select_for_training(rewards, threshold=None, top_fraction=0.4).tolist() == mask.tolist()


def test_select_min_keep_forces_the_fallback_and_contains_the_passing_ones():
    rewards = np.array([0.1, 0.6, 0.5, 0.9, 0.3])
    mask = select_for_training(rewards, threshold=0.8, top_fraction=0.0, min_keep=3)
    assert mask.tolist() == [False, True, True, True, False]


def test_select_edge_cases():
    empty = select_for_training(np.array([]), threshold=0.5, top_fraction=0.5)
    assert empty.dtype == bool and empty.shape == (0,)
    # All equal: threshold at that value accepts all; above it, ties are broken by position.
    equal = np.full(6, 0.3)
    assert select_for_training(equal, threshold=0.3, top_fraction=0.5).all()
    assert select_for_training(equal, threshold=0.4, top_fraction=0.5).tolist() == [True] * 3 + [False] * 3
    # NaN is never accepted, even when the fallback asks for more than the finite ones.
    with_nan = np.array([np.nan, 0.2, np.nan])
    assert select_for_training(with_nan, threshold=None, top_fraction=1.0).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="top_fraction"):
        select_for_training(equal, threshold=None, top_fraction=1.5)


# --- decontamination ----------------------------------------------------------------------------

def test_near_duplicates_flags_only_close_candidates():
    reference = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    candidates = np.array([
        [2, 0, 0],          # same direction as a reference: cosine 1
        [1, 0.2, 0],        # cosine 0.98 with e1
        [1, 1, 0],          # cosine R ~ 0.71 with both
        [0, 0, 1],          # orthogonal
    ], dtype=np.float32)
    assert near_duplicates(candidates, reference, threshold=0.95).tolist() == [True, True, False, False]
    assert near_duplicates(candidates, reference, threshold=0.7).tolist() == [True, True, True, False]
    assert not near_duplicates(candidates, np.zeros((0, 3), np.float32)).any()


def test_dedupe_within_keeps_the_first_of_each_group_greedily():
    a = [1.0, 0.0]
    b = [math.cos(0.3), math.sin(0.3)]  # cosine 0.955 with a and with c
    c = [math.cos(0.6), math.sin(0.6)]  # cosine 0.825 with a
    emb = np.array([a, b, c, a, [0, 1]], dtype=np.float32)
    # b is dropped by a; c survives because its only close item, b, was not kept; the repeat
    # of a is dropped; the orthogonal item is kept.
    for block_size in (1, 2, 1024):
        keep = dedupe_within(emb, threshold=0.95, block_size=block_size)
        assert keep.tolist() == [True, False, True, False, True]
    assert dedupe_within(np.zeros((0, 2), np.float32)).shape == (0,)


def naive_greedy_dedupe(emb, threshold):
    emb = unit_rows(emb)
    kept = []
    for i in range(len(emb)):
        if all(emb[i] @ emb[j] < threshold for j in kept):
            kept.append(i)
    mask = np.zeros(len(emb), dtype=bool)
    mask[kept] = True
    return mask


def test_dedupe_within_matches_a_naive_greedy_pass_on_clustered_data():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 8))
    emb = centres[rng.integers(0, 20, size=300)] + 0.15 * rng.normal(size=(300, 8))
    expected = naive_greedy_dedupe(emb, 0.97)
    assert 20 < expected.sum() < 300  # the case is non-trivial
    np.testing.assert_array_equal(dedupe_within(emb, 0.97, block_size=32), expected)


# --- RewardConfig -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"k": 0}, {"aggregate": "median"}, {"top_m": 0}, {"empty_query_reward": float("nan")},
    {"accept_threshold": 1.5}, {"accept_top_fraction": -0.1}, {"min_keep": -1},
    {"dedupe_threshold": -1.0}, {"decontaminate_threshold": 1.2}, {"chunk_size": 0},
    {"query": "sum"}, {"accept": "all"}, {"accept_percentile": 101}, {"max_accept": -1},
    {"background_queries": -1}, {"background_weight": 1.5}, {"background_weight": -0.1},
    {"web_percentile": 120}, {"background_update": "never"}, {"min_spread": -1},
])
def test_reward_config_rejects_invalid_values(bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        RewardConfig(**bad)


# --- calibration, acceptance by value, query yield ----------------------------------------------

def test_leave_one_out_rewards_match_brute_force_without_self():
    rng = np.random.default_rng(0)
    targets = unit_rows(rng.normal(size=(40, 8)))
    targets[7] = targets[3]  # an exact duplicate still counts as the other's neighbour
    sims = targets @ targets.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.sort(sims, axis=1)[:, ::-1][:, :5].mean(axis=1)
    np.testing.assert_allclose(leave_one_out_rewards(TargetIndex(targets), k=5), expected, atol=1e-5)


def test_percentile_reads_rewards_on_the_targets_own_scale():
    calibration = RewardCalibration(np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(calibration.percentile(np.array([0.05, 0.2, 0.35, 0.9, np.nan])),
                               [0.0, 0.5, 0.75, 1.0, 0.0])
    assert calibration.threshold(50) == pytest.approx(0.25)
    # the same candidates under an encoder that maps everything closer together read the same
    squeezed = RewardCalibration(0.9 + np.array([0.1, 0.2, 0.3, 0.4]) / 10)
    np.testing.assert_allclose(squeezed.percentile(0.9 + np.array([0.05, 0.2, 0.35]) / 10), [0.0, 0.5, 0.75])


def test_accept_by_value_takes_what_clears_the_targets_percentile_and_nothing_else():
    calibration = RewardCalibration(np.linspace(0.5, 1.0, 101))  # 10th percentile: 0.55
    config = RewardConfig(accept="value", accept_percentile=10)
    rewards = np.array([0.2, 0.56, 0.54, 0.9, np.nan, 0.55])
    assert config.accept_mask(rewards, calibration).tolist() == [False, True, False, True, False, True]
    assert not config.accept_mask(np.full(20, 0.3), calibration).any()  # nothing relevant: nothing added
    capped = RewardConfig(accept="value", accept_percentile=10, max_accept=2)
    assert capped.accept_mask(rewards, calibration).tolist() == [False, True, False, True, False, False]
    with pytest.raises(ValueError, match="calibration"):
        config.accept_mask(rewards, None)


def test_select_keeps_the_best_of_near_copies_and_drops_copies_of_accepted_and_held_out_items():
    calibration = RewardCalibration(np.linspace(0.5, 1.0, 101))
    config = RewardConfig(accept="value", accept_percentile=10, dedupe_threshold=0.95, decontaminate_threshold=0.95)
    e = np.eye(4, dtype=np.float32)
    sig = np.stack([e[0], e[0], e[1], e[2], e[3], e[3]])  # 0 and 1 are copies, as are 4 and 5
    rewards = np.array([0.6, 0.9, 0.8, 0.7, 0.3, 0.2])  # 4 and 5 do not clear the threshold
    asked = []

    def signatures(rows):
        asked.append(sorted(rows.tolist()))
        return sig[rows]

    assert config.select(rewards, calibration, signatures, np.zeros((0, 4))).tolist() == [1, 2, 3]
    assert asked == [[0, 1, 2, 3]]  # signatures only of what the reward chose
    # against what was accepted before (item 2's copy) and a held-out split (item 3's copy)
    assert config.select(rewards, calibration, signatures, e[1:2], held_out=e[2:3]).tolist() == [1]
    assert config.select(np.zeros(0), calibration, signatures, np.zeros((0, 4))).tolist() == []


def test_query_yield_counts_what_a_query_found_per_result_asked_for():
    calibration = RewardCalibration(np.array([0.1, 0.2, 0.3, 0.4]))
    config = RewardConfig(query="yield")
    rewards = np.array([0.45, 0.05, 0.35, 0.25])  # percentiles 1, 0, 0.75, 0.5
    # query 0 found images 0 and 2; query 1 found image 2 (shared) and 3; query 2 found only
    # image 1 (unlike the target); query 3 found nothing (or only failed fetches)
    queries_of = [[0], [2], [0, 1], [1]]
    rewards_by_query = config.query_rewards(rewards, queries_of, 4, calibration, requested=4)
    np.testing.assert_allclose(rewards_by_query, [(1 + 0.75) / 4, (0.75 + 0.5) / 4, 0.0, 0.0])
    assert query_yield([np.array([0.5, 0.5])], requested=2) == [0.5]
    with pytest.raises(ValueError, match="requested"):
        query_yield([], requested=0)
    aggregate = RewardConfig(query="aggregate", aggregate="mean")
    assert aggregate.query_rewards(rewards, queries_of, 4, calibration, 4)[0] == pytest.approx(0.4)


def test_reward_config_applies_its_settings():
    config = RewardConfig(k=2, aggregate="mean", accept="top_fraction", accept_threshold=0.99, accept_top_fraction=0.5)
    rewards = config.image_rewards(np.array([[1, 0], [R, R]], dtype=np.float32), TargetIndex(COMPASS))
    np.testing.assert_allclose(rewards, [0.5, R], atol=1e-6)
    assert config.query_reward(rewards) == pytest.approx((0.5 + R) / 2)
    assert config.accept_mask(rewards, None).tolist() == [False, True]  # nothing reaches 0.99: top half
    with pytest.raises(Exception):
        config.k = 3  # frozen


def test_image_signature_flags_copies_not_lookalikes():
    import gzip

    import torch

    from explorer.score.reward import image_signature
    from explorer.web.sources import FASHION_MNIST_DIR

    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        grey = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:200]
    images = torch.from_numpy(np.pad(grey, ((0, 0), (2, 2), (2, 2)))).unsqueeze(1).repeat(1, 3, 1, 1)
    sig = image_signature(images)
    brighter = image_signature((images.int() + 12).clamp(max=255).to(torch.uint8))
    assert ((sig * brighter).sum(1) >= 0.99).all()  # a re-encoded, brightened copy is still a copy
    sims = sig @ sig.T
    distinct = sims[np.triu_indices(len(sig), 1)]
    assert (distinct >= 0.99).mean() < 0.01  # different real items are not


# --- contrast with a background sample of the web ---------------------------------------------

def test_contrast_reward_subtracts_the_weighted_background_similarity():
    rng = np.random.default_rng(1)
    targets, web, candidates = (rng.normal(size=(n, 6)).astype(np.float32) for n in (30, 20, 12))
    index, background = TargetIndex(targets), TargetIndex(web)
    expected = brute_force_reward(candidates, targets, 4) - 0.3 * brute_force_reward(candidates, web, 4)
    np.testing.assert_allclose(contrast_reward(candidates, index, background, k=4, weight=0.3), expected, atol=1e-5)
    np.testing.assert_allclose(RewardConfig(k=4, background_weight=0.3).image_rewards(candidates, index, background),
                               expected, atol=1e-5)
    plain = knn_reward(candidates, index, 4)
    np.testing.assert_array_equal(contrast_reward(candidates, index, None, k=4, weight=0.3), plain)
    np.testing.assert_array_equal(contrast_reward(candidates, index, background, k=4, weight=0.0), plain)
    # the target's own scale is contrasted the same way
    calibration = RewardConfig(k=4, background_weight=0.3).calibrate(index, background)
    own = leave_one_out_rewards(index, 4) - 0.3 * brute_force_reward(targets, web, 4)
    np.testing.assert_allclose(calibration.reference, np.sort(own), atol=1e-5)
    assert RewardConfig(k=4).calibrate(index).reference.tolist() == np.sort(leave_one_out_rewards(index, 4)).tolist()


def test_background_refuses_a_kind_that_is_close_to_everything_yet_keeps_the_targets():
    """The failure the background exists for: a kind of web image (digits, under an encoder adapted to
    clothing) sits near the common direction of every target image, so it is as similar to the target
    as the targets are to each other and passes acceptance by value; the web holds many of them."""
    rng = np.random.default_rng(0)
    dim = 40
    common = np.eye(dim, dtype=np.float32)[0]

    def spread(n, scale, axes):  # the common direction plus noise in the given axes
        noise = np.zeros((n, dim), np.float32)
        noise[:, axes] = rng.normal(size=(n, len(axes))) / np.sqrt(len(axes))
        return unit_rows(common + scale * noise)

    target_axes, other_axes = list(range(1, 33)), list(range(33, 40))
    targets, target_kind = spread(100, 1.2, target_axes), spread(300, 1.2, target_axes)
    lookalikes = spread(300, 0.2, other_axes)
    unrelated = unit_rows(rng.normal(size=(300, dim)))
    web = np.concatenate([lookalikes[:100], unrelated[:100], spread(60, 1.2, target_axes)])  # a random draw
    index, background = TargetIndex(targets), TargetIndex(web)

    def passing(config, bg):
        calibration = config.calibrate(index, bg)
        return {name: float(config.accept_mask(config.image_rewards(x, index, bg), calibration).mean())
                for name, x in (("target", target_kind), ("lookalike", lookalikes[100:]), ("unrelated", unrelated))}

    plain = passing(RewardConfig(accept_percentile=10, background_weight=0.0), background)
    contrast = passing(RewardConfig(accept_percentile=10, background_weight=0.5), background)
    assert plain["lookalike"] > 0.9  # the plain reward lets the look-alikes in ...
    assert contrast["lookalike"] < 0.1  # ... the contrast does not
    assert contrast["target"] > 0.8 and plain["target"] > 0.8
    assert contrast["unrelated"] == plain["unrelated"] == 0.0


def test_background_sample_is_a_uniform_reservoir_that_resumes_exactly():
    assert len(BackgroundSample(0, seed=0).items) == 0
    small = BackgroundSample(10, seed=0)
    small.add(range(7))
    assert small.items == list(range(7)) and small.seen == 7
    # each of 100 items ends in a 10-item sample with probability 0.1, early or late (over 600 seeds)
    inclusion = np.zeros(100)
    for seed in range(600):
        sample = BackgroundSample(10, seed)
        sample.add(range(100))
        assert len(sample) == 10 and len(set(sample.items)) == 10
        inclusion[sample.items] += 1 / 600
    assert abs(inclusion[:20].mean() - 0.1) < 0.02 and abs(inclusion[-20:].mean() - 0.1) < 0.02
    # the sample depends on the seed and the items added, not on how the adding was split or resumed
    whole = BackgroundSample(10, seed=3)
    whole.add(range(100))
    first = BackgroundSample(10, seed=3)
    first.add(range(40))
    resumed = BackgroundSample(10, seed=3)
    resumed.load_state_dict(first.state_dict())
    resumed.add(range(40, 100))
    assert resumed.items == whole.items and resumed.seen == 100
    other = BackgroundSample(10, seed=4)
    other.add(range(100))
    assert other.items != whole.items
    with pytest.raises(ValueError, match="capacity"):
        BackgroundSample(-1, seed=0)


# --- the reward space: centring, the web's reference, collapse --------------------------------

def _collapsed(rng, n, d=32, shared=None, scale=1e-3):
    """n unit rows within ~`scale` of one shared direction: what an encoder that maps every image
    onto one direction gives; the small parts still carry which kind an image is."""
    shared = np.ones(d) if shared is None else shared
    return unit_rows(shared + scale * rng.normal(size=(n, d)))


def test_mean_pairwise_cosine_and_centring():
    rng = np.random.default_rng(0)
    assert mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)
    squeezed = _collapsed(rng, 200)
    assert mean_pairwise_cosine(squeezed) > 0.999
    assert abs(mean_pairwise_cosine(centred(squeezed, squeezed.mean(axis=0)))) < 0.02
    np.testing.assert_allclose(centred(squeezed, None), unit_rows(squeezed))


def test_centring_restores_the_spread_of_a_collapsed_encoder_and_keeps_its_ranking():
    rng = np.random.default_rng(1)
    d = 32
    kind = np.zeros(d)
    kind[0] = 1.0  # the target's kind differs from the rest of the web along one small direction
    shared = np.ones(d) * 3

    def images(n, of_kind):
        return _collapsed(rng, n, d, shared + (kind if of_kind else -kind) * 3e-3)

    target, web = images(100, True), np.concatenate([images(50, True), images(450, False)])
    plain = RewardConfig(centre=False, web_percentile=None).space(target, web, web)
    fixed = RewardConfig(web_percentile=None).space(target, web, web)
    assert plain.health(0.01)["reward_collapsed"] and plain.calibration.spread() < 1e-3
    assert not fixed.health(0.01)["reward_collapsed"] and fixed.calibration.spread() > 0.05
    candidates = np.concatenate([images(30, True), images(30, False)])
    rewards = fixed.rewards(candidates)
    assert rewards[:30].min() > rewards[30:].max()  # the ranking survives centring
    assert fixed.anisotropy > 0.999  # the health reports the raw encoder's anisotropy


def test_the_webs_reference_accepts_a_kind_in_another_style_and_changes_nothing_on_a_web_of_the_target():
    rng = np.random.default_rng(2)
    d = 16
    kind, style = np.eye(d)[0] * 3, np.eye(d)[1] * 3

    def images(n, centre):
        return unit_rows(centre + rng.normal(size=(n, d)) * 0.5)

    target = images(100, kind + style)  # the user's style of the kind
    web = np.concatenate([images(60, kind - style), images(940, -kind)])  # the web's style of it, and the rest
    candidates = np.concatenate([images(50, kind - style), images(50, -kind)])
    strict = RewardConfig(web_percentile=None, background_size=0).space(target, None, web)
    relative = RewardConfig(web_percentile=95.0, background_size=0).space(target, None, web)
    accept = {name: s_.rewards(candidates) >= s_.calibration.threshold(10) for name, s_ in
              (("strict", strict), ("relative", relative))}
    assert accept["strict"][:50].sum() == 0  # the target's own 10th percentile is out of the web's reach
    assert accept["relative"][:50].sum() >= 40 and accept["relative"][50:].sum() <= 10
    assert relative.calibration.offset > 0 and strict.calibration.offset == 0
    # a web made of the target's kind in its own style: the web's reference lies above the target's
    same = RewardConfig(web_percentile=95.0, background_size=0).space(target, None, images(1000, kind + style))
    assert same.calibration.offset == 0


def test_web_offset_and_percentile_are_consistent():
    calibration = RewardCalibration(np.linspace(0.5, 1.0, 101))
    web = np.linspace(0.0, 0.6, 101)  # 95th percentile 0.57: above the target's 10th (0.55)
    assert web_offset(calibration, web, 10, 95) == 0.0
    low = np.linspace(0.0, 0.4, 101)  # 95th percentile 0.38: 0.17 below the target's 10th
    offset = web_offset(calibration, low, 10, 95)
    assert offset == pytest.approx(0.17)
    moved = RewardCalibration(calibration.reference, offset)
    assert moved.threshold(10) == pytest.approx(0.38)
    assert moved.percentile(np.array([0.38]))[0] == pytest.approx(0.10, abs=0.011)


def test_blank_images_are_copies_of_each_other_and_of_nothing_else():
    import torch

    from explorer.score.reward import image_signature

    blank = torch.stack([torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (255, 255, 0, 128)])
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    sig = image_signature(torch.cat([blank, real]))
    np.testing.assert_allclose(np.linalg.norm(sig, axis=1), 1.0, atol=1e-5)
    assert dedupe_within(sig, 0.99).tolist() == [True, False, False, False, True, True, True]
    assert not near_duplicates(sig[4:], sig[:1], 0.5).any()  # no real image is a copy of a blank one


def test_a_background_members_reward_leaves_its_own_entry_out():
    """The background queries' images are in the background sample: scored as they are, each would
    be contrasted with itself too (one neighbour at cosine 1). member_rewards scores each as if it
    were not there, which is what a new image of its kind would get."""
    rng = np.random.default_rng(3)
    target, web = rng.normal(size=(50, 8)), rng.normal(size=(40, 8))
    cfg = RewardConfig(k=5, background_weight=0.5, web_percentile=None)
    space = cfg.space(target, web, web)
    members = space.member_rewards(web)
    assert np.all(members > space.rewards(web) + 1e-3)  # raw: each one's own entry pulled it down
    for i in (0, 17, 39):  # exactly the reward against the background without it, same centre
        without = cfg.space(target, np.delete(web, i, axis=0), web)
        np.testing.assert_allclose(members[i], without.rewards(web[i:i + 1])[0], atol=1e-5)
    # with no background there is nothing to leave out
    plain = RewardConfig(k=5, background_size=0, web_percentile=None).space(target, None, web)
    np.testing.assert_allclose(plain.member_rewards(web), plain.rewards(web))
