"""explorer: an active data-acquisition agent.

The data flow, one folder per stage (imports point only down this list):

    web/       the offline web: corpora, vocabulary, sentence encoder, local search engine
    acquire/   search clients, fetcher, robots.txt, validation, response cache
    score/     target set, reward and acceptance, probe evaluation
    run/       config, assembly, acquisition loops, ledger, checkpoints, daemon, demo
    analysis/  reports, LM sweep, compute planner
    cli.py     the `explorer` command (imported only by the entry point)

Query policies live in the top-level `policies` package and learners in `learners`; both sit between
score/ and run/. See ARCHITECTURE.md.
"""
