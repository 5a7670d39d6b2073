"""The base LM: built once per spec from real general text, kept on disk, and reloadable."""

import pytest
import torch

from explorer.web.vocabulary import wordnet_glosses
from learners.base_lm import BaseLMSpec, ensure_base_lm
from learners.lm import LMConfig, LMLearner


@pytest.fixture(scope="module")
def glosses():
    return wordnet_glosses()


def test_the_wordnet_glosses_are_general_english(glosses):
    assert len(glosses) == 117_659  # every synset of WordNet 3.0's four parts of speech
    assert glosses[0].startswith("entity: that which is perceived or known or inferred")
    assert not any("(a)" in g.split(":")[0] or "_" in g.split(":")[0] for g in glosses)  # file markers removed


def test_a_base_is_trained_once_and_kept(glosses, tmp_path):
    spec = BaseLMSpec(corpus="wordnet", vocab_size=512, steps=3, seq_len=32, batch_size=2, seed=5)
    base = ensure_base_lm(spec, lambda: glosses[:3000], tmp_path, log=lambda _: None)
    assert base.record["key"] == spec.key and base.record["tokens_trained"] == 3 * 2 * 32
    assert base.record["flops"] > 0 and base.tokenizer.vocab_size == 512
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [spec.key, spec.tokenizer_name, "wordnet-v512.tokens.npz"])  # no partial folder left behind

    def never():
        raise AssertionError("a kept base is not trained again")

    again = ensure_base_lm(spec, never, tmp_path, log=lambda _: None)
    weights = again.weights()
    learner = LMLearner(LMConfig.from_dict(torch.load(again.root / "lm.pt", weights_only=True)["config"]))
    fresh = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.model.load_state_dict(weights)
    # the kept weights are trained ones, not the seeded initialisation
    assert any(not torch.equal(fresh[k], v) for k, v in weights.items())


def test_a_folder_without_its_record_is_rebuilt(glosses, tmp_path):
    spec = BaseLMSpec(corpus="wordnet", vocab_size=512, steps=2, seq_len=32, batch_size=2)
    (tmp_path / spec.key).mkdir(parents=True)
    (tmp_path / spec.key / "lm.pt").write_bytes(b"killed while writing")
    (tmp_path / f".{spec.key}.partial-1").mkdir()  # a build killed before its rename
    base = ensure_base_lm(spec, lambda: glosses[:3000], tmp_path, log=lambda _: None)
    assert set(base.weights()) and (base.root / "base.json").exists()
    assert not list(tmp_path.glob(".*partial*"))


def test_a_spec_names_its_recipe():
    a, b = BaseLMSpec(corpus="wordnet"), BaseLMSpec(corpus="wordnet", seed=1)
    assert a.key != b.key and a.tokenizer_name == b.tokenizer_name  # one tokenizer for every seed and size
    with pytest.raises(ValueError, match="plain name"):
        BaseLMSpec(corpus="../x")
    with pytest.raises(ValueError, match="must be > 0"):
        BaseLMSpec(corpus="wordnet", steps=0)
