"""``python -m kdedge.gpu_check OUT``: see :mod:`kdedge.gpu_check`."""

from __future__ import annotations

from kdedge.gpu_check import main

raise SystemExit(main())
