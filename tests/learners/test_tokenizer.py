import importlib.util
import random

import pytest

from explorer.text_sources import load_wikipedia_leads, split_target_text, wikipedia_topics
from learners.tokenizer import TokenizerConfig, TextTokenizer, load_mistral_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def leads():
    return load_wikipedia_leads()


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, leads):
    texts = [d["extract"] for d in leads[:600]]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=1000, model_type=request.param))


def _random_unicode(rng: random.Random, n: int) -> str:
    """n random code points from every plane, surrogates excluded (they are not valid text)."""
    chars = []
    while len(chars) < n:
        cp = rng.randint(0, 0x10FFFF)
        if not 0xD800 <= cp <= 0xDFFF:
            chars.append(chr(cp))
    return "".join(chars)


HARD_STRINGS = [
    "",
    "  leading and trailing spaces  ",
    "tabs\tnew\nlines\r\nand\x00nul\x01\x1f\x7f controls",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 and skin tones 👍🏽",
    "CJK 机器学习 日本語のテキスト 한국어 텍스트",
    "combining e\u0301 vs é, ﬁ ligature, Å vs Å, full-width ＡＢＣ, NBSP\u00a0here",
    "the meta symbol \u2581 itself, twice \u2581\u2581 and a space after \u2581 x",
    "RTL עברית العربية and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da",
]


def test_round_trip_is_exact_on_hard_strings(tokenizer):
    for text in HARD_STRINGS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_is_exact_on_random_code_points(tokenizer):
    rng = random.Random(1234)
    for _ in range(300):
        text = _random_unicode(rng, rng.randint(1, 40))
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("\U0001F9EC")  # DNA emoji, absent from the training leads
    assert len(ids) == 4  # its four UTF-8 bytes
    assert all(tokenizer.processor.id_to_piece(i).startswith("<0x") for i in ids)


def test_compresses_held_out_english(tokenizer, leads):
    text = " ".join(d["extract"] for d in leads[-50:])  # not in the training slice
    assert len(tokenizer.encode(text)) < 0.45 * len(text)


def test_save_load_round_trip(tokenizer, tmp_path, leads):
    path = tmp_path / "lm.model"
    tokenizer.save(path)
    loaded = TextTokenizer.load(path)
    sample = leads[-1]["extract"] + " \u2581 🙂"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    assert loaded.vocab_size == tokenizer.vocab_size == 1000 and loaded.eos_id == tokenizer.eos_id


def test_config_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="valid: unigram, bpe"):
        TokenizerConfig(model_type="wordpiece")


@pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None, reason="mistral-common not installed")
def test_mistral_tokenizer_loads_and_round_trips_text():
    tok = load_mistral_tokenizer("v1")
    assert tok.vocab_size == 32000
    text = "Photosynthesis converts light energy into chemical energy. 光合作用 🌱"
    assert tok.decode(tok.encode(text)) == text


def test_target_split_is_one_topic_and_disjoint(leads):
    train, holdout, rest = split_target_text(leads, holdout_fraction=0.2, seed=0)
    assert len(wikipedia_topics(leads)) == 12
    assert {d["topic"] for d in train + holdout} == {"Biology and health sciences"}
    assert "Biology and health sciences" not in wikipedia_topics(rest)
    assert not {d["title"] for d in train} & {d["title"] for d in holdout}
    assert len(train) + len(holdout) + len(rest) == len(leads)
    assert abs(len(holdout) - 0.2 * (len(train) + len(holdout))) <= 1
    again = split_target_text(leads, holdout_fraction=0.2, seed=0)[1]
    assert [d["title"] for d in again] == [d["title"] for d in holdout]
    with pytest.raises(ValueError, match="valid: Arts"):
        split_target_text(leads, topic="Biology/health")
