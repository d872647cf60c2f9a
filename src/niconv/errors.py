"""The package's exceptions.

Every error niconv raises on purpose is a :class:`NiconvError`. Each one carries
``where``: the file or the config key path it is about, so a message in the log
or on the terminal always names what to fix.
"""
from __future__ import annotations


class NiconvError(Exception):
    """Base class of every niconv error.

    Parameters
    ----------
    where : str
        The file path or config key path (``convert.window``) the error is about.
    message : str
        What was expected and what was found, in words a user understands.
    """

    def __init__(self, where: str, message: str):
        self.where = str(where)
        self.message = message
        super().__init__(f"{self.where}: {message}" if self.where else message)


class ConfigError(NiconvError):
    """The YAML config is invalid. ``errors`` lists every problem found in one pass."""

    def __init__(self, where: str, message: str, errors: list[tuple[str, str]] | None = None):
        self.errors = errors or [("", message)]
        super().__init__(where, message)


class ScanError(NiconvError):
    """The input trees cannot be mapped to outputs (missing root, output collision)."""


class InputError(NiconvError, ValueError):
    """An input file is missing, unreadable, corrupt or not an image niconv can convert.

    Also a :class:`ValueError`, so callers of the seed functions that catch
    ``ValueError`` for unreadable images keep working.
    """


class UnsupportedInput(InputError):
    """A readable file of a kind this converter does not handle (e.g. DICOM, complex data)."""


class SkippedInput(InputError):
    """An input this converter does not handle at all (e.g. DICOM for ``numpy``).

    The runner logs it with status ``skipped`` and the reason, not as a failure.
    """


class OutputError(NiconvError, OSError):
    """An output cannot be written (read-only folder, disk full, path outside the output root)."""


class LogError(NiconvError):
    """A CSV log holds nothing a command can use (no readable row)."""


class LockError(NiconvError):
    """Another live niconv run holds the lock on this output root."""


class ClusterError(NiconvError):
    """A cluster command (sbatch, scontrol, a Dask scheduler) failed or is unavailable."""


class DatasetError(NiconvError):
    """A dataset index (``dataset.json``) or one of its sample files cannot be used for training:
    missing, damaged, of another version, or not matching what the index says."""
