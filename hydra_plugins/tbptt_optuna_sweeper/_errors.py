"""The sweeper's errors, in a module Hydra's plugin scan skips.

Hydra's scan executes every public module of a plugin package again, even one already
imported, which would make new classes under old names: an error raised from the new class
would slip past an `except` written against the old. Defined here, each class exists once.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class SweepConfigError(CompactHydraException, ValueError):
    """A sweeper setting that cannot work; the message names the key.

    Hydra prints a CompactHydraException as its message alone, without a traceback.
    """


class SearchSpaceError(SweepConfigError):
    """A search-space entry that cannot become an Optuna distribution."""
