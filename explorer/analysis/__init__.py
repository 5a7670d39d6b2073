"""After the runs: reports and plots, the LM isoFLOP sweep, and the compute planner."""
