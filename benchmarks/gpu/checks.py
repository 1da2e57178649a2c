"""The device lease's checks and measurements, in one process-light script (benchmarks/gpu/run.sh).

Sections, each under its own time budget so the whole fits the lease (run.sh kills it at 480 s);
``OUT/results.json`` is rewritten after every section, so a run cut short still reports what it did:

1. ``device``: GPU name, driver, torch / CUDA versions.
2. ``matmul``: the device's dense bf16 matrix rate (TFLOP/s), the yardstick for utilisation.
3. ``tests``: ``pytest -m gpu tests/test_gpu.py`` on the device.
4. ``inference``: full-size ODISE (random weights) at 512^2 and 1024^2, COCO vocabulary, full
   ensemble with MaskCLIP: eager fp32 (one window at a time, fp32 weights) vs optimised (bf16
   frozen weights + bf16 autocast, channels-last, all windows in one backbone pass); images/s,
   peak GB, FLOPs per image and the share of the matrix rate, the optimised outputs' difference
   from the eager ones. Against the goal: >= 15 images/s and <= 8 GB at 1024^2.
5. ``training``: one full-size training configuration (label_1024: LSJ 1024, slide training,
   batch 8 on one device, bf16-mixed, bf16 frozen weights, UNet + pyramid checkpointing): step
   time, images/s, peak GB (goal <= 40 GB).

``--tiny`` swaps the full-size models for the tiny experiment at 128^2 / 256^2 (the CPU rehearsal,
``--device cpu --tiny``, in tests/test_device_kit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GOAL = {"images_per_s_1024": 15.0, "peak_gb_1024": 8.0, "train_peak_gb": 40.0}


class Report:
    """results.json, rewritten after each section; sections that fail record their error."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.start, self.budget = out, time.monotonic(), budget_s
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def section(self, name: str, fn, *, needs_s: float = 0.0) -> None:
        if self.left() < needs_s:
            self.data[name] = {"skipped": f"{self.left():.0f} s left of the budget, needs ~{needs_s:.0f} s"}
            print(f"== {name}: skipped ({self.left():.0f} s left)", flush=True)
            self.save()
            return
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        t = time.monotonic()
        try:
            self.data[name] = fn()
        except Exception as e:  # keep going: the other sections' numbers are still worth having
            traceback.print_exc()
            self.data[name] = {"error": f"{type(e).__name__}: {e}"}
        self.data[name]["seconds"] = round(time.monotonic() - t, 1)
        print(json.dumps({name: self.data[name]}, indent=1, default=str), flush=True)
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors since :func:`reset_peak` (GPU); None on CPU (no such counter)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# -- 1, 2 -------------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({e})"
    else:
        info["name"] = platform.processor() or platform.machine()
    for pkg in ("diffusers", "open_clip", "lightning", "hydra", "torchvision"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - report, do not stop
            info[pkg] = f"missing ({type(e).__name__})"
    return info


def matmul_rate(device: torch.device, n: int) -> dict:
    """Dense bf16 (n x n) @ (n x n), best of a few timed runs: TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    reps = 20 if device.type == "cuda" else 2
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return {"n": n, "tflops_bf16": round(2 * n**3 / best / 1e12, 1)}


# -- 3 ----------------------------------------------------------------------------------------------
def run_tests(device: torch.device, tiny: bool, timeout: float, select: str | None = None) -> dict:
    env = {**os.environ, "ODISE_TEST_DEVICE": device.type, "ODISE_TEST_FULL": "0" if tiny else "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    if select:
        cmd += ["-k", select]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "tail": (e.stdout or "")[-2000:]}
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    summary = [
        line for line in proc.stdout.splitlines() if " in " in line and ("passed" in line or "failed" in line)
    ]
    return {"returncode": proc.returncode, "summary": summary[-1] if summary else proc.stdout[-300:]}


# -- 4 ----------------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from odise_pl.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def model_overrides(tiny: bool) -> list[str]:
    return ["experiment=tiny"] if tiny else ["experiment=label_1024", "weights.mode=random", "logger=none"]


def optimise(net, on: bool) -> None:
    """The optimised inference path's switches (each also a config key, README "Fast inference")."""
    dtype = "bf16" if on else "fp32"
    net.backbone.set_execution(dtype=dtype, channels_last=on)
    net.clip.set_image_dtype(dtype)
    net.windows_per_pass = None if on else 1


def count_flops(net, fn) -> float:
    """FLOPs of ``fn()`` (PyTorch's counter: matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    # The counter's module tracker hooks the backward of any input that requires grad, which a
    # parameter handed to a submodule under no_grad cannot give it: freeze for the count.
    trained = [p for p in net.parameters() if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for p in trained:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


def inference(
    device: torch.device,
    tiny: bool,
    sizes: list[int],
    rate: float | None,
    repeats: int,
    compile_if_left: Callable[[], bool] = lambda: False,
) -> dict:
    import hydra

    from odise_pl.data.vocab import dataset_vocab

    torch.manual_seed(0)
    module = hydra.utils.instantiate(compose(model_overrides(tiny)).model).eval().to(device)
    net = module.net
    # COCO's 133 categories and the full ensemble at tiny size too: the tiny CLIP is random, but
    # what is rehearsed is the work done
    v = dataset_vocab("coco")
    vocab, mode = (v.names, v.isthing), "ensemble"
    net.text_embeddings(vocab[0])
    net.text_embeddings(vocab[0], side="clip")
    results: dict = {"vocabulary_size": len(vocab[0]), "mode": mode}
    raw: dict = {}

    def measure(path: str, size: int) -> dict:
        """One configuration at one size: warm-up, timed runs, peak memory, FLOPs, raw outputs."""
        g = torch.Generator().manual_seed(size)
        images = torch.rand(1, 3, size, size, generator=g).to(device)
        meta = [{"input_size": (size, size), "height": size, "width": size}]
        predictor = module.make_predictor(mode=mode, precision="fp32" if path == "eager" else "bf16")
        forward, kept = net.forward, {}

        def keep(*a, **k):
            out = forward(*a, **k)
            kept.update(
                pred_masks=out["pred_masks"].float().cpu(), mask_embed=out["mask_embed"].float().cpu()
            )
            return out

        def once():
            return predictor(images, meta, *vocab, tasks=("panoptic",))

        net.forward = keep
        try:
            t = time.perf_counter()
            once()  # warm-up (cuDNN autotuning, caches; compilation)
            sync(device)
            first = time.perf_counter() - t
            reset_peak(device)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                res = once()
                sync(device)
                times.append(time.perf_counter() - t)
        finally:
            del net.forward
        entry = {
            "images_per_s": round(1 / min(times), 3),
            "seconds": [round(x, 4) for x in times],
            "first_call_s": round(first, 2),
            "peak_gb": peak_gb(device),
        }
        if path == "optimised":
            flops = count_flops(net, once)
            entry["tflop_per_image"] = float(f"{flops / 1e12:.4g}")
            if rate:
                entry["share_of_bf16_rate"] = float(f"{flops * entry['images_per_s'] / (rate * 1e12):.3g}")
        raw[path, size] = {**kept, "panoptic": res[0]["panoptic"][0].cpu()}
        return entry

    # every eager run first: casting the weights to bf16 and back would round the reference
    for path in ("eager", "optimised"):
        optimise(net, path == "optimised")
        for size in sizes:
            results.setdefault(f"{size}", {})[path] = measure(path, size)
    for size in sizes:
        row, e, o = results[f"{size}"], raw["eager", size], raw["optimised", size]
        row["difference"] = {
            k: round(float((o[k] - e[k]).norm() / e[k].norm().clamp(min=1e-12)), 4)
            for k in ("pred_masks", "mask_embed")
        }
        row["panoptic_agreement"] = round(float((o["panoptic"] > 0).eq(e["panoptic"] > 0).float().mean()), 4)
        row["speedup"] = round(row["optimised"]["images_per_s"] / row["eager"]["images_per_s"], 2)
    if compile_if_left():
        # torch.compile on top of the optimised path, at the largest size (the switch
        # model.net.backbone.compile); its first call is the compilation
        net.backbone.set_execution(compile=True)
        size = sizes[-1]
        entry = measure("optimised+compile", size)
        entry["speedup_over_optimised"] = round(
            entry["images_per_s"] / results[f"{size}"]["optimised"]["images_per_s"], 2
        )
        results[f"{size}"]["optimised+compile"] = entry
    if not tiny and "1024" in results:
        opt = results["1024"]["optimised"]
        results["goal_1024"] = {
            "images_per_s": f"{opt['images_per_s']} (goal >= {GOAL['images_per_s_1024']})",
            "peak_gb": f"{opt['peak_gb']} (goal <= {GOAL['peak_gb_1024']})",
            "met": bool(
                opt["images_per_s"] >= GOAL["images_per_s_1024"]
                and opt["peak_gb"] is not None
                and opt["peak_gb"] <= GOAL["peak_gb_1024"]
            ),
        }
    return results


# -- 5 ----------------------------------------------------------------------------------------------
def training(device: torch.device, tiny: bool, steps: int, batch_size: int = 8) -> dict:
    import lightning as L

    from odise_pl.train import build

    tmp = Path(tempfile.mkdtemp(prefix="odise-gpu-train-"))
    accel = "gpu" if device.type == "cuda" else "cpu"
    size = (
        ["data.batch_size=2"]
        if tiny
        else [
            "experiment=label_1024",
            "weights.mode=random",
            f"data.batch_size={batch_size}",
            "model.train_vocabulary=dataset",
        ]
    )
    overrides = [
        *size,
        f"paths.root_dir={tmp}",
        f"paths.output_dir={tmp}/out",
        "logger=none",
        f"trainer.accelerator={accel}",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=100000",
        "trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint",
        "callbacks.progress.refresh_rate=0",
        "data.global_batch_size=null",
        f"data.num_workers={min(8, os.cpu_count() or 1)}",
        f"data.synthetic={{root: {tmp}/syn, num_train: 16, num_val: 1, seed: 0}}",
        f"data.train_dataset.root={tmp}/syn",
        "model.net.backbone.dtype=bf16",
        "model.net.clip.dtype=bf16",
        "model.net.backbone.channels_last=true",
        "model.net.backbone.gradient_checkpointing=true",
    ]
    datamodule, module, trainer = build(compose(overrides))
    times: list[float] = []
    losses: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            sync(device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, *a):
            sync(device)
            times.append(time.perf_counter() - self.t)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(round(float(loss), 3))
            if len(times) == 1:
                reset_peak(device)  # steady state: the first step holds one-off allocations

    trainer.callbacks.append(Timer())
    trainer.fit(module, datamodule=datamodule)
    batch = datamodule.batch_size if hasattr(datamodule, "batch_size") else None
    steady = times[1:] or times
    step = sorted(steady)[len(steady) // 2]
    out = {
        "config": "tiny" if tiny else f"label_1024, LSJ 1024, batch {batch_size}, slide training",
        "precision": "bf16-mixed; frozen weights bf16; UNet + pyramid gradient checkpointing; channels-last",
        "batch": batch,
        "step_seconds": [round(x, 3) for x in times],
        "median_step_s": round(step, 3),
        "images_per_s": round(batch / step, 2) if batch else None,
        "peak_gb": peak_gb(device),
        "losses": losses,
    }
    if not tiny and out["peak_gb"] is not None:
        out["goal"] = f"peak {out['peak_gb']} GB (goal <= {GOAL['train_peak_gb']})"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda", help="cuda (the GPU machine) | cpu (the rehearsal)")
    p.add_argument("--tiny", action="store_true", help="tiny models at 128^2 / 256^2 (rehearsal)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 480)) - 15)
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "inference", "training"])
    p.add_argument("--repeats", type=int, default=None, help="timed inference runs per configuration")
    p.add_argument("--tests-select", default=None, help="pytest -k expression for the tests section")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="also time torch.compile at the largest size (auto: on CUDA, when >= 200 s are left)",
    )
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (use --device cpu for the rehearsal)")
        return 2
    os.chdir(ROOT)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on the eager side
    report = Report(a.out, a.budget)
    report.data["args"] = {"device": a.device, "tiny": a.tiny, "budget_s": a.budget}
    report.section("device", lambda: device_info(device))
    report.section("matmul", lambda: matmul_rate(device, 8192 if device.type == "cuda" else 1024))
    rate = report.data["matmul"].get("tflops_bf16")
    if "tests" not in a.skip:
        report.section(
            "tests", lambda: run_tests(device, a.tiny, timeout=min(180, report.left() - 200)), needs_s=60
        )
    if "inference" not in a.skip:
        sizes = [128, 256] if a.tiny else [512, 1024]
        repeats = a.repeats or (5 if device.type == "cuda" else 2)
        want_compile = a.compile == "on" or (a.compile == "auto" and device.type == "cuda")

        def compile_if_left() -> bool:
            # after training's share: compiling the UNet takes one to two minutes
            return want_compile and report.left() > (200 if "training" not in a.skip else 120)

        report.section(
            "inference", lambda: inference(device, a.tiny, sizes, rate, repeats, compile_if_left), needs_s=60
        )
    if "training" not in a.skip:
        steps = 6 if device.type == "cuda" else 3
        report.section("training", lambda: training(device, a.tiny, steps), needs_s=60)
        if "OutOfMemory" in str(report.data["training"].get("error", "")):
            # the goal's configuration did not fit: how far from it (batch 4)
            torch.cuda.empty_cache()
            report.section(
                "training_batch4", lambda: training(device, a.tiny, steps, batch_size=4), needs_s=60
            )
    failed = [
        k for k, v in report.data.items() if isinstance(v, dict) and ("error" in v or v.get("returncode"))
    ]
    report.data["failed_sections"] = failed
    report.save()
    print(f"results: {a.out / 'results.json'}; failed sections: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
