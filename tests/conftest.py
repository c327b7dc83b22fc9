"""Shared test settings: one torch thread per xdist worker (2 workers on 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the runtime-only tests run without torch
    pass
