import random

import pytest

from explorer.web.text_sources import load_wikipedia_leads, split_target_text, wikipedia_topics
from learners.tokenizer import (
    TextTokenizer,
    TokenizerConfig,
    load_mistral_tokenizer,
    mistral_tokenizer_path,
    train_tokenizer,
)


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


def test_mistral_style_model_loads_from_a_file_and_round_trips_text(leads, tmp_path):
    """A SentencePiece model with Mistral's settings (BPE, byte fallback, a dummy-prefix space, BOS 1 /
    EOS 2), trained here and loaded from its .model file as `load_mistral_tokenizer` loads the shipped
    one. (The shipped 32k model itself needs mistral-common, which this environment does not install.)"""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([d["extract"] for d in leads[:400]]), model_writer=model, vocab_size=800,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    path = tmp_path / "tokenizer.model.v1"
    path.write_bytes(model.getvalue())
    tok = TextTokenizer.load(path)
    assert tok.vocab_size == 800 and tok.eos_id == 2
    assert not tok._escape_meta  # a dummy-prefix model: escaping U+2581 would add spaces
    text = "Photosynthesis converts light energy into chemical energy. 光合作用 🌱"
    ids = tok.encode(text)
    assert ids == tok.processor.encode(text) and tok.decode(ids) == text
    assert tok.processor.id_to_piece(ids[0]).startswith("\u2581")  # the dummy prefix is there
    dna = tok.encode("\U0001F9EC")  # absent from the leads: the prefix piece, then its four UTF-8 bytes
    assert tok.decode(dna) == "\U0001F9EC"
    assert [tok.processor.id_to_piece(i) for i in dna][-4:] == ["<0xF0>", "<0x9F>", "<0xA7>", "<0xAC>"]


def test_mistral_tokenizer_path_names_versions_and_the_missing_package(monkeypatch):
    import importlib.util as util

    with pytest.raises(ValueError, match="valid: v1, v2, v3"):
        mistral_tokenizer_path("v9")
    monkeypatch.setattr(util, "find_spec", lambda name: None)  # the package absent, whatever is installed
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mistral-common"):
        load_mistral_tokenizer("v1")


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
