"""Shared folders: two runs never share a run folder; a killed write's temporary file is cleaned up
by the next run; two first runs do not race to write the synthetic dataset. (SIGTERM: test_kill_resume.py.)"""

import os
import subprocess

import pytest
from test_kill_resume import _cmd

from odise_pl.errors import OutputError
from odise_pl.fs import RunLock


def test_a_run_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(
            OutputError, match=f"run folder {out} is in use by another run \\(host .*, pid {os.getpid()}\\)"
        ):
            RunLock(out)
        assert not RunLock.is_free(out)
        # a second training process with the same output folder stops at once, with the fix
        res = subprocess.run(_cmd(tmp_path, out), capture_output=True, text=True, timeout=300)
        assert (
            res.returncode == 2
            and "is in use by another run" in res.stderr
            and "paths.output_dir" in res.stderr
        )
    assert RunLock.is_free(out)
    RunLock(out).release()  # free again once the holder is gone


def test_runs_started_together_get_their_own_folders(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from odise_pl.config import run_name  # importing it registers the resolver

    names = {run_name() for _ in range(50)}
    assert len(names) == 50  # same second, different folders
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_name() == "slurm-4242"  # every rank, and the requeued job, find the same folder
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_name() == "slurm-77_3"
    cfg = OmegaConf.create({"a": "${run_name:}", "b": "${run_name:}"})
    assert cfg.a == cfg.b  # resolved once per process: run and sweep folders agree


def test_stale_partial_files_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".last.ckpt.abc123.partial"  # a write killed by SIGKILL
    stale.write_bytes(b"half a checkpoint")
    keep = out / "checkpoints" / "step_000001.ckpt"
    keep.write_bytes(b"not ours to touch")
    subprocess.run(_cmd(tmp_path, out, "trainer.max_steps=1"), check=True, capture_output=True, timeout=600)
    assert not stale.exists() and keep.exists()


def test_two_first_runs_write_the_synthetic_dataset_once(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from odise_pl.data.synthetic import ensure_dataset

    root = tmp_path / "syn"
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(ensure_dataset, [root, root], [4, 4], [2, 2]))
    assert results == [root, root]
    assert len(list((root / "train2017").glob("*.jpg"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
