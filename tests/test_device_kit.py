"""The device lease, rehearsed on CPU: benchmarks/gpu/run.sh end to end (``--device cpu --tiny``) and
the device kit's manifest (``make device-kit``, benchmarks/gpu/kit.txt)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kit_covers_what_the_gpu_image_lacks_at_pinned_versions():
    """Every package the GPU image lacks (issue: diffusers, hydra-core / omegaconf, open_clip,
    pycocotools, pyspng) and their own missing dependencies are in the kit, each pinned."""
    kit = [
        line.split()[0]
        for line in (ROOT / "benchmarks/gpu/kit.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for need in (
        "diffusers",
        "hydra-core",
        "omegaconf",
        "open_clip_torch",
        "pycocotools",
        "pyspng",
        "antlr4-python3-runtime",
        "ftfy",
    ):
        assert need in kit, need
    pins = (ROOT / "requirements/constraints.txt").read_text().lower()
    for name in kit:
        assert re.search(rf"^{re.escape(name.lower())}==", pins, re.M), f"{name} is not pinned"


@pytest.mark.slow
def test_make_device_kit_gathers_wheels_for_python_312(tmp_path):
    """Downloads from the package registry (network): in the slow suite."""
    proc = subprocess.run(
        ["bash", "scripts/device_kit.sh", str(tmp_path / "kit")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PY": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = sorted(p.name for p in (tmp_path / "kit").glob("*.whl"))
    assert any(w.startswith("diffusers-") for w in wheels) and any("cp312" in w for w in wheels), wheels
    assert sum(p.stat().st_size for p in (tmp_path / "kit").iterdir()) < 48 * 2**20


def test_run_sh_rehearsal_on_cpu(tmp_path):
    """run.sh as the GPU machine runs it, at tiny sizes on CPU: every section reports, nothing fails."""
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "SKIP_KIT": "1", "BUDGET_S": "400"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", str(out), "--device", "cpu", "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=460,
    )
    assert (out / "log.txt").exists()
    results = json.loads((out / "results.json").read_text())
    assert proc.returncode == 0, (results.get("failed_sections"), proc.stdout[-3000:])
    assert results["failed_sections"] == []
    assert results["matmul"]["tflops_bf16"] > 0
    assert "passed" in results["tests"]["summary"] and "failed" not in results["tests"]["summary"]
    for size in ("128", "256"):
        row = results["inference"][size]
        assert row["eager"]["images_per_s"] > 0 and row["optimised"]["images_per_s"] > 0
        assert row["optimised"]["tflop_per_image"] > 0
        # random tiny models: the bf16 tolerance proper is tests/test_optimised_inference.py's
        assert row["difference"]["pred_masks"] < 0.25 and row["panoptic_agreement"] > 0.8
    train = results["training"]
    assert len(train["step_seconds"]) == 3 and train["images_per_s"] > 0
