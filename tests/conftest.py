"""Shared test settings."""

import torch

# The test models are tiny: one thread is faster than two, and far faster on a busy machine.
torch.set_num_threads(1)
