"""The offline web: the installed datasets and Wikipedia leads, the corpora built from them, the
concept vocabulary, the sentence encoder, and the local search engine that serves a corpus over HTTP."""
