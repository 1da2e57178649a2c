"""Experiment loggers that know which run they belong to.

``logger=wandb`` builds a :class:`~lightning.pytorch.loggers.WandbLogger` whose name, group and
tags come from the experiment and the command line's overrides (every run used to be named
"train"), and whose run id is kept in the run folder (``wandb_id.txt``): a requeued job (same
folder) and a run resumed with ``ckpt_path=`` (a new folder; the id is read beside the checkpoint's
run) continue the same W&B run instead of starting another.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from odise_pl.log_setup import get_logger

log = get_logger(__name__)

ID_FILE = "wandb_id.txt"
# Overrides that say where or how a run ran, not what it studies: left out of W&B names and tags.
_NOT_THE_SCIENCE = re.compile(
    r"^[+~]?(paths|hydra|ckpt_path|auto_resume|expected_duration|logger|callbacks|"
    r"trainer(=|\.(devices|num_nodes|accelerator|enable_\w+))|data\.num_workers)\b"
)


def run_identity() -> dict:
    """``{"experiment", "overrides", "sweep"}`` of the running Hydra app (empty outside one):
    the ``experiment=`` choice, the command line's ``key=value`` overrides (the sweep point's
    values in a multirun) and, in a multirun, the sweep folder's name.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        return {"experiment": None, "overrides": [], "sweep": None}
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    return {
        "experiment": hc.runtime.choices.get("experiment"),
        "overrides": [o for o in hc.overrides.task if not _NOT_THE_SCIENCE.match(o)],
        "sweep": Path(hc.sweep.dir).name if multirun else None,
    }


def names_for(identity: dict, task: str = "train") -> tuple[str, str, list[str]]:
    """(name, group, tags): name = experiment + its overrides; group = the experiment (and the
    sweep, so a sweep's points sit together); tags = experiment, task, each override.
    """
    experiment = identity.get("experiment") or task
    overrides = identity.get("overrides") or []
    name = " ".join([experiment, *overrides])
    group = experiment + (f"/{identity['sweep']}" if identity.get("sweep") else "")
    # W&B tags are at most 64 characters
    tags = [t[:64] for t in dict.fromkeys([experiment, task, *overrides])]
    return name, group, tags


def run_id(save_dir: str | Path, resume_from: str | Path | None = None) -> str:
    """The W&B run id of this run folder: the one already there (a requeued job), else the one of
    the run ``resume_from`` (a checkpoint) belongs to, else a new one; written to the folder.
    """
    own = Path(save_dir) / ID_FILE
    candidates = [own]
    if resume_from:
        ckpt = Path(resume_from)
        candidates += [ckpt.parent.parent / ID_FILE, ckpt.parent / ID_FILE]  # run/checkpoints/x.ckpt
    for path in candidates:
        if path.is_file() and path.read_text().strip():
            found = path.read_text().strip()
            break
    else:
        found = secrets.token_hex(4)  # W&B accepts any [a-z0-9] id; it generates 8 characters too
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text(found + "\n")
    return found


def wandb_logger(
    project: str = "odise-pl",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    resume_from: str | None = None,
    task: str = "train",
    **kwargs,
):
    """A ``WandbLogger`` named after the run (see the module docstring); ``name`` / ``group`` /
    ``tags`` given explicitly win; ``kwargs`` go to ``WandbLogger`` (``offline``, ``entity``, ...).
    """
    from lightning.pytorch.loggers import WandbLogger

    auto_name, auto_group, auto_tags = names_for(run_identity(), task)
    rid = run_id(save_dir, resume_from)
    log.info("W&B run %s (id %s, group %s)", name or auto_name, rid, group or auto_group)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name or auto_name,
        group=group or auto_group,
        tags=list(tags) if tags else auto_tags,
        id=rid,
        resume="allow",
        **kwargs,
    )
