"""The base class of every error that is the user's to fix, not embedlab's.

A bad data file, a malformed config value or a model folder that cannot be loaded is not a bug: the
user needs one line saying what is wrong and where, not a traceback. Subclasses (e.g.
:class:`embedlab.data.errors.DataError`) carry such messages; entry points (``train.py``,
``evaluate.py``, ``mine.py``) catch :class:`UserError`, print ``error: <message>`` on stderr and exit
with status 1 (the traceback only with ``HYDRA_FULL_ERROR=1``). Anything else escaping an entry point is
a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in the user's input or config.

    Entry points print its message as one line (``error: <message>``) and exit 1, so the message must say
    on its own what is wrong and how to fix it: the file, line and field, or the config key and the value.
    """


class ConfigError(UserError, ValueError):
    """A config value that cannot work: out of range, or inconsistent with another value.

    The message names the config key (as the user would override it) and the value, e.g.
    ``module.scheduler.warmup_ratio must be in [0, 1], got 1.5``. Also a :class:`ValueError`, so code
    that checks arguments with ``except ValueError`` keeps working.
    """
