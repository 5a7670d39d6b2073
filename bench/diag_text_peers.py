"""How the text peers rank and accept, against the hidden topic. A diagnostic (no LM is trained).

For one seed's split of a text config's web: the target documents, a background sample of the web
(the size of a run's: `reward.background_queries` x `search.results_per_query` documents, drawn
uniformly here) and a pool of other web documents as the candidates. DSIR and the n-gram
classifier (explorer/score/selectors.py) are fitted as a run fits them; printed: each one's ROC AUC
for the topic among the candidates, the threshold a run's `value` rule reads on the target's
out-of-fold scores (`reward.accept_percentile`), the share of candidates it accepts and their
precision, the precision of the top share at the classifier's acceptance rate, and the target's
own scores in and out of fold beside the candidates' by topic.

    python bench/diag_text_peers.py --config configs/text-regime.yaml --seed 99 \
        --out bench/results/text_peers/diag-seed99.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import print_and_save  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "text-regime.yaml")
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="also write the lines here (markdown)")
    args = parser.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from explorer.run.config import load_config
    from explorer.run.text import open_text_corpus
    from explorer.score.selectors import DSIR, NgramClassifier, ngram_counts
    from explorer.web.text_corpus import document_key, document_text, split_text_target

    cfg = load_config(args.config, {"seed": args.seed})
    tc = cfg.text
    corpus = open_text_corpus(cfg)
    target = split_text_target(corpus.documents(), tc.topic, holdout_fraction=tc.holdout_fraction,
                               target_fraction=tc.target_fraction, seed=args.seed)
    taken = {document_key(d["title"]) for d in target.train + target.holdout}
    web = [d for d in corpus.documents() if document_key(d["title"]) not in taken]
    order = np.random.default_rng([args.seed, 3]).permutation(len(web))
    n_bg = cfg.reward.background_queries * cfg.search.results_per_query
    background = [document_text(web[i]) for i in order[:n_bg]]
    pool = [web[i] for i in order[n_bg:n_bg + args.candidates]]
    on = np.array([d["topic"] == tc.topic for d in pool])
    counts = ngram_counts([document_text(d) for d in pool])
    tgt, bg = ngram_counts([document_text(d) for d in target.train]), ngram_counts(background)
    pct = cfg.reward.accept_percentile
    lines = [f"# The text peers on `{args.config.name}`, seed {args.seed}", "",
             f"{tgt.shape[0]} target documents, a background of {n_bg} web documents, {len(pool)} candidates of "
             f"which {on.mean():.3f} are of the topic. `value` rule: the target's own out-of-fold "
             f"{pct:g}th percentile.", "",
             "| peer | ROC AUC | threshold | accepted share | precision | precision of the top share accepted "
             "by the classifier | target in sample (10/50/90th pct) | target out of fold | candidates of the topic "
             "| other candidates |", "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    dsir, clf = DSIR(tgt, bg), NgramClassifier(tgt, bg, seed=args.seed)
    scored = {"dsir": (dsir.log_weights(counts), dsir.log_weights(tgt), dsir.target_scores(seed=args.seed)),
              "classifier": (clf.scores(counts), clf.scores(tgt), clf.target_scores())}
    share = float((scored["classifier"][0] >= np.percentile(scored["classifier"][2], pct)).mean())
    for name, (s, inside, own) in scored.items():
        threshold = float(np.percentile(own, pct))
        kept = s >= threshold
        top = np.argsort(-s)[:max(1, int(round(share * len(s))))]

        def q(x):
            return " / ".join(f"{v:.3g}" for v in np.percentile(x, [10, 50, 90]))
        lines.append(f"| {name} | {roc_auc_score(on, s):.3f} | {threshold:.4g} | {kept.mean():.3f} | "
                     f"{on[kept].mean() if kept.any() else float('nan'):.3f} | {on[top].mean():.3f} | {q(inside)} "
                     f"| {q(own)} | {q(s[on])} | {q(s[~on])} |")
    print_and_save("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
