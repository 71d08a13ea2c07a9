"""User-facing errors: one line saying what is wrong and what to do.

The CLI prints these without a traceback and exits with ``exit_code``.
"""
from __future__ import annotations


class KVCompileError(Exception):
    """Base class; ``exit_code`` 2 is a usage error (bad input), 1 a failed check."""

    exit_code = 2


class ModelLoadError(KVCompileError):
    pass


class CalibrationError(KVCompileError):
    pass


class ProfileError(KVCompileError):
    pass


class BudgetError(KVCompileError):
    pass


class ArtifactError(KVCompileError):
    pass


class ContextLengthError(KVCompileError):
    pass
