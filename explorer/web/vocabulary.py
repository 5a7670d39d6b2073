"""The concept vocabulary the query policies choose from: WordNet 3.0 nouns.

`WordNetNouns` parses the noun part of the WordNet database (`index.noun`, `data.noun`, `noun.exc`)
straight from the files that `apt-get install wordnet-base` puts in /usr/share/wordnet.
`ConceptVocabulary` is the immutable, saveable list of query texts built from it: either every noun
(`from_wordnet`) or the nouns the web's captions mention plus a seeded random sample of the rest
(`from_captions`, the demo default).

File formats (WordNet's wndb(5)):
  index.noun  `lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offset...`,
              offsets ordered most frequent sense first.
  data.noun   `offset lex_filenum ss_type w_cnt(hex) word lex_id [...] p_cnt(dec)
              [symbol offset pos source/target ...] | gloss`.
  noun.exc    `inflected_form base_form [base_form...]` (irregular plurals).
Lines starting with two spaces are the license header. Lemmas use '_' for spaces.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_PACKAGE = "wordnet-base"

HYPERNYM, INSTANCE_HYPERNYM = "@", "@i"
# WordNet's own noun detachment rules (morph.c): inflected suffix -> base suffix.
NOUN_SUFFIX_RULES = (("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                     ("men", "man"), ("ies", "y"), ("s", ""))
# A usable query is lower-case letters, words joined by single spaces or hyphens.
_QUERY_LEMMA = re.compile(r"[a-z]+(?:[ -][a-z]+)*")
_CAPTION_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")
# Function words that WordNet also lists as nouns (chemical symbols, letters, abbreviations):
# matched in captions they would flood the vocabulary with "in", "at", "be", "it", ...
FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet if then than as at by for from in into of off on onto out over to up
with without about above across after against along among around before behind below beneath
beside between beyond down during except inside near past since through toward under until upon
via within i me my we us our you your he him his she her it its they them their this that these
those who whom whose which what where when why how all any both each few more most other some such
no not only own same too very can will just do does did be am is are was were been being have has
had one per vs etc
""".split())


def default_wordnet_dir() -> Path:
    """$EXPLORER_WORDNET_DIR if set, else the Debian location of the WordNet database."""
    return Path(os.environ.get("EXPLORER_WORDNET_DIR", WORDNET_DIR))


def _text(word: str) -> str:
    """WordNet file spelling or query -> query text ('Canis_familiaris' -> 'canis familiaris')."""
    return word.strip().lower().replace("_", " ")


def _data_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("  ") and line.strip():
                yield line


@dataclass(frozen=True)
class _Synset:
    words: tuple[str, ...]        # query texts, in file order (the first names the synset)
    hypernyms: tuple[int, ...]    # offsets of '@' and '@i' targets, in file order
    instance_only: bool           # only '@i' hypernyms: a named individual (person, city, ...)
    gloss: str


def _parse_synset(line: str) -> tuple[int, _Synset]:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    words = tuple(_text(w) for w in fields[4:4 + 2 * n_words:2])
    at = 4 + 2 * n_words
    n_ptrs = int(fields[at])
    hypernyms, kinds = [], set()
    for p in range(at + 1, at + 1 + 4 * n_ptrs, 4):
        symbol, target, pos = fields[p], fields[p + 1], fields[p + 2]
        if symbol in (HYPERNYM, INSTANCE_HYPERNYM) and pos == "n":
            hypernyms.append(int(target))
            kinds.add(symbol)
    return int(fields[0]), _Synset(words, tuple(hypernyms), kinds == {INSTANCE_HYPERNYM},
                                   gloss.strip())


def _parse_index(path: Path) -> dict[str, tuple[int, ...]]:
    """lemma (query text) -> synset offsets, most frequent sense first."""
    senses = {}
    for line in _data_lines(path):
        fields = line.split()
        n_synsets, n_ptrs = int(fields[2]), int(fields[3])
        senses[_text(fields[0])] = tuple(int(o) for o in fields[6 + n_ptrs:6 + n_ptrs + n_synsets])
    return senses


def _parse_exceptions(path: Path) -> dict[str, tuple[str, ...]]:
    exceptions = {}
    if path.exists():
        for line in _data_lines(path):
            form, *bases = line.split()
            exceptions[_text(form)] = tuple(_text(b) for b in bases)
    return exceptions


class WordNetNouns:
    """The parsed noun database: lemmas, senses, hypernym links, glosses, irregular plurals."""

    def __init__(self, senses: Mapping[str, tuple[int, ...]], synsets: Mapping[int, _Synset],
                 exceptions: Mapping[str, tuple[str, ...]], wordnet_dir: Path):
        self._senses = dict(senses)
        self._synsets = dict(synsets)
        self._exceptions = dict(exceptions)
        self.wordnet_dir = wordnet_dir
        self.lemmas: list[str] = list(self._senses)  # index.noun order (alphabetical)

    @classmethod
    def load(cls, wordnet_dir: Path | str | None = None) -> WordNetNouns:
        wordnet_dir = Path(wordnet_dir) if wordnet_dir is not None else default_wordnet_dir()
        index, data = wordnet_dir / "index.noun", wordnet_dir / "data.noun"
        if not (index.is_file() and data.is_file()):
            raise FileNotFoundError(
                f"WordNet noun files not found in {wordnet_dir} (need index.noun and data.noun): "
                f"install them with `apt-get install -y {WORDNET_PACKAGE}`, or point "
                f"EXPLORER_WORDNET_DIR at a WordNet 3.0 dict directory")
        synsets = dict(_parse_synset(line) for line in _data_lines(data))
        return cls(_parse_index(index), synsets, _parse_exceptions(wordnet_dir / "noun.exc"),
                   wordnet_dir)

    def __contains__(self, lemma: str) -> bool:
        return _text(lemma) in self._senses

    def synsets(self, lemma: str) -> list[int]:
        """Synset offsets of a noun, most frequent sense first; KeyError if not a noun."""
        text = _text(lemma)
        if text not in self._senses:
            raise KeyError(f"{lemma!r} is not a WordNet noun")
        return list(self._senses[text])

    def hypernym_path(self, lemma: str) -> list[str]:
        """`lemma`, then the first word of each hypernym of its first sense up to 'entity'.

        Where a synset has several hypernyms the first listed one is followed.
        """
        path, seen = [_text(lemma)], set()
        offset = self.synsets(lemma)[0]
        while self._synsets[offset].hypernyms and offset not in seen:
            seen.add(offset)
            offset = self._synsets[offset].hypernyms[0]
            path.append(self._synsets[offset].words[0])
        return path

    def gloss(self, lemma: str) -> str:
        """Definition of the first (most frequent) sense."""
        return self._synsets[self.synsets(lemma)[0]].gloss

    def is_proper(self, lemma: str) -> bool:
        """True when every sense is a named individual (only instance-hypernym links)."""
        return all(self._synsets[o].instance_only for o in self.synsets(lemma))

    def base_forms(self, word: str) -> list[str]:
        """Nouns `word` may be an inflection of, itself first: 'sneakers' -> ['sneaker'].

        Irregular plurals come from noun.exc (for a compound also on its last word: 'field
        mice'), regular ones from WordNet's suffix rules; like WordNet's morphy, words ending in
        'ss' or of two letters or fewer are not detached.
        """
        text = _text(word)
        prefix, _, head = text.rpartition(" ")
        forms = [text, *self._exceptions.get(text, ()),
                 *(f"{prefix} {base}".lstrip() for base in self._exceptions.get(head, ()))]
        if not text.endswith("ss") and len(text) > 2:
            forms += [text[:-len(s)] + base for s, base in NOUN_SUFFIX_RULES if text.endswith(s)]
        return [f for f in dict.fromkeys(forms) if f in self._senses]


def cached_wordnet(wordnet_dir: Path | str | None = None) -> WordNetNouns:
    """One parsed database per directory, shared by every vocabulary that needs hypernyms."""
    return _load_once(Path(wordnet_dir) if wordnet_dir is not None else default_wordnet_dir())


@functools.lru_cache(maxsize=2)
def _load_once(wordnet_dir: Path) -> WordNetNouns:
    return WordNetNouns.load(wordnet_dir)


# WordNet's detachment rules of the other parts of speech (morph.c), for `is_english_word`.
VERB_SUFFIX_RULES = (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                     ("ing", ""))
ADJECTIVE_SUFFIX_RULES = (("er", ""), ("est", ""), ("er", "e"), ("est", "e"))
_WORD_SUFFIX_RULES = NOUN_SUFFIX_RULES + VERB_SUFFIX_RULES + ADJECTIVE_SUFFIX_RULES
POS_FILES = ("noun", "verb", "adj", "adv")


def _all_parts_of_speech(wordnet_dir: Path | str | None, kind: str) -> Path:
    """The WordNet directory (default: default_wordnet_dir()) once its four KIND.POS files are there."""
    wordnet_dir = Path(wordnet_dir) if wordnet_dir is not None else default_wordnet_dir()
    missing = [f"{kind}.{pos}" for pos in POS_FILES if not (wordnet_dir / f"{kind}.{pos}").is_file()]
    if missing:
        raise FileNotFoundError(f"WordNet files not found in {wordnet_dir} ({', '.join(missing)}): install them "
                                f"with `apt-get install -y {WORDNET_PACKAGE}`, or point EXPLORER_WORDNET_DIR "
                                "at a WordNet 3.0 dict directory")
    return wordnet_dir


@functools.lru_cache(maxsize=2)
def english_words(wordnet_dir: Path | str | None = None) -> frozenset[str]:
    """Every word of WordNet's lemmas in all four parts of speech (the words of a compound one by
    one), the inflected forms its exception files list, and FUNCTION_WORDS."""
    wordnet_dir = _all_parts_of_speech(wordnet_dir, "index")
    words = set(FUNCTION_WORDS)
    for pos in POS_FILES:
        for line in _data_lines(wordnet_dir / f"index.{pos}"):
            words.update(re.findall(r"[a-z]+", line.split(" ", 1)[0].lower()))
        for form in _parse_exceptions(wordnet_dir / f"{pos}.exc"):
            words.update(re.findall(r"[a-z]+", form))
    return frozenset(words)


def wordnet_glosses(wordnet_dir: Path | str | None = None) -> list[str]:
    """Every synset of the four parts of speech as one line of general English, its words then its
    gloss ("dog, domestic dog, Canis familiaris: a member of the genus Canis ..."), in file order:
    117,659 definitions, the base LM's corpus (learners/base_lm.py; not on the text web)."""
    wordnet_dir = _all_parts_of_speech(wordnet_dir, "data")
    lines = []
    for pos in POS_FILES:
        for line in _data_lines(wordnet_dir / f"data.{pos}"):
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            words = [w.replace("_", " ") for w in fields[4:4 + 2 * int(fields[3], 16):2]]
            # adjectives carry their syntactic marker in the file: "beautiful(a)"
            words = [re.sub(r"\((?:a|p|ip)\)$", "", w) for w in words]
            lines.append(f"{', '.join(words)}: {gloss.strip()}")
    return lines


def is_english_word(word: str, words: frozenset[str]) -> bool:
    """Whether a lower-case word is in `words` (english_words) as it is or after one of WordNet's
    suffix rules ('sneakers', 'running', 'darker')."""
    if word in words:
        return True
    return len(word) > 2 and any(word.endswith(s) and word[:-len(s)] + base in words
                                 for s, base in _WORD_SUFFIX_RULES)


def query_nouns(wn: WordNetNouns, *, max_words: int, exclude_proper: bool) -> list[str]:
    """Nouns usable as search queries, in index order (see `ConceptVocabulary.from_wordnet`)."""
    return [lemma for lemma in wn.lemmas
            if _QUERY_LEMMA.fullmatch(lemma) and lemma.count(" ") < max_words
            and not (exclude_proper and wn.is_proper(lemma))]


def caption_ngrams(captions: Iterable[str], max_ngram: int) -> set[tuple[str, ...]]:
    """Distinct word n-grams (n <= max_ngram) of lower-cased captions; tokenised once each."""
    ngrams = set()
    for caption in captions:
        tokens = _CAPTION_TOKEN.findall(caption.lower())
        for n in range(1, max_ngram + 1):
            ngrams.update(zip(*(tokens[i:] for i in range(n))))
    return ngrams


def nouns_in_captions(wn: WordNetNouns, captions: Iterable[str], pool: set[str],
                      max_ngram: int) -> set[str]:
    """Members of `pool` that some caption mentions, singular or plural ('red sneakers')."""
    found = set()
    for ngram in caption_ngrams(captions, max_ngram):
        found.update(f for f in wn.base_forms(" ".join(ngram)) if f in pool)
    return found


@dataclass(frozen=True)
class ConceptVocabulary:
    """An ordered, immutable list of concept texts (the queries a policy may issue)."""

    concepts: tuple[str, ...]
    # How the list was made: "wordnet-nouns" (every query noun) or "wordnet-nouns-in-captions"
    # (caption-mentioned nouns first, then the seeded random sample; see `params`).
    source: str
    params: dict = field(default_factory=dict, hash=False)  # build parameters, JSON-safe
    wordnet_dir: Path | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "concepts", tuple(self.concepts))
        if not self.concepts:
            raise ValueError("a concept vocabulary needs at least one concept")
        if not all(isinstance(c, str) and c.strip() for c in self.concepts):
            raise ValueError("concepts must be non-empty strings")
        positions = {c: i for i, c in enumerate(self.concepts)}
        if len(positions) != len(self.concepts):
            raise ValueError("concepts must be unique")
        object.__setattr__(self, "_positions", positions)

    def __len__(self) -> int:
        return len(self.concepts)

    def __getitem__(self, i: int) -> str:
        return self.concepts[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.concepts)

    def __contains__(self, text: str) -> bool:
        return text in self._positions

    def index(self, text: str) -> int:
        if text not in self._positions:
            raise KeyError(f"{text!r} is not in this vocabulary")
        return self._positions[text]

    def hypernym_path(self, i: int) -> list[str]:
        """WordNet path of concept `i` up to 'entity' (loads the database on first use)."""
        return cached_wordnet(self.wordnet_dir).hypernym_path(self.concepts[i])

    def descriptions(self) -> list[str]:
        """'sandal: a shoe consisting of a sole fastened by straps to the foot' per concept: the word
        with the first clause of its WordNet gloss (the bare word where WordNet has none).

        A sentence encoder places rare single words by their spelling ('espadrille' lands next to
        'escargot'); with the gloss it places them by meaning (next to 'sandal' and 'shoe'), which is
        the geometry a policy that generalises rewards between concepts needs."""
        wn = cached_wordnet(self.wordnet_dir)
        out = []
        for concept in self.concepts:
            try:
                gloss = wn.gloss(concept).split(";")[0].strip()
            except KeyError:
                gloss = ""
            out.append(f"{concept}: {gloss}" if gloss else concept)
        return out

    def save(self, path: Path | str) -> None:
        record = {"source": self.source, "params": self.params, "concepts": list(self.concepts)}
        Path(path).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str, wordnet_dir: Path | None = None) -> ConceptVocabulary:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(record) - {"source", "params", "concepts"}
        if unknown or "concepts" not in record or "source" not in record:
            raise ValueError(f"{path}: not a concept vocabulary (keys {sorted(record)})")
        return cls(tuple(record["concepts"]), record["source"], dict(record.get("params", {})),
                   wordnet_dir)

    @classmethod
    def from_wordnet(cls, wn: WordNetNouns | None = None, *, max_words: int = 3,
                     exclude_proper: bool = True) -> ConceptVocabulary:
        """Every WordNet noun usable as a query, in index (alphabetical) order.

        Kept: lemmas of letters joined by spaces or hyphens with at most `max_words` words.
        With `exclude_proper`, lemmas whose every sense is a named individual (only
        instance-hypernym links: 'shakespeare', 'tokyo') are dropped; 'einstein' stays, since
        it also means a genius.
        """
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        wn = wn or cached_wordnet()
        nouns = query_nouns(wn, max_words=max_words, exclude_proper=exclude_proper)
        return cls(tuple(nouns), "wordnet-nouns",
                   {"max_words": max_words, "exclude_proper": exclude_proper}, wn.wordnet_dir)

    @classmethod
    def from_captions(cls, captions: Iterable[str], *, n_random: int, seed: int,
                      wn: WordNetNouns | None = None, max_ngram: int = 2) -> ConceptVocabulary:
        """Nouns that occur in any caption of the web, plus `n_random` other nouns (seeded).

        `captions` must be the captions of the *whole* web, never the target set's labels: the
        agent is meant to discover which concepts help the target, and a vocabulary seeded with
        the target's class names would hand it the answer (and make the comparison with other
        policies meaningless). The random nouns keep concepts the captions never mention
        reachable, as a real open vocabulary would.

        Candidates are `from_wordnet(max_words=max_ngram)` nouns minus `FUNCTION_WORDS`,
        matched as word n-grams of lower-cased captions with plural handling
        (`WordNetNouns.base_forms`). Caption nouns come first (sorted), then the random ones
        (sorted); `params["n_from_captions"]` says where the split is.
        """
        if n_random < 0 or max_ngram < 1:
            raise ValueError(f"need n_random >= 0 and max_ngram >= 1, got {n_random}, {max_ngram}")
        wn = wn or cached_wordnet()
        pool = set(query_nouns(wn, max_words=max_ngram, exclude_proper=True)) - FUNCTION_WORDS
        found = sorted(nouns_in_captions(wn, captions, pool, max_ngram))
        rest = sorted(pool.difference(found))
        if n_random > len(rest):
            raise ValueError(f"n_random={n_random} but only {len(rest)} nouns are left to sample")
        sampled = sorted(random.Random(seed).sample(rest, n_random))
        params = {"n_random": n_random, "seed": seed, "max_ngram": max_ngram,
                  "n_from_captions": len(found)}
        return cls(tuple(found + sampled), "wordnet-nouns-in-captions", params, wn.wordnet_dir)
