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


def _names(path: Path) -> list[str]:
    return [
        line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


KIT = {_norm(n) for n in _names(ROOT / "benchmarks/gpu/kit.txt")}
IMAGE = {_norm(n) for n in _names(ROOT / "benchmarks/gpu/image_packages.txt")}
# Declared dependencies the device checks never import (loggers and launchers of other commands).
NOT_ON_DEVICE = {"wandb", "tensorboard", "hydra-submitit-launcher"}


def test_kit_pins_every_package_and_covers_what_the_image_lacks():
    """Each declared dependency the device checks use is on the GPU image or in the kit, and each
    kit package is pinned in requirements/constraints.txt (the versions `make device-kit` fetches)."""
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = _norm(Requirement(dep).name)
        assert name in KIT | IMAGE | NOT_ON_DEVICE, f"{name}: add it to benchmarks/gpu/kit.txt"
    # and everything the package imports (not only what it declares)
    import importlib.metadata as md

    from test_dependencies import OPTIONAL, _imported

    dists = md.packages_distributions()
    for module in _imported() - OPTIONAL:
        names = {_norm(d) for d in dists.get(module, [module])}
        assert names & (KIT | IMAGE | NOT_ON_DEVICE), (
            f"{module} ({names}) is neither on the GPU image nor in the kit"
        )
    pins = {
        _norm(line.split("==")[0])
        for line in (ROOT / "requirements/constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert KIT <= pins, KIT - pins


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
    # --no-deps installs there: every requirement of a kit wheel must be in the kit or on the image
    from packaging.requirements import Requirement

    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "extra": "",
    }
    for wheel in (tmp_path / "kit").glob("*.whl"):
        meta = subprocess.run(
            ["unzip", "-p", str(wheel), "*/METADATA"], capture_output=True, text=True
        ).stdout
        for line in meta.splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is None or req.marker.evaluate(env):
                    assert _norm(req.name) in KIT | IMAGE, f"{wheel.name} needs {req.name}: add it to kit.txt"


@pytest.mark.slow
def test_run_sh_rehearsal_on_cpu(tmp_path):
    """run.sh as the GPU machine runs it, at tiny sizes on CPU: every section reports, nothing fails."""
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "SKIP_KIT": "1", "BUDGET_S": "400"}
    # the cheap CUDA-path tests only: the full set runs in `make gpu-rehearsal` (and on the GPU)
    select = "grid_sample"
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", str(out), "--device", "cpu", "--tiny", "--tests-select", select],
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
