"""Errors of the data plane."""

from __future__ import annotations


class SourceError(ValueError):
    """A source cannot be read: unknown kind, missing columns, unreachable storage, bad format."""


class MissingDatasetError(SourceError):
    """A built-in corpus whose Debian package is not installed (the message says which)."""


class DestinationError(ValueError):
    """An ingest output cannot be written: unreachable storage, bad credentials, no bucket."""
