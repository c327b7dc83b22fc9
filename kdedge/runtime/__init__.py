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

from kdedge.bundle.combine import COMBINE_RULES, Running, combine
from kdedge.bundle.errors import BundleError, BundleVersionError, ChecksumError
from kdedge.bundle.manifest import Bundle
from kdedge.runtime.inputs import InputError, Inputs, check_batch, load_inputs, preprocess
from kdedge.runtime.online import LoadEstimate
from kdedge.runtime.policies import (CONTINUE, STOP, AllOf, Confidence, Context, Deadline, Decision, Energy, Fixed, Full,
                                     Policy, make_policy)
from kdedge.runtime.runner import OutputError, Result, Results, Runner
from kdedge.runtime.scheduler import Answer, Costs, Scheduler
from kdedge.runtime.watchdog import Watchdog
from kdedge.targets import open_bundle
from kdedge.targets.ort_session import OrtOptions, OrtSession
from kdedge.targets.session import AbortHandle, Session, StageAborted

__all__ = [
    "AbortHandle", "AllOf", "Answer", "Bundle", "BundleError", "BundleVersionError", "COMBINE_RULES", "CONTINUE",
    "ChecksumError", "Confidence", "Context", "Costs", "Deadline", "Decision", "Energy", "Fixed", "Full", "InputError",
    "Inputs", "LoadEstimate", "OrtOptions", "OrtSession", "OutputError", "Policy", "Result", "Results", "Runner",
    "Running", "STOP", "Scheduler", "Session", "StageAborted", "Watchdog", "check_batch", "combine", "load_inputs",
    "make_policy", "open_bundle", "preprocess",
]
