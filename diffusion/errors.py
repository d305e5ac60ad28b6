"""Bad input: the one family of errors the library raises for it, and the checks every module shares.

Every error that means "the caller asked for something that cannot be done"
(a setting out of range, a file that is missing or corrupt, a model that does
not fit the request) is an ``InputError``, whose message says what to change.
It is a ``ValueError``, so plain ``except ValueError`` still catches it. The
command-line tools turn any ``InputError`` into one line on stderr and exit
status 2 (``diffusion.cli.run_main``). The subclasses only say where the
problem was found:

    ConfigError      a training setting, or a run folder that does not fit it
    CheckpointError  a run folder or checkpoint that is missing, unreadable or changed
    DataError        a dataset that cannot be found, downloaded or read
    GenerationError  a generation setting, checkpoint or input image
    ClassifierError  the metrics' digit classifier cannot be loaded
    UsageError       a command line that cannot be read

Errors that are not about input (a bug, a diverging training run) keep their
own types.
"""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Bad input of any kind; the message says what to change."""


class ConfigError(InputError):
    """A bad setting, or a checkpoint or dataset that does not fit the settings."""


class CheckpointError(InputError):
    """A run folder or checkpoint that is missing, unreadable, corrupt, of an unknown kind, or changed."""


class DataError(InputError):
    """A dataset that cannot be found, downloaded, verified or read."""


class GenerationError(InputError):
    """A bad generation setting, checkpoint or input image."""


class ClassifierError(InputError):
    """The metrics' classifier cannot be loaded (missing or corrupt weights)."""


class UsageError(InputError):
    """A command line that cannot be read."""


def is_whole(value, minimum: int | None = None) -> bool:
    """True for a whole number (a Python or NumPy integer, never a bool) that is at least ``minimum``.

    ``True`` is an int to Python, but as a step count or a seed it is almost
    certainly a mistake, so it is refused everywhere alike.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return False
    return minimum is None or value >= minimum


def check_whole(name: str, value, minimum: int, error: type[InputError] = InputError) -> None:
    """Raise ``error`` saying "<name> must be a whole number >= <minimum>" unless ``is_whole(value, minimum)``."""
    if not is_whole(value, minimum):
        raise error(f"{name} must be a whole number >= {minimum} (got {value!r})")
