"""Segmenting a folder: ``odise_pl.predict`` (Lightning's predict loop, data-loader workers, files
written as each image is done) against a plain loop over the demo's function
(:func:`odise_pl.inference.segment.segment_image` + ``write_outputs``, one image at a time), on the
same images and model, measured side by side in one run.

Prints ``name: ours X images/s, baseline Y images/s, ratio Z`` (ratio = ours / baseline images/s;
above 1 is faster). ``--size full`` uses the official architecture with random weights (minutes);
``--size tiny`` (default with ``--tiny``) the tiny experiment.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int, side: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = side, side * 4 // 3
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90
        )


def overrides_for(size: str) -> list[str]:
    if size == "tiny":
        return ["experiment=tiny", "weights.mode=tiny"]
    return ["experiment=label_512", "weights.mode=random", "model.predictor.mode=diffusion"]


def baseline(images: list[Path], out: Path, size: str) -> float:
    from odise_pl.data.io import load_image
    from odise_pl.data.vocab import dataset_vocab
    from odise_pl.inference.segment import load_model, segment_image, write_outputs

    module, cfg = load_model(overrides=overrides_for(size))
    vocab = dataset_vocab("coco")
    short = cfg.data.val_transform.short_edge
    segment_image(module, load_image(images[0]), vocab, short_edge=short)  # warm-up (text embeddings)
    t = time.perf_counter()
    for p in images:
        image = load_image(p)
        ids, segments = segment_image(module, image, vocab, short_edge=short)
        write_outputs(out, p.stem, image, ids, segments, vocab)
    return len(images) / (time.perf_counter() - t)


def ours(images_dir: Path, n: int, out: Path, size: str, workers: int) -> float:
    from hydra import compose, initialize_config_dir

    from odise_pl.config import CONFIG_DIR
    from odise_pl.predict import predict

    common = [
        f"input={images_dir}",
        "dataset_vocab=coco",
        f"loader.num_workers={workers}",
        "write.overlay=true",
    ]
    common += [f"paths.root_dir={out}", f"paths.output_dir={out}/run", *overrides_for(size)]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        warm = compose("predict", overrides=[*common, f"output={out}/warm", f"input={images_dir}/0000.jpg"])
        cfg = compose("predict", overrides=[*common, f"output={out}/ours"])
    predict(warm)  # the same warm-up as the baseline's: first-call paths
    return n / predict(cfg)["seconds"]  # the predict loop's time: loading, inference, writing


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--side", type=int, default=480, help="image height (width 4/3 of it)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run: tiny model, 4 small images")
    a = p.parse_args(argv)
    if a.tiny:
        a.size, a.images, a.side = "tiny", 4, 96
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        make_images(tmp / "images", a.images, a.side)
        images = sorted((tmp / "images").glob("*.jpg"))
        (tmp / "base").mkdir()
        rate_base = baseline(images, tmp / "base", a.size)
        rate_ours = ours(tmp / "images", a.images, tmp, a.size, a.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = f"predict {a.size} ({a.images} images {a.side * 4 // 3}x{a.side}, {a.workers} workers, CPU)"
    print(
        f"{name}: ours {rate_ours:.3f} images/s, baseline {rate_base:.3f} images/s, ratio {rate_ours / rate_base:.2f}",
        flush=True,
    )
    return {"ours": rate_ours, "baseline": rate_base}


if __name__ == "__main__":
    main()
