"""The one exception type for bad input data.

Every reader in :mod:`embedlab.data` reports a malformed file, a missing column or an inconsistent id
as a :class:`DataError` whose message says *where* (the full file path, the 1-based line or row number
where that applies) and *what* (the field or column, and the offending value), for example::

    /data/scifact/corpus.jsonl line 17: missing field '_id'

so a user can open the file at that line and fix it without reading embedlab's code.
"""

from __future__ import annotations

from embedlab.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data: a file, row or field that the data layer cannot use.

    A :class:`~embedlab.errors.UserError`, so entry points print its message as one line and exit 1. It
    also subclasses :class:`ValueError` so callers that already catch ``ValueError`` keep working; catch
    ``DataError`` to tell data problems apart from programming errors.
    """
