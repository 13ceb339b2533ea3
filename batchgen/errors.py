"""The exception hierarchy: job-level errors carry an exit code, row-level errors name a field."""

from __future__ import annotations


class BatchgenError(Exception):
    """Root of every error batchgen raises on purpose. Exit code 1: failure while running."""

    exit_code = 1


class JobConfigError(BatchgenError):
    """The job cannot start as given (bad spec, missing column, unreadable input). Exit code 2."""

    exit_code = 2


class ModelLoadError(JobConfigError):
    """The model directory or hub id cannot be loaded: names the path and the missing part."""


class StorageError(BatchgenError):
    """Reading or writing the output failed after every retry."""


class RowError(BatchgenError):
    """One input row is invalid; it becomes an error row, the rest of the job goes on."""

    def __init__(self, field: str, value: object, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:  # both ends: a long URI's file name is at its end
            shown = shown[:38] + "..." + shown[-39:]
        super().__init__(f"`{field}` {reason} but is {shown}")
