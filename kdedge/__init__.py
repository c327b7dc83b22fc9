"""kdedge: train distilled anytime networks, export them as stages, run them under budgets."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
