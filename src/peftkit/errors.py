"""The exception and warning classes users catch (the names HF peft exports).

This module imports nothing from peftkit, so every layer may raise these.
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of the errors peftkit raises for PEFT-specific problems."""


class PeftWarning(UserWarning):
    """Category of the warnings peftkit emits for PEFT-specific problems (filter it with `warnings`)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter config's targets matched no module of the model.

    Also a `ValueError`, so code written against older releases (which raised a plain `ValueError`) keeps
    catching it.
    """
