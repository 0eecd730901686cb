"""Suite-wide settings: one intra-op thread per worker (the suite runs under pytest-xdist -n 2)."""

import torch

torch.set_num_threads(1)
