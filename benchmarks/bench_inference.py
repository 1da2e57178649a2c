"""Full-size inference (``random`` weights): images/s, peak memory and time per stage, eager fp32
vs our optimised path, at 512^2 and 1024^2.

Eager: fp32, every part run as written, one sliding window at a time. Optimised: the network under
bf16 autocast (``--precision``) with the frozen UNet / VAE / CLIP image tower stored in that dtype,
all sliding windows through the backbone together, channels-last convolutions in the UNet / VAE; the auxiliary mask sets are skipped at inference in both
(exact), and MaskCLIP (the CLIP opinion) is batched over the masks in both. The optimised outputs are compared
with the eager ones: relative difference of the mask logits and of the mask embeddings, and the
agreement of the panoptic segmentation.

Each configuration runs in its own process so that its peak memory (max RSS) is its own. Prints
``name: ours X, baseline Y, ratio Z`` (ratio = optimised / eager time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

STAGES = {  # stage -> module path inside the ODISE net (VAE: timed around backbone.encode, below)
    "UNet": ("backbone.unet",),
    "CLIP": ("clip.model.visual",),
    "pyramid": ("pyramid",),
    "decoder": ("pixel_decoder", "transformer_decoder"),
}


def build(experiment: str, overrides: tuple[str, ...] = ()):
    import hydra
    from hydra import compose, initialize_config_dir

    from odise_pl.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "weights.mode=random", *overrides])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model)
    module.eval()
    return module


def stage_timers(net) -> dict:
    totals: dict[str, float] = defaultdict(float)
    # The VAE decoder taps stop the decoder early by raising, so module hooks would miss its end:
    # time the backbone's whole encode step (VAE encoder + decoder up to the last tap) instead.
    encode = net.backbone.encode

    def timed_encode(images):
        t = time.perf_counter()
        try:
            return encode(images)
        finally:
            totals["VAE"] += time.perf_counter() - t

    net.backbone.encode = timed_encode
    for stage, paths in STAGES.items():
        for path in paths:
            mod = net.get_submodule(path)
            starts = []
            mod.register_forward_pre_hook(lambda m, a, starts=starts: starts.append(time.perf_counter()))
            mod.register_forward_hook(
                lambda m, a, o, starts=starts, stage=stage: totals.__setitem__(
                    stage, totals[stage] + time.perf_counter() - starts.pop()
                )
            )
    return totals


def run_one(size: int, path: str, precision: str, repeats: int, out: Path, tiny: bool = False) -> None:
    """One configuration (in its own process): times, stages, outputs saved for comparison."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    from odise_pl.data.vocab import dataset_vocab

    optimised = path == "optimised"
    # the switches of README "Fast inference and training on a GPU"; eager: one window at a time
    switches = (
        [
            "model.net.windows_per_pass=null",
            "model.net.backbone.channels_last=true",
            f"model.net.backbone.dtype={precision}",
            f"model.net.clip.dtype={precision}",
        ]
        if optimised
        else ["model.net.windows_per_pass=1"]
    )
    if tiny:  # the smoke run: the tiny experiment's models, same code path
        module = build("tiny", ("weights.mode=tiny", *switches))
    else:
        module = build("label_1024" if size > 512 else "label_512", tuple(switches))
    net = module.net
    predictor = module.make_predictor(mode="ensemble", precision=precision if optimised else "fp32")
    vocab = dataset_vocab("coco")
    names, isthing = vocab.names, vocab.isthing
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, size, size, generator=g)
    meta = [{"input_size": (size, size), "height": size, "width": size}]
    net.text_embeddings(names)  # cached per vocabulary, as in use
    net.text_embeddings(names, side="clip")
    totals = stage_timers(net)
    # Keep the raw outputs of the timed run for the comparison (no extra forward pass afterwards:
    # at 1024^2 one costs more than a minute here).
    raw: dict = {}
    forward = net.forward

    def keep_outputs(*args, **kwargs):
        out = forward(*args, **kwargs)
        raw.update(pred_masks=out["pred_masks"].detach(), mask_embed=out["mask_embed"].detach())
        return out

    net.forward = keep_outputs
    predictor(images, meta, names, isthing, tasks=("panoptic",))  # warm-up
    best, best_stages = float("inf"), {}
    for _ in range(repeats):
        totals.clear()
        t = time.perf_counter()
        res = predictor(images, meta, names, isthing, tasks=("panoptic",))
        dt = time.perf_counter() - t
        if dt < best:
            best, best_stages = dt, dict(totals)
    best_stages["post-processing + rest"] = best - sum(best_stages.values())
    torch.save(
        {
            "pred_masks": raw["pred_masks"].float(),
            "mask_embed": raw["mask_embed"].float(),
            "panoptic": res[0]["panoptic"][0],
        },
        out / f"{size}_{path}.pt",
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{size}_{path}.json").write_text(
        json.dumps({"time": best, "stages": best_stages, "peak_mb": peak_mb})
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--repeats", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--one", nargs=3, metavar=("SIZE", "PATH", "OUT"), help=argparse.SUPPRESS)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="seconds-long smoke run (what the test suite runs): the tiny experiment at 128^2",
    )
    a = p.parse_args(argv)
    if a.one:
        run_one(int(a.one[0]), a.one[1], a.precision, a.repeats, Path(a.one[2]), a.tiny)
        return {}
    if a.tiny:
        a.sizes = [128]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for size in a.sizes:
            for path in ("eager", "optimised"):
                cmd = [sys.executable, __file__, "--one", str(size), path, tmp, "--precision", a.precision]
                subprocess.run(
                    [*cmd, "--repeats", str(a.repeats), *(["--tiny"] if a.tiny else [])], check=True
                )
            r = {
                path: json.loads((out / f"{size}_{path}.json").read_text()) for path in ("eager", "optimised")
            }
            e, o = (torch.load(out / f"{size}_{p}.pt", weights_only=True) for p in ("eager", "optimised"))
            rel = {
                k: float((o[k] - e[k]).norm() / e[k].norm().clamp(min=1e-12))
                for k in ("pred_masks", "mask_embed")
            }
            agree = float((o["panoptic"] > 0).eq(e["panoptic"] > 0).float().mean())
            te, to = r["eager"]["time"], r["optimised"]["time"]
            print(
                f"\n== {size}^2, 1 image, CPU ({torch.get_num_threads()} threads), optimised = {a.precision} =="
            )
            print(f"{'stage':<24}{'eager s':>10}{'optimised s':>13}")
            for stage in r["eager"]["stages"]:
                print(
                    f"{stage:<24}{r['eager']['stages'][stage]:>10.2f}{r['optimised']['stages'].get(stage, 0):>13.2f}"
                )
            print(
                f"peak memory (max RSS): eager {r['eager']['peak_mb']:.0f} MB, optimised {r['optimised']['peak_mb']:.0f} MB"
            )
            print(
                f"difference vs eager: mask logits {rel['pred_masks']:.2%}, mask embeddings {rel['mask_embed']:.2%} "
                f"(relative L2); segmented / void pixels agree on {agree:.2%}"
            )
            print(
                f"{'tiny' if a.tiny else 'full-size'} inference {size}^2: ours {1 / to:.3f} images/s, baseline {1 / te:.3f} images/s, "
                f"ratio {to / te:.2f} (time; {te / to:.2f}x faster)",
                flush=True,
            )
            results[size] = {**r, "difference": rel, "panoptic_agreement": agree}
    return results


if __name__ == "__main__":
    main()
