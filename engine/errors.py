"""The two errors the command line turns into one-line messages.

They live apart from the config so that every engine module can raise them
without importing the config (which imports the registries it validates
against: tasks, optimizers, precision policies, schedules).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem the user can fix; the CLI prints it on one line and exits with 2."""


class TrainingError(RuntimeError):
    """The run cannot go on (repeated non-finite losses, ...); the CLI prints it on one line and exits with 1."""
