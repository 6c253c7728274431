"""The one exception type for problems the user can fix in their data or data config."""

from __future__ import annotations


class DataError(Exception):
    """A data problem with a one-line message naming the file, the record and the fix.

    Raised for anything caused by the dataset on disk or the ``data.*`` settings (never for bugs), so
    entry points can print the message alone, without a traceback, and exit non-zero.
    """
