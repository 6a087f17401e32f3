"""Command-line entry points: ``@hydra_main`` turns a user error into one line on stderr.

A user error is something the user fixes in their command, config or files, not in embedlab's code:

* :class:`embedlab.errors.UserError` and its subclasses (``DataError``, ``ModelLoadError``, ``ConfigError``),
  also when ``hydra.utils.instantiate`` wraps one in an ``InstantiationException`` (found via ``__cause__``);
* OmegaConf errors: a missing mandatory value (``???``), an unknown key, a value of the wrong type;
* Hydra's composition errors: an unknown config option (``model=nope``), an override of a key that does not
  exist (``foo=1``), an override that does not parse.

For those the program prints ``error: <message>`` as the last line on stderr and exits with status 1, no
traceback. ``HYDRA_FULL_ERROR=1`` shows the full traceback instead (for a bug report or a debugger). Any
other exception is a bug and keeps its traceback.

How it hooks into Hydra. ``@hydra.main`` runs composition and the task inside ``run_and_report``, which
prints its own report (a trimmed traceback, or a multi-line message, then a line about
``HYDRA_FULL_ERROR``) unless ``HYDRA_FULL_ERROR`` is set, in which case it re-raises. So:

1. Around the whole Hydra call, :func:`hydra_main` sets ``HYDRA_FULL_ERROR=1`` for Hydra's own phase, so a
   composition error reaches it as an exception, and reports it.
2. When the task starts it removes that setting again (processes the task launches, e.g. DDP ranks, must
   not inherit it) and reports user errors raised by the task itself by exiting with ``SystemExit(1)``,
   which ``run_and_report`` does not catch. Bugs raised by the task go through Hydra's normal report.
3. A job of a multirun (``-m``) must not exit: Hydra's launchers record a job's ``Exception`` as a failed
   job and run the next ones, but a ``SystemExit`` (a ``BaseException``) escapes them and ends the whole
   sweep. There the user error is printed the same way, then raised as :class:`JobFailed` (a
   :class:`UserError`), and ``HYDRA_FULL_ERROR`` is set again once the job ends: when the sweeper raises the
   first failed job's exception after its batch, it reaches :func:`hydra_main`, which prints it as the last
   line ``error: <message>`` and exits 1, after Hydra's ``Error executing job with overrides: [...]``. (A bug
   in a job is a failed job too; the command then ends with its full traceback, not Hydra's trimmed one.)
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from hydra.errors import CompactHydraException, InstantiationException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from embedlab.errors import UserError
from embedlab.sweeps import multirun_job

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


def full_error_requested() -> bool:
    """Whether the user asked for full tracebacks (``HYDRA_FULL_ERROR`` set and not empty, as Hydra reads it)."""
    return os.environ.get(FULL_ERROR_ENV, "") != ""


def user_error(ex: BaseException) -> BaseException | None:
    """The exception whose message the user needs, or ``None`` when ``ex`` is not a user error (a bug).

    Follows ``__cause__`` through Hydra's ``InstantiationException`` (``raise ... from e``) to the
    :class:`UserError` or OmegaConf error it wraps; another Hydra error with a compact message (config
    composition) is a user error itself.
    """
    seen: BaseException | None = ex
    while seen is not None:
        if isinstance(seen, (UserError, OmegaConfBaseException)):
            return seen
        if isinstance(seen, InstantiationException):  # wraps the constructor's exception: user error or bug
            seen = seen.__cause__
            continue
        if isinstance(seen, CompactHydraException):
            return seen
        return None
    return None


def one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines joined by ``" "`` (``". "`` after a line without final
    punctuation); the lines after one ending in ``":"`` are a list, joined by ``", "``. Stops at Hydra's
    ``"Config search path:"`` listing, which is about Hydra's internals, not the user's mistake.

    >>> one_line("In 'train': Could not find 'model/nope'\\n\\nAvailable options in 'model':\\n\\thf\\n\\ttiny")
    "In 'train': Could not find 'model/nope'. Available options in 'model': hf, tiny"
    """
    out, in_list = "", False
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        if line == "Config search path:":
            break
        if not out:
            out = line
        elif in_list:
            out += (" " if out.endswith(":") else ", ") + line
        else:
            out += (" " if out[-1] in ".:;!?)" else ". ") + line
        in_list = in_list or line.endswith(":")
    return out


def error_message(ex: BaseException) -> str:
    """The one-line message for a user error (see :func:`user_error`).

    OmegaConf messages keep the offending key: their first line (``Missing mandatory value: data.name``,
    ``Key 'foo' is not in struct``) plus ``(full_key: <key>)`` when that line does not already name it.
    A Hydra override error names the override and adds the OmegaConf error it wraps in parentheses.
    """
    if isinstance(ex, OmegaConfBaseException):
        message = str(ex).splitlines()[0] if str(ex).strip() else type(ex).__name__
        full_key = getattr(ex, "full_key", None)
        if full_key and not re.search(rf"(?<![\w.]){re.escape(full_key)}(?![\w.])", message):
            message += f" (full_key: {full_key})"
        return message
    message = one_line(str(ex))
    if isinstance(ex, OverrideParseException):
        message = f"override {ex.override!r}: {message}"
    if isinstance(ex, CompactHydraException) and isinstance(ex.__cause__, OmegaConfBaseException):
        message += f" ({error_message(ex.__cause__)})"
    return message


class JobFailed(UserError):
    """A user error that ended one job of a multirun (its message is the error's one line): an ordinary
    exception, so that Hydra's launcher marks the job failed and goes on with the others."""


def print_error(ex: BaseException) -> str:
    """Print ``error: <message>`` as one line on stderr; returns the message."""
    message = error_message(ex)
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return message


def exit_with_error(ex: BaseException) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with status 1."""
    print_error(ex)
    raise SystemExit(1)


def hydra_main(config_name: str, config_path: str = "configs") -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@hydra.main(version_base="1.3", config_path=..., config_name=...)`` that reports user errors as
    one line ``error: <message>`` on stderr with exit status 1 (see the module docstring).

    ``config_path`` is relative to the file that defines the task function, as for ``@hydra.main``. The
    decorated function takes no arguments (Hydra reads ``sys.argv``); Hydra keeps the task's return value
    for sweepers. Importing this module imports :mod:`embedlab`, which registers the config resolvers.
    """

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        set_here = False  # whether this process set HYDRA_FULL_ERROR (not the user)

        @functools.wraps(task)
        def reporting_task(cfg: DictConfig) -> Any:
            nonlocal set_here
            owned = set_here  # HYDRA_FULL_ERROR is this process's setting, for Hydra's phases only
            if set_here:
                os.environ.pop(FULL_ERROR_ENV, None)
                set_here = False
            in_sweep = multirun_job() is not None
            try:
                return task(cfg)
            except Exception as ex:
                cause = user_error(ex)
                if cause is None or full_error_requested():
                    raise
                if in_sweep:
                    raise JobFailed(print_error(cause)) from ex
                exit_with_error(cause)
            finally:
                if owned and in_sweep:  # the next job, or the sweeper raising a failed job's error
                    os.environ[FULL_ERROR_ENV] = "1"
                    set_here = True

        hydra_decorated = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(reporting_task)

        @functools.wraps(task)
        def main() -> Any:
            nonlocal set_here
            if full_error_requested():  # the user wants tracebacks: Hydra re-raises everything
                return hydra_decorated()
            os.environ[FULL_ERROR_ENV] = "1"
            set_here = True
            try:
                return hydra_decorated()
            except Exception as ex:  # raised by Hydra before the task ran (config composition)
                cause = user_error(ex)
                if cause is None:
                    raise
                exit_with_error(cause)
            finally:
                if set_here:
                    os.environ.pop(FULL_ERROR_ENV, None)
                    set_here = False

        return main

    return decorate
