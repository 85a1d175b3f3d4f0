"""Errors a user can act on: each message names the file, the tensor or the key, and the fix.

``exit_code`` is what the command line exits with when the error reaches it (see mergelab.terminal):
2 for a usage or config mistake the user fixes in the command or the YAML, 1 for everything found at run
time (unreadable inputs, models that cannot be merged, disk full).
"""

from __future__ import annotations

from collections.abc import Sequence


class MergeLabError(Exception):
    """Base class: mergelab's CLI prints these as messages, never as tracebacks."""

    exit_code = 1


class UsageError(MergeLabError):
    """A command-line option has a value that cannot work (``--device potato``)."""

    exit_code = 2


class CheckpointError(MergeLabError):
    """A checkpoint could not be read (missing, truncated, unsafe pickle, not a state dict)."""


class ConfigError(MergeLabError):
    """The merge config is invalid (unknown key, bad value, unknown method or parameter)."""

    exit_code = 2


class CompatibilityError(MergeLabError):
    """The inputs cannot be merged as configured; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found, nothing was written:\n{shown}")


class OutputExistsError(MergeLabError):
    """The output folder exists and ``overwrite`` was not given."""

    exit_code = 2


class OutputError(MergeLabError):
    """The output could not be written (disk full, no permission); nothing was left under the output name."""
