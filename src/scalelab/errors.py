"""User-facing errors: each carries a one-line message and the process exit code the CLI uses.

Anything a user can get wrong (a config key, a dataset name, a corrupt file, a checkpoint from another run)
raises one of these with a message that names the problem and what is allowed. Internal bugs stay ordinary
exceptions with tracebacks.
"""

from __future__ import annotations

import sys


class ScalelabError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""

    exit_code = 1

    def report(self) -> None:
        """Print the one line to stderr, once (a worker may say it before leaving with the others)."""
        if not getattr(self, "reported", False):
            print(f"scalelab: error: {self}", file=sys.stderr, flush=True)
            self.reported = True


class ConfigError(ScalelabError):
    """An unknown key, a wrong type or a value out of range in a config or on the command line."""

    exit_code = 2


class DataError(ScalelabError):
    """A dataset that is unknown, missing, corrupt or truncated."""

    exit_code = 2


class CheckpointError(ScalelabError):
    """A checkpoint that cannot be used: corrupt, or written by a run with a different config."""

    exit_code = 2


class DivergenceError(ScalelabError):
    """The loss became NaN or infinite."""

    exit_code = 3


def unknown_name(kind: str, name: str, known) -> str:
    """The standard message for a name missing from a registry."""
    return f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}"
