"""The device runtime: open a bundle and run its stages under a budget.

Imports numpy, onnxruntime (when a session is opened) and the standard library only: a device
needs no torch.

Example:
    >>> from kdedge.runtime import Runner, Deadline, load_inputs
    >>> runner = Runner("hne.kdedge", threads=2)
    >>> batch = load_inputs("digit.png", runner.bundle)
    >>> res = runner.run(batch.x, Deadline(2.0))
    >>> res[0].class_name, res[0].stage, res[0].total_ms, res[0].budget_met
"""

from __future__ import annotations

from kdedge.runtime.bundle import Bundle, BundleError, BundleVersionError, ChecksumError, open_bundle
from kdedge.runtime.combine import COMBINE_RULES, Running, combine
from kdedge.runtime.inputs import InputError, Inputs, check_batch, load_inputs, preprocess
from kdedge.runtime.policies import (CONTINUE, STOP, AllOf, Confidence, Context, Deadline, Decision, Energy, Fixed, Full,
                                     Policy, make_policy)
from kdedge.runtime.runner import OutputError, Result, Results, Runner
from kdedge.runtime.sessions import AbortHandle, OrtOptions, OrtSession, Session, StageAborted, Watchdog

__all__ = [
    "AbortHandle", "AllOf", "Bundle", "BundleError", "BundleVersionError", "COMBINE_RULES", "CONTINUE", "ChecksumError",
    "Confidence", "Context", "Deadline", "Decision", "Energy", "Fixed", "Full", "InputError", "Inputs", "OrtOptions",
    "OrtSession", "OutputError", "Policy", "Result", "Results", "Runner", "Running", "STOP", "Session", "StageAborted", "Watchdog",
    "check_batch", "combine", "load_inputs", "make_policy", "open_bundle", "preprocess",
]
