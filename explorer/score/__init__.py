"""Scoring: the target set, the reward of candidates against it (kNN similarity, near-duplicates,
acceptance by value), and the probe evaluation of an encoder."""
