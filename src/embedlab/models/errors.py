"""The one exception type for a model that cannot be loaded or rebuilt."""

from __future__ import annotations

from embedlab.errors import UserError


class ModelLoadError(UserError, ValueError):
    """A model path, folder or checkpoint that cannot be loaded as asked.

    Examples: a missing folder, a folder without ``config.json``, an unreachable Hub id, a checkpoint that
    stores Python objects outside the safe-loading allow-list, a checkpoint whose model config names a
    constructor embedlab does not rebuild from checkpoints, an override that would change a trained
    checkpoint's architecture. A :class:`~embedlab.errors.UserError` (entry points print the message as one
    line and exit 1) and a ``ValueError`` (callers that catch ``ValueError`` keep working).
    """
