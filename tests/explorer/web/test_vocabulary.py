"""ConceptVocabulary and WordNetNouns against the real WordNet 3.0 files (wordnet-base)."""

from pathlib import Path

import pytest

from explorer.web.vocabulary import FUNCTION_WORDS, ConceptVocabulary, WordNetNouns, default_wordnet_dir

if not (default_wordnet_dir() / "data.noun").is_file():
    pytest.skip("WordNet not installed: apt-get install -y wordnet-base", allow_module_level=True)

CAPTIONS = [
    "two red sneakers on sale",
    "A vintage leather HANDBAG, photo_03.png",
    "field mice in the barn",
    "men's tennis shoes",
    "shakespeare portrait, Tokyo skyline",
]


@pytest.fixture(scope="module")
def wn() -> WordNetNouns:
    return WordNetNouns.load()


def test_parses_every_noun_lemma(wn):
    # index.noun of WordNet 3.0 holds 117,798 noun lemmas (82,115 synsets).
    assert 70_000 < len(wn.lemmas) == len(set(wn.lemmas))
    assert all(lemma == lemma.lower() and "_" not in lemma for lemma in wn.lemmas)
    assert "tennis shoe" in wn.lemmas and "dog" in wn.lemmas


def test_senses_are_most_frequent_first(wn):
    # 02084071 is the domestic dog; the 'frump' and 'cad' senses come later.
    assert wn.synsets("dog")[0] == 2084071
    assert len(wn.synsets("dog")) == 7
    assert wn.synsets("Tennis_Shoe") == wn.synsets("tennis shoe")
    with pytest.raises(KeyError):
        wn.synsets("not a noun at all")


def test_hypernym_paths_reach_entity(wn):
    sneaker = wn.hypernym_path("sneaker")
    assert sneaker[:3] == ["sneaker", "shoe", "footwear"]
    assert sneaker[-1] == "entity"
    dog = wn.hypernym_path("dog")
    assert dog[:2] == ["dog", "canine"]
    assert {"mammal", "animal", "organism"} <= set(dog) and dog[-1] == "entity"
    # Proper names climb through instance-hypernym links.
    assert wn.hypernym_path("tokyo")[-1] == "entity"


def test_gloss_is_first_sense_definition(wn):
    assert wn.gloss("sneaker") == "a canvas shoe with a pliable rubber sole"


def test_base_forms_undo_plurals(wn):
    assert wn.base_forms("sneakers") == ["sneaker"]
    assert wn.base_forms("mice") == ["mouse"]              # noun.exc
    assert wn.base_forms("boxes") == ["box"]
    assert wn.base_forms("berries") == ["berry"]
    assert wn.base_forms("tennis shoes") == ["tennis shoe"]
    assert wn.base_forms("field mice") == ["field mouse"]
    assert wn.base_forms("glasses") == ["glasses", "glass"]
    assert wn.base_forms("boss") == ["boss"]                # no 'bos' from -ss words
    assert wn.base_forms("qwzxv") == []


def test_proper_names_are_instance_only_lemmas(wn):
    assert wn.is_proper("shakespeare") and wn.is_proper("tokyo")
    # 'einstein' also means a genius, 'paris' is also a plant genus: common senses keep them.
    assert not wn.is_proper("einstein") and not wn.is_proper("paris")


def test_from_wordnet_filters_lemmas(wn):
    vocab = ConceptVocabulary.from_wordnet(wn)
    assert 70_000 < len(vocab) < len(wn.lemmas)
    assert {"dog", "sneaker", "tennis shoe", "t-shirt", "einstein"} <= set(vocab)
    assert "shakespeare" not in vocab and "tokyo" not in vocab
    assert all(c.replace(" ", "").replace("-", "").isalpha() for c in vocab)
    assert max(c.count(" ") for c in vocab) == 2
    unigrams = ConceptVocabulary.from_wordnet(wn, max_words=1)
    assert all(" " not in c for c in unigrams) and "dog" in unigrams
    with_names = ConceptVocabulary.from_wordnet(wn, exclude_proper=False)
    assert "shakespeare" in with_names and len(with_names) > len(vocab)


def test_from_captions_finds_caption_nouns(wn):
    vocab = ConceptVocabulary.from_captions(CAPTIONS, n_random=50, seed=0, wn=wn)
    caption_nouns = set(vocab.concepts[:vocab.params["n_from_captions"]])
    assert {"sneaker", "handbag", "field mouse", "tennis shoe", "barn", "portrait"} <= caption_nouns
    assert "sneakers" not in vocab                 # the plural resolves to the lemma
    assert not caption_nouns & FUNCTION_WORDS      # 'in', 'on', 'the' are WordNet nouns too
    assert "shakespeare" not in vocab and "tokyo" not in vocab
    assert len(vocab) == len(caption_nouns) + 50


def test_from_captions_random_part_is_seeded(wn):
    build = lambda seed: ConceptVocabulary.from_captions(CAPTIONS, n_random=200, seed=seed, wn=wn)
    a, a_again, b = build(1), build(1), build(2)
    n = a.params["n_from_captions"]
    assert a.concepts == a_again.concepts
    assert a.concepts[:n] == b.concepts[:n] and set(a.concepts[n:]) != set(b.concepts[n:])
    assert len(a.concepts[n:]) == 200 and not set(a.concepts[n:]) & set(a.concepts[:n])
    with pytest.raises(ValueError, match=r"n_random=10000000 but only \d+ nouns are left"):
        ConceptVocabulary.from_captions(CAPTIONS, n_random=10**7, seed=0, wn=wn)


def test_index_and_hypernym_path_by_position(wn):
    vocab = ConceptVocabulary.from_captions(CAPTIONS, n_random=0, seed=0, wn=wn)
    i = vocab.index("sneaker")
    assert vocab[i] == "sneaker"
    assert vocab.hypernym_path(i) == wn.hypernym_path("sneaker")
    with pytest.raises(KeyError):
        vocab.index("sneakers")


def test_save_load_round_trip(wn, tmp_path):
    vocab = ConceptVocabulary.from_captions(CAPTIONS, n_random=30, seed=3, wn=wn)
    vocab.save(tmp_path / "vocab.json")
    loaded = ConceptVocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.params == {"n_random": 30, "seed": 3, "max_ngram": 2,
                             "n_from_captions": vocab.params["n_from_captions"]}
    assert loaded.index("sneaker") == vocab.index("sneaker")


def test_rejects_duplicate_or_empty_concepts():
    with pytest.raises(ValueError, match="concepts must be unique"):
        ConceptVocabulary(("dog", "dog"), "test")
    with pytest.raises(ValueError, match="needs at least one concept"):
        ConceptVocabulary((), "test")


def test_missing_database_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        WordNetNouns.load(tmp_path)
    monkeypatch.setenv("EXPLORER_WORDNET_DIR", str(tmp_path / "nowhere"))
    assert default_wordnet_dir() == Path(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        WordNetNouns.load()
