"""Messages go through logging, rank zero only; progress is in optimiser steps with an ETA."""

import ast
import logging
import time
from pathlib import Path

import pytest
from lightning.fabric.utilities.rank_zero import rank_zero_only

from odise_pl.callbacks.progress import StepProgressBar, format_duration
from odise_pl.log_setup import ALL_RANKS, get_logger

SRC = Path(__file__).resolve().parents[1] / "src" / "odise_pl"


def test_no_print_in_the_package_but_the_command_lines_last_word():
    found = []

    class Visitor(ast.NodeVisitor):
        def __init__(self, where):
            self.where, self.stack = where, ["<module>"]

        def visit_FunctionDef(self, node):
            self.stack.append(node.name)
            self.generic_visit(node)
            self.stack.pop()

        def visit_Call(self, node):
            if getattr(node.func, "id", None) == "print":
                found.append(f"{self.where}:{self.stack[-1]}")
            self.generic_visit(node)

    for path in SRC.rglob("*.py"):
        Visitor(str(path.relative_to(SRC))).visit(ast.parse(path.read_text()))
    assert found == ["errors.py:say_error"], found


def test_other_ranks_are_quiet_unless_they_have_their_own_news(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="odise_pl")
    log = get_logger("odise_pl.test")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    log.info("everyone knows this")
    log.warning("bad sample %s", "x.jpg", extra=ALL_RANKS)
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    log.info("from rank zero")
    assert [r.getMessage() for r in caplog.records] == ["[rank 1] bad sample x.jpg", "from rank zero"]


@pytest.mark.parametrize(
    "seconds, text", [(0, "00:00"), (65, "01:05"), (3 * 3600 + 5, "03:00:05"), (86400 + 61, "1d 00:01:01")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_status_line_counts_steps_of_this_session(monkeypatch):
    bar = StepProgressBar(refresh_rate=0)
    monkeypatch.setattr(StepProgressBar, "max_steps", property(lambda self: 1000))
    now = time.monotonic()
    bar._start = (now - 100.0, 500)  # resumed at step 500, 100 s ago
    monkeypatch.setattr(time, "monotonic", lambda: now)
    # 50 steps in 100 s: 2 s/step, 450 steps left
    assert bar.status_line(550, 1.5) == "step 550/1000 (55.0%)  2.00 s/step  ETA 15:00  loss 1.5"
