"""The sensitivity sweep: a grid of federated runs, divergence metrics and the ranking."""
