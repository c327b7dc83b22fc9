"""Training: data, losses (pure functions), tasks (one per method), the fit loop, checkpoints, runs."""

from __future__ import annotations
