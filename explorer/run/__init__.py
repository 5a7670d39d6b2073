"""Running the agent: configs, assembly of the parts, the acquisition loops, the ledger and
checkpoints, the daemon and the demo."""
