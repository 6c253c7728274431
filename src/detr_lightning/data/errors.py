"""The one exception type for problems the user can fix in their data or data config."""

from __future__ import annotations


class DataError(Exception):
    """A problem of the dataset on disk or the ``data.*`` settings (never a bug), with a one-line message
    naming the file, the record and the fix: entry points print it alone, without a traceback."""
