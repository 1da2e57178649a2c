"""Every command the README shows is run by some test: this file lists them, each with the test that
runs it (or runs its entry point on synthetic data where the command needs GPUs, real weights or a
dataset), checks that the named tests exist, and runs the commands no other test runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

FAST = [
    "trainer.max_steps=2",
    "data.num_workers=0",
    "data.synthetic.num_train=2",
    "data.synthetic.num_val=1",
    "callbacks.progress.refresh_rate=0",
    "trainer.enable_model_summary=false",
]
HERE = "tests/test_readme_commands.py"
OFFICIAL = "the official ODISE's command, quoted for comparison: not ours"
CI = ".ci/run runs it (the default suite, then the slow suite)"

# (pattern over a README command, the test that runs it: "file::function", or why none can here)
RULES: list[tuple[str, str]] = [
    # README "Your own data" (before the generic train / eval rules: the first match counts)
    (r"^python -m odise_pl\.predict\b", "tests/test_own_data.py::test_convert_finetune_evaluate_predict"),
    (r"^python -m odise_pl\.train experiment=\w+ data=custom", "tests/test_own_data.py::test_convert_finetune_evaluate_predict"),
    (r"^python -m odise_pl\.eval ckpt_path=\S+ datasets=\[custom\]", "tests/test_own_data.py::test_convert_finetune_evaluate_predict"),
    (r"^make train\b", f"{HERE}::test_make_train_runs_the_default_experiment"),
    (r"^make test\b", CI),
    (r"^make test-slow\b", CI),
    (r"^make lint\b", ".ci/run runs it before the tests"),
    (r"^make setup\b", "make test runs it first (a fresh .venv in CI)"),
    (r"^make browser\b", "make test runs it first"),
    (r"^make help\b", f"{HERE}::test_make_help_lists_the_targets"),
    (r"^make bench\b", f"{HERE}::test_make_bench_prints_its_ratios"),
    (r"^make smoke-full\b", "tests/test_smoke_full.py::test_caption_512_two_steps_random_weights"),
    (r"^make app\b", "tests/test_app.py::test_the_page_in_a_headless_browser"),
    (r"^make gpu-rehearsal\b", "tests/test_device_kit.py::test_run_sh_rehearsal_on_cpu"),
    (r"^make device-kit\b", "tests/test_device_kit.py::test_make_device_kit_gathers_wheels_for_python_312"),
    (r"^bash benchmarks/gpu/run\.sh", "tests/test_device_kit.py::test_run_sh_rehearsal_on_cpu"),
    (r"^pytest -m gpu\b", "tests/test_gpu.py::test_bf16_mixed_training_steps_stay_finite"),
    (r"^python -m odise_pl\.train -m ablation=captioner", "tests/test_ablation.py::test_captioner_ablation_runs_every_captioner_and_collects_one_table"),
    (r"^python -m odise_pl\.train -m ablation=backbone", "tests/test_timm_backbone.py::test_backbone_ablation_runs_and_collects_one_table"),
    (r"^python -m odise_pl\.train -m ablation=timestep", f"{HERE}::test_timestep_ablation_sweeps_every_point"),
    (r"^python -m odise_pl\.eval -m ablation=ensemble", f"{HERE}::test_ensemble_ablation_evaluates_every_point"),
    (r"^python -m odise_pl\.train -m hydra/launcher=slurm", "tests/test_cluster.py::test_slurm_launcher_takes_nodes_gpus_time_partition_from_config"),
    (r"^python -m odise_pl\.train -m hydra/launcher=local", "tests/test_cluster.py::test_two_point_sweep_through_submitit_with_named_wandb_runs"),
    (r"^python -m odise_pl\.train validate_before_training=true", f"{HERE}::test_validate_before_training"),
    # README "Diffusion backbones"
    (r"^python -m odise_pl\.train backbone=(sd2|sdxl) ", "tests/test_backbones.py::test_each_backbone_trains_saves_only_what_is_trained_and_segments"),
    (r"^python -m odise_pl\.train weights\.unet_source=", "tests/test_backbones.py::test_a_fine_tuned_unet_replaces_the_base_models"),
    (r"^python -m odise_pl\.train -m ablation=diffusion", "tests/test_backbones.py::test_the_diffusion_ablation_trains_every_backbone"),
    (r"^python benchmarks/bench_backbones\.py", "tests/test_backbones.py::test_bench_backbones_prints_the_table_and_its_ratios"),
    # training at paper scale needs COCO and GPUs: the same entry point and experiments, synthetic data
    (r"^python -m odise_pl\.train experiment=\w+ (trainer=|captioner=)", "tests/test_experiments_slow.py::test_every_experiment_one_step"),
    (r"^python -m odise_pl\.eval ckpt_path=\S+ (model\.|trainer=ddp)", "tests/test_eval.py::test_two_process_evaluation_equals_one"),
    (r"^python -m odise_pl\.eval ckpt_path=", "tests/test_eval.py::test_eval_prints_pq_miou_ap_and_writes_results"),
    (r"^python -m odise_pl\.evaluation\.panoptic_quality", "tests/test_panoptic_quality.py::test_cli_prints_table_and_writes_json"),
    (r"^python -m odise_pl\.demo\b", "tests/test_demo.py::test_demo_writes_overlay_panoptic_png_and_json"),
    (r"^python -m odise_pl\.app\b", "tests/test_app_limits.py::test_http_disk_is_bounded_and_cleaned_at_shutdown"),
    (r"^python -m odise_pl\.checkpoints export", "tests/reliability/test_checkpoint_files.py::test_export_refuses_to_overwrite_its_input_and_writes_atomically"),
    (r"^python scripts/convert_coco_instances\.py", "tests/test_convert_datasets.py::test_scripts_convert_with_one_line_errors"),
    (r"^python scripts/convert_semantic_folder\.py", "tests/test_convert_datasets.py::test_scripts_convert_with_one_line_errors"),
    (r"^python -m odise_pl\.data\.synthetic", "tests/test_data.py::test_synthetic_cli"),
    (r"^python scripts/collect_runs\.py", "tests/test_ablation.py::test_captioner_ablation_runs_every_captioner_and_collects_one_table"),
    (r"^python scripts/convert_odise_checkpoint\.py", "tests/test_convert.py::test_script_end_to_end"),
    (r"^python scripts/prepare_ade20k\.py", "tests/test_prepare.py::test_ade20k_panoptic_and_semantic"),
    (r"^python scripts/prepare_ade20k_full\.py", "tests/test_prepare.py::test_ade20k_full_847"),
    (r"^python scripts/prepare_pascal_voc\.py", "tests/test_prepare.py::test_pascal_voc"),
    (r"^python scripts/prepare_pascal_context\.py", "tests/test_prepare.py::test_pascal_context_459_and_59"),
    (r"^python scripts/prepare_\*\.py", "tests/test_prepare.py::test_scripts_have_help"),
    (r"^python demo/", OFFICIAL),
    (r"^ODISE_TEST_DEVICE=cpu pytest -m gpu", CI),
    (r"^ODISE_APP_CHECKPOINT=", "tests/test_app.py::test_the_page_in_a_headless_browser"),
]  # fmt: skip


def readme_commands() -> list[str]:
    """The commands of the README's shell blocks and inline code (continuation lines joined,
    comments dropped)."""
    text = (ROOT / "README.md").read_text()
    found: list[str] = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if re.match(r"(python|make|pytest|bash|ODISE_\w+=)\b", line):
                found.append(line)
    for code in re.findall(r"`([^`\n]+)`", text):
        if re.match(r"(python -m |python scripts/|python demo/|make |pytest |bash |ODISE_\w+=\S+ )", code):
            found.append(code.strip())
        elif re.fullmatch(r"make [\w-]+", code):
            found.append(code)
    return list(dict.fromkeys(found))


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    file = ROOT / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def test_every_readme_command_is_run_by_a_named_test():
    commands = readme_commands()
    assert len(commands) > 30  # the extraction still finds the README's commands
    unmatched, missing = [], []
    for cmd in commands:
        rule = next((r for r in RULES if re.search(r[0], cmd)), None)
        if rule is None:
            unmatched.append(cmd)
        elif "::" in rule[1] and not _test_exists(rule[1]):
            missing.append(f"{cmd} -> {rule[1]}")
    assert not unmatched, f"README commands no rule names a test for: {unmatched}"
    assert not missing, f"named tests that do not exist: {missing}"
    unused = [p for p, _ in RULES if not any(re.search(p, c) for c in commands)]
    assert not unused, f"rules for commands the README no longer shows: {unused}"


def _run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return res


def test_make_help_lists_the_targets():
    out = _run(["make", "--no-print-directory"]).stdout
    for target in ("setup", "train", "test", "test-slow", "smoke-full", "bench", "app", "lint", "device-kit"):
        assert re.search(rf"^\s*\S*{target}\S*\s", out, re.M), (target, out)


def test_make_bench_prints_its_ratios(tmp_path):
    """`make bench` end to end, each benchmark in its seconds-long mode (`BENCH_ARGS=--tiny`): the
    five benchmarks run and each prints its `ours X, baseline Y, ratio Z` line."""
    out = tmp_path / "bench.txt"
    _run(["make", "--no-print-directory", "bench", "BENCH_ARGS=--tiny", f"BENCH_OUT={out}"], timeout=900)
    text = out.read_text()
    for name in ("pq_eval", "decoder+matcher+criterion", "data loading", "inference 128^2", "predict tiny"):
        assert re.search(
            rf"{re.escape(name)}.*: ours [\d.]+ ?\S*, baseline [\d.]+ ?\S*, ratio [\d.]+", text
        ), (
            name,
            text[-3000:],
        )


@pytest.mark.slow
def test_bench_compile_smoke():
    res = _run([sys.executable, "benchmarks/bench_compile.py", "--tiny"], timeout=900)
    assert re.search(r"torch.compile UNet .*: ours [\d.]+ s, baseline [\d.]+ s, ratio", res.stdout)


def test_validate_before_training(tmp_path, caplog):
    import logging

    from odise_pl.train import train

    from test_train import cfg_for

    caplog.set_level(logging.INFO, logger="odise_pl")
    train(cfg_for(tmp_path, "validate_before_training=true", "trainer.max_steps=1"))
    assert "before training: PQ" in caplog.text and "after training:  PQ" in caplog.text


@pytest.mark.slow
def test_make_train_runs_the_default_experiment(tmp_path):
    """`make train`: the Makefile target, shortened to a few steps."""
    args = " ".join([*FAST, f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"])
    res = _run(["make", "--no-print-directory", "train", f"ARGS={args}"], timeout=900)
    assert "after training:" in res.stdout + res.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_timestep_ablation_sweeps_every_point(tmp_path):
    cmd = [sys.executable, "-m", "odise_pl.train", "-m", "ablation=timestep", "experiment=tiny", *FAST]
    _run([*cmd, f"paths.root_dir={tmp_path}"], timeout=900)
    sweep = next((tmp_path / "multirun" / "train").iterdir())
    assert len([p for p in sweep.iterdir() if (p / "metrics.json").is_file()]) == 5


@pytest.mark.slow
def test_ensemble_ablation_evaluates_every_point(tmp_path):
    from odise_pl.train import train

    from test_train import cfg_for

    train(cfg_for(tmp_path, "trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1"))
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "odise_pl.eval", "-m", "ablation=ensemble", f"ckpt_path={ckpt}"]
    _run([*cmd, "max_images=1", "loader.num_workers=0", f"paths.root_dir={tmp_path}"], timeout=900)
    sweep = next((tmp_path / "multirun" / "eval").iterdir())
    assert len([p for p in sweep.iterdir() if (p / "results.json").is_file()]) == 6
