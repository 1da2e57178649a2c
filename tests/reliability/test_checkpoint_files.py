"""Checkpoint files a user hands us when resuming or exporting: every bad one is one line naming the
file (and for another architecture both values), before any model is built; nothing in a checkpoint
ever runs; an export never replaces its input and is written atomically."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

import odise_pl.train as train_module
from odise_pl.checkpoints.export import export_safetensors
from odise_pl.checkpoints.export import main as checkpoint_main
from odise_pl.errors import CheckpointError, OutputError

from test_train import cfg_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the tiny experiment (trainable weights under ``net.``, as training writes them)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    net = instantiate(cfg_for(tmp, "trainer.max_steps=1").model.net)
    path = tmp / "tiny.ckpt"
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in net.trainable_state_dict().items()}, "global_step": 1}, path
    )
    return path


@pytest.fixture()
def no_build(monkeypatch):
    """Fails the test if the model would be built (the checks must come first)."""

    def refuse(*a, **k):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(train_module, "build", refuse)


def bad_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    noise = tmp_path / "random.ckpt"
    noise.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "missing": (tmp_path / "nope.ckpt", "checkpoint not found"),
        "directory": (tmp_path, "is a directory; give the .ckpt file inside it"),
        "empty": (empty, "cannot read checkpoint"),
        "random": (noise, "cannot read checkpoint"),
        "truncated": (truncated, "cannot read checkpoint"),
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random", "truncated"])
def test_resume_from_an_unreadable_checkpoint(tmp_path, tiny_ckpt, no_build, kind):
    path, message = bad_files(tmp_path, tiny_ckpt)[kind]
    with pytest.raises(CheckpointError, match=message):
        train_module.train(cfg_for(tmp_path, f"ckpt_path={path}"))


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "model.net.transformer_decoder.num_queries=8",
            "model.net.transformer_decoder.num_queries: checkpoint 16, config 8",
        ),
        (
            "model.net.transformer_decoder.num_layers=2",
            "model.net.transformer_decoder.num_layers: checkpoint 3, config 2",
        ),
        (
            "model.net.transformer_decoder.hidden_dim=32",
            "model.net.transformer_decoder.hidden_dim: checkpoint 64, config 32",
        ),
        ("model.net.transformer_decoder.objectness=true", "model kind: checkpoint label .*, config caption"),
    ],
)
def test_resume_with_another_architecture_names_both_values(
    tmp_path, tiny_ckpt, no_build, override, expected
):
    with pytest.raises(CheckpointError, match=f"trained with another architecture: .*{expected}"):
        train_module.train(cfg_for(tmp_path, f"ckpt_path={tiny_ckpt}", override))


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "odise_pl.train",
            f"ckpt_path={tmp_path}/nope.ckpt",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        res.returncode == 2 and "error: checkpoint not found" in res.stderr and "Traceback" not in res.stderr
    )


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_never_runs_code_even_when_the_environment_allows_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default would run it
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train_module.train(cfg_for(tmp_path, f"ckpt_path={evil}"))
    from odise_pl.checkpoints import AtomicCheckpointIO

    with pytest.raises(CheckpointError):  # the path Lightning itself loads through
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    with pytest.raises(CheckpointError):
        export_safetensors(evil, tmp_path / "out.safetensors")
    assert not marker.exists()


def test_every_torch_load_in_the_project_says_weights_only_true():
    calls = []
    for folder in ("src", "scripts", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, i = 1, m.end()
                while depth and i < len(text):  # the call's full argument list, across lines
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                call = text[m.start() : i]
                if "weights_only=True" not in call:
                    calls.append(f"{path.relative_to(ROOT)}: {call[:80]}")
    assert not calls, calls


def test_export_refuses_to_overwrite_its_input_and_writes_atomically(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(tiny_ckpt.read_bytes())
    before = ckpt.read_bytes()
    assert checkpoint_main(["export", str(ckpt), str(ckpt)]) == 2
    link = tmp_path / "link.ckpt"
    link.symlink_to(ckpt)
    assert checkpoint_main(["export", str(ckpt), str(link)]) == 2
    assert ckpt.read_bytes() == before
    out = tmp_path / "w.safetensors"
    assert checkpoint_main(["export", str(ckpt), str(out)]) == 0
    assert out.stat().st_size > 0 and not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("target", ["dir", "devnull", "readonly"])
def test_export_to_an_unusable_output_fails_before_reading(tmp_path, tiny_ckpt, target, capsys):
    if target == "readonly" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out = {"dir": tmp_path, "devnull": Path("/dev/null"), "readonly": tmp_path / "ro" / "w.safetensors"}[
        target
    ]
    if target == "readonly":
        out.parent.mkdir()
        out.parent.chmod(0o500)
    with pytest.raises((CheckpointError, OutputError)):
        export_safetensors(tiny_ckpt, out)


def test_export_of_a_checkpoint_without_weights_is_one_line(tmp_path, capsys):
    odd = tmp_path / "odd.ckpt"
    torch.save({"epoch": 3, "optimizer_states": []}, odd)
    assert checkpoint_main(["export", str(odd), str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no state_dict" in err
