"""The names of the latency-profile format and its errors, shared by measuring, validating,
merging and reading (a module of its own so that none of them imports another for a constant)."""

from __future__ import annotations

FORMAT = "kdedge-profile"
VERSION = 1
STATS = ("min", "mean", "median", "p90", "p95", "p99", "max")
CHAIN = "chain"

# The key of a profile: two measurements agreeing on all of it measured the same thing, so their
# batches can live in one profile; ``fingerprint`` is bundle.fingerprint, ``options`` the session
# options (optimisation level, providers), which change latency as much as the thread count.
KEY_FIELDS = ("device", "setting", "target", "run_key", "threads", "fingerprint", "options")

__all__ = ["CHAIN", "FORMAT", "ForeignProfileError", "InvalidProfileError", "KEY_FIELDS", "MissingProfileError",
           "NewerProfileError", "ProfileError", "STATS", "StaleProfileError", "VERSION"]


class ProfileError(ValueError):
    """A latency profile that is missing, unreadable or cannot be used here."""


class MissingProfileError(ProfileError):
    """No profile for this device and setting."""


class StaleProfileError(ProfileError):
    """A profile measured on other stage files than the bundle's current ones."""


class ForeignProfileError(ProfileError):
    """A profile measured on another device, setting or target, or for another bundle."""


class InvalidProfileError(ProfileError):
    """A file or dict that breaks the profile format (schema or rules): the message names the
    field, so that a hand-edited or damaged profile is refused instead of misleading a policy."""


class NewerProfileError(ProfileError):
    """A profile written by a newer kdedge (a higher ``version``): read only by that kdedge, and
    never overwritten by this one."""
