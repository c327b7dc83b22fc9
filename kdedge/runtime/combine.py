"""Old home of the combine rules; they live in :mod:`kdedge.bundle.combine`. Kept as a re-export
for one release."""

from __future__ import annotations

from kdedge.bundle.combine import COMBINE_RULES, Running, check_rule, combine, softmax

__all__ = ["COMBINE_RULES", "Running", "check_rule", "combine", "softmax"]
