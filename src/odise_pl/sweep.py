"""Hydra multiruns (ablations, hyper-parameter sweeps): a failed point never ends the sweep.

A point that fails, with a clear configuration error (``error: ...``) or a bug, is reported, leaves
``error.txt`` in its folder, and returns: the next points run (Hydra would otherwise stop the sweep
at a ``sys.exit(2)``, and turn a bug into a traceback after the last point). When the sweep ends,
:class:`SweepReport` (``conf/hydra/default.yaml``) names every failed point with its overrides and
error, and the command exits 1 if any failed. ``scripts/collect_runs.py`` shows the same in its table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from odise_pl.errors import say_error
from odise_pl.log_setup import get_logger

log = get_logger(__name__)
ERROR_FILE = "error.txt"


def multirun_job_dir() -> Path | None:
    """The running job's output folder when it is a point of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app
        return None
    return Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None


def record_failure(job_dir: Path, message: str) -> None:
    """The point's error, kept in its folder for the sweep's report."""
    try:
        (job_dir / ERROR_FILE).write_text(message.strip() + "\n")
    except OSError as err:  # the report is a convenience: never hide the original error
        log.warning("could not write %s: %s", job_dir / ERROR_FILE, err)


def failures(sweep_dir: Path) -> list[tuple[str, str]]:
    """(the overrides that set the point apart, error) of each failed point of a sweep folder, in
    job order.
    """
    points = {}
    for job in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        over = job / ".hydra" / "overrides.yaml"
        if over.is_file():
            points[job] = list(OmegaConf.to_container(OmegaConf.load(over)) or [])
    common = set.intersection(*(set(o) for o in points.values())) if len(points) > 1 else set()
    return [
        (
            " ".join(o for o in overrides if o not in common) or "(base)",
            (job / ERROR_FILE).read_text().strip(),
        )
        for job, overrides in points.items()
        if (job / ERROR_FILE).is_file()
    ]


class SweepReport(Callback):
    """At the end of a multirun: the failed points, by their overrides, and exit status 1 if any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        points = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
        failed = failures(sweep_dir)
        if not failed:
            log.info("sweep: all %d points finished (%s)", len(points), sweep_dir)
            return
        lines = [f"sweep: {len(failed)} of {len(points)} points failed ({sweep_dir}):"]
        lines += [f"  {overrides}: {' '.join(error.split())[:400]}" for overrides, error in failed]
        say_error("\n".join(lines))
        sys.exit(1)
