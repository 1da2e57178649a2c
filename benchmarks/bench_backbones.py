"""The diffusion backbones side by side (README "Diffusion backbones"): full-size architectures with
random weights (``weights.mode=random``), one image through the whole ODISE network at inference
(backbone, pyramid, mask generator; label-model settings, fp32, eager), at 512^2 and 1024^2.

Per backbone: parameters (frozen / trained), FLOPs per image (``torch.utils.flop_counter``: the
matrix products and convolutions, one multiply-add = 2 FLOPs), inference time (by default the
counted pass itself: a full-size pass takes minutes on a CPU, so first-call costs are noise;
``--repeats N``: one counted warm-up, then the best of N) and peak memory (the process's max RSS, weights included). Each
backbone runs in its own process, so its peak memory is its own. The baseline is SD v1.3, the
official backbone, measured in the same run: every other row prints its time ratio to it.

The image goes through each backbone as ODISE runs it: sliding windows of the model's native
resolution (SD v1 512, SD 2.1 768, SDXL 1024; a smaller image is one window of its short side)
resized to that resolution.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BACKBONES = {
    "sd13": "diffusion",
    "sd21": "sd2",
    "sdxl": "sdxl",
}  # row -> backbone= option (v1.5: = v1.3's shapes)


def build(backbone: str, tiny: bool):
    import hydra
    from hydra import compose, initialize_config_dir

    from odise_pl.config import CONFIG_DIR

    overrides = (
        [f"backbone={backbone}", "experiment=tiny", "weights.mode=tiny"]
        if tiny
        else [
            f"backbone={backbone}",
            "experiment=label_512",
            "weights.mode=random",
        ]
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # label_512 leaves model.net.backbone_size to the backbone: its native resolution
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    module.eval()
    return module


def run_one(row: str, sizes: list[int], repeats: int, out: Path, tiny: bool) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from odise_pl.model.odise import to_unit

    module = build(BACKBONES[row], tiny)
    net = module.net
    frozen_prefixes = net.frozen_prefixes()
    params = dict(net.named_parameters())
    frozen = sum(p.numel() for k, p in params.items() if k.startswith(frozen_prefixes))
    result = {"frozen": frozen, "trained": sum(p.numel() for p in params.values()) - frozen, "sizes": {}}
    net.requires_grad_(False)  # inference only (and the FLOP counter's module tracker wants no grad hooks)
    result["window"] = int(net.backbone_size)
    for size in sizes:
        image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
        with torch.no_grad():
            if repeats == 0:  # one pass, counted and timed (the counter's own cost is negligible here)
                counter = FlopCounterMode(display=False)
                t = time.perf_counter()
                with counter:
                    net(to_unit(image))
                times = [time.perf_counter() - t]
            else:
                counter = FlopCounterMode(display=False)
                with counter:  # also the warm-up
                    net(to_unit(image))
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    net(to_unit(image))
                    times.append(time.perf_counter() - t)
        result["sizes"][size] = {"flops": counter.get_total_flops(), "time": min(times)}
    result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    (out / f"{row}.json").write_text(json.dumps(result))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--rows", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed runs after the counted warm-up (0: the counted pass is the timed one; a full-size pass takes minutes)",
    )
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run: the tiny models at 128^2")
    p.add_argument("--one", nargs=2, metavar=("ROW", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sizes = [128] if a.tiny and a.sizes == [512, 1024] else a.sizes
    if a.one:
        run_one(a.one[0], sizes, a.repeats, Path(a.one[1]), a.tiny)
        return {}
    rows = ["sd13", *[r for r in a.rows if r != "sd13"]]  # the baseline first
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                row,
                tmp,
                "--repeats",
                str(a.repeats),
                "--sizes",
                *map(str, sizes),
            ]
            subprocess.run([*cmd, *(["--tiny"] if a.tiny else [])], check=True)
            results[row] = json.loads((Path(tmp) / f"{row}.json").read_text())
    kind = "tiny" if a.tiny else "full-size, random weights"
    print(
        f"\n| backbone ({kind}) | window | frozen params | trained params | "
        + " | ".join(f"{'GFLOPs' if a.tiny else 'TFLOPs'} {s}^2 | time {s}^2 (s)" for s in sizes)
        + " | peak memory (GB) |"
    )
    print("| --- " * (5 + 2 * len(sizes)) + "|")
    for row, r in results.items():
        cells = [str(r["window"]), f"{r['frozen'] / 1e6:.1f}M", f"{r['trained'] / 1e6:.1f}M"]
        for s in sizes:
            m = r["sizes"][str(s)]
            flops = m["flops"] / (1e9 if a.tiny else 1e12)
            cells += [f"{flops:.3g}", f"{m['time']:.2f}"]
        print(f"| {row} | " + " | ".join(cells) + f" | {r['peak_gb']:.1f} |")
    base = results["sd13"]["sizes"]
    for row, r in results.items():
        if row == "sd13":
            continue
        for s in sizes:
            ours, ref = r["sizes"][str(s)]["time"], base[str(s)]["time"]
            print(
                f"{kind} {row} vs sd13 at {s}^2: ours {ours:.2f} s, baseline {ref:.2f} s, ratio {ours / ref:.2f}"
            )
    return results


if __name__ == "__main__":
    main()
