"""A Hydra multirun with a bad point: the point is reported, the points after it still run, and the
sweep ends by naming its failures (exit status 1); collect_runs.py shows the failure in its table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_bad_point_does_not_end_the_sweep(tmp_path):
    cmd = [sys.executable, "-m", "odise_pl.train", "-m", "experiment=tiny", "model.optimizer.lr=-1,1e-4",
           "trainer.max_steps=1", "data.num_workers=0", "data.synthetic.num_train=2", "data.synthetic.num_val=1",
           "callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false", f"paths.root_dir={tmp_path}"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    assert (sweep / "0" / "error.txt").is_file() and not (sweep / "0" / "metrics.json").exists()
    assert (sweep / "1" / "metrics.json").is_file()  # the point after the bad one ran
    assert (
        "sweep: 1 of 2 points failed" in res.stderr and "model.optimizer.lr=-1: config values" in res.stderr
    )
    assert "Traceback" not in res.stderr
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "collect_runs.py"), str(sweep)],
        capture_output=True,
        text=True,
    ).stdout
    rows = [line for line in table.splitlines() if line.startswith("| model.optimizer.lr=")]
    assert "(failed: " in rows[0] and "lr" in rows[0] and "(failed" not in rows[1]
