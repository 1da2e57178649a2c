"""Errors a user can fix, and how command-line entry points report them.

Every error class whose message names the file or config key at fault and the fix derives from
:class:`OdiseError` (as well as the builtin it has always been, so ``except ValueError`` keeps
working). Entry points print such an error as one ``error: ...`` line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys


class OdiseError(Exception):
    """Bad input or configuration; the message names what is wrong and how to fix it."""


class ConfigError(OdiseError, ValueError):
    """A config value of the wrong type or outside its allowed values; the message names the key."""


class DatasetError(OdiseError, RuntimeError):
    """Bad or missing data; the message names the file and the fix."""


class CheckpointError(OdiseError, RuntimeError):
    """An unreadable or mismatching checkpoint; the message names the file."""


class VocabularyError(OdiseError, ValueError):
    """An empty, duplicated or malformed vocabulary; the message says where."""


class WeightsNotFoundError(OdiseError, RuntimeError):
    """A pretrained model could not be loaded; the message says what to download and how to point at it."""


class OutputError(OdiseError, OSError):
    """An output path that cannot be written, or a run folder in use; the message says what to do."""


class PanopticEvalError(OdiseError, ValueError):
    """Prediction / ground-truth files that do not fit together; the message names the file."""


def find_user_error(err: BaseException) -> OdiseError | None:
    """The :class:`OdiseError` in ``err``'s cause chain (Hydra wraps errors raised while it
    instantiates objects; DataLoader workers re-raise with the original type), or None.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OdiseError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def report_user_error(err: BaseException) -> bool:
    """Print ``error: <message>`` on stderr if ``err`` is (or wraps) a user error; True if it was."""
    user = find_user_error(err)
    if user is None:
        return False
    message = str(user)
    # A DataLoader worker's re-raised error carries the worker's traceback after the message.
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    say_error(message)
    return True


def say_error(message: str) -> None:
    """A command line's last word, ``error: <message>``, on stderr. The one ``print`` of the
    package: this line is the command's contract with shells and schedulers, which read stderr
    whatever logging is configured (Hydra sends log records to stdout and the run's log file).
    """
    logging.getLogger("odise_pl").debug("error: %s", message)  # into the run's log file as well
    print(f"error: {message}", file=sys.stderr)


def exit_on_user_error(fn):
    """Decorator for entry points: a user error becomes ``error: <message>`` on stderr and exit 2.

    In a Hydra multirun the point's failure (a user error or a bug, whose traceback goes to the log)
    is recorded in its folder and the point returns None, so the sweep goes on
    (:mod:`odise_pl.sweep` reports the failures at its end).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from odise_pl.sweep import multirun_job_dir, record_failure

        try:
            return fn(*args, **kwargs)
        except Exception as err:
            job_dir = multirun_job_dir()
            user = report_user_error(err)
            if job_dir is None:
                if not user:
                    raise
                sys.exit(2)
            if not user:
                logging.getLogger("odise_pl").exception("this sweep point failed")
            record_failure(job_dir, str(find_user_error(err) or f"{type(err).__name__}: {err}"))
            return None

    return wrapper
