"""Messages through Python ``logging``: into the console and, in a Hydra run, its log file.

Library code logs with ``log = get_logger(__name__)``; only rank zero's records pass, unless a
record is marked ``extra=ALL_RANKS`` (a rank with something of its own to say, such as a bad
sample it skipped). Hydra configures the handlers of ``train`` / ``eval`` (``conf/hydra/default.yaml``:
the console and ``<run folder>/<task>.log``); the other command lines call :func:`configure_cli`.
"""

from __future__ import annotations

import logging
import os
import sys

ALL_RANKS = {"all_ranks": True}


def _rank() -> int:
    # Lightning's view once a strategy is set up; before that the launchers' environment.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    if rank is not None:
        return int(rank)
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RankZeroFilter(logging.Filter):
    """Pass rank zero's records, and any marked ``extra=ALL_RANKS`` (prefixed with the rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        if getattr(record, "all_ranks", False):
            if rank:
                record.msg = f"[rank {rank}] {record.msg}"
            return True
        return rank == 0


_FILTER = RankZeroFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name``, filtered to rank zero (see :class:`RankZeroFilter`)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of the record
    (a notebook or a test may have replaced it since the handler was made).
    """

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def stream(self):  # noqa: D102
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_cli(level: int = logging.INFO) -> None:
    """Console logging for the command lines Hydra does not run (demo, prepare, export, ...):
    plain messages on stdout, warnings and errors on stderr. Idempotent.
    """
    root = logging.getLogger()
    if any(isinstance(h, _Console) for h in root.handlers):
        return
    out, err = _Console("stdout"), _Console("stderr")
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
    root.setLevel(min(root.level, level) if root.level else level)
