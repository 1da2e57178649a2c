"""A training process killed with SIGKILL mid-run, or stopped by SIGTERM (as schedulers pre-empt),
resumes from its last checkpoint and reproduces the uninterrupted run's later losses exactly."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

STEPS = 8


def _cmd(tmp_path, out, *extra):
    return [
        sys.executable,
        "-m",
        "odise_pl.train",
        f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=1000",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.synthetic.num_train=6",
        "data.synthetic.num_val=2",
        "callbacks.progress.refresh_rate=0",
        "trainer.enable_model_summary=false",
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={out}",
        *extra,
    ]


def _losses(out) -> dict[int, float]:
    rows = csv.DictReader(open(next((out / "csv").glob("version_*/metrics.csv"))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _loadable(path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses per step."""
    tmp = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(tmp, tmp / "full"), check=True, capture_output=True, timeout=600)
    return _losses(tmp / "full")


def _resume_matches(tmp_path, ckpt, reference, start):
    resumed = tmp_path / "resumed"
    subprocess.run(_cmd(tmp_path, resumed, f"ckpt_path={ckpt}"), check=True, capture_output=True, timeout=600)
    after = _losses(resumed)
    assert sorted(after) and min(after) >= start
    for step, loss in after.items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (step, loss, reference[step])


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, reference):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tmp_path, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step_000004.ckpt").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint-write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted((killed / "checkpoints").glob("step_*.ckpt"))
    good = [c for c in ckpts if _loadable(c)]
    assert good, "no complete checkpoint survived the kill"
    resume_from = good[-1]
    start = torch.load(resume_from, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= start < STEPS

    _resume_matches(tmp_path, resume_from, reference, start)


def test_sigterm_saves_last_ckpt_exits_143_and_resumes_exactly(tmp_path, reference):
    stopped = tmp_path / "stopped"
    cmd = _cmd(
        tmp_path,
        stopped,
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_last=false",  # last.ckpt can only come from the SIGTERM save
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (stopped / "checkpoints" / "step_000002.ckpt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: the scheduler sees an unfinished job
    last = stopped / "checkpoints" / "last.ckpt"
    assert last.exists() and _loadable(last) and "stopped by SIGTERM" in err and f"ckpt_path={last}" in err
    assert not list((stopped / "checkpoints").glob(".*.partial"))
    start = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= start < STEPS
    # The same command again in the same folder (a requeued SLURM job): auto_resume continues it.
    # (Resuming into a new folder with ckpt_path= is the SIGKILL test's.)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {last}" in again.stdout
    newest = max((stopped / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    after = {
        int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(newest)) if r.get("train/loss")
    }
    assert sorted(after) and min(after) >= start
    for step, loss in after.items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (step, loss, reference[step])
