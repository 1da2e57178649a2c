"""Data loading throughput (images/s through the real reader, LSJ and collation) against the rate
at which training consumes images, on this machine.

Data: the synthetic COCO-format set upscaled to COCO's image sizes (512-768 px; JPEG images, PNG
panoptic maps). Loader: the training DataLoader of ``experiment=tiny`` (LSJ 128) and of the paper's
``label_1024`` (LSJ 1024), with 0 and ``--workers`` worker processes. Consumer: the tiny
experiment's training step (forward + backward + optimiser) on this CPU. Prints
``name: ours X, baseline Y, ratio Z`` with ours = loader images/s and baseline = images/s the
training step consumes: a ratio above 1 means loading keeps up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from odise_pl.data.io import ids_to_rgb, read_ids
from odise_pl.data.synthetic import write_dataset


def make_data(root: Path, n: int, scale: int) -> None:
    write_dataset(root, num_train=n, num_val=2, seed=0)
    ann = json.load(open(root / "annotations" / "panoptic_train2017.json"))
    for a in ann["annotations"]:
        img = root / "train2017" / a["file_name"].replace(".png", ".jpg")
        im = Image.open(img)
        im.resize((im.width * scale, im.height * scale), Image.BILINEAR).save(img, quality=90)
        png = root / "annotations" / "panoptic_train2017" / a["file_name"]
        ids = read_ids(png).astype(np.int64).repeat(scale, 0).repeat(scale, 1)
        Image.fromarray(ids_to_rgb(ids)).save(png)
    for im in ann["images"]:
        im["height"], im["width"] = im["height"] * scale, im["width"] * scale
    json.dump(ann, open(root / "annotations" / "panoptic_train2017.json", "w"))


def compose(root: Path, experiment: str, *extra: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from odise_pl.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                "weights.mode=tiny",
                "data.synthetic=null",
                f"data.train_dataset.root={root}",
                f"paths.output_dir={root}/out",
                "logger=none",
                *extra,
            ],
        )


def loader_rate(root: Path, experiment: str, workers: int, batches: int) -> float:
    import hydra

    cfg = compose(
        root, experiment, f"data.num_workers={workers}", "data.batch_size=8", "data.global_batch_size=null"
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["images"].shape[0]
    return n / (time.perf_counter() - t)


def consume_rate(root: Path, steps: int) -> float:
    """Images/s the tiny experiment's training step consumes (data already in memory)."""
    import hydra
    import torch

    cfg = compose(root, "tiny", "data.num_workers=0")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    module = hydra.utils.instantiate(cfg.model)
    module.set_vocabulary(dm.vocabulary, dm.isthing)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else (opt[0][0] if isinstance(opt, tuple) else opt)
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(steps + 1)]
    module.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        sum(module.compute_losses(batch).values()).backward()
        opt.step()

    step(batches[0])
    t = time.perf_counter()
    n = 0
    for b in batches[1:]:
        step(b)
        n += b["images"].shape[0]
    torch.set_grad_enabled(True)
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="seconds-long smoke run (what the test suite runs): small sizes, one repeat",
    )
    a = p.parse_args(argv)
    if a.tiny:
        a.images, a.scale, a.workers, a.batches = 4, 1, 0, 2
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_data(root, a.images, a.scale)
        consumed = consume_rate(root, steps=2 if a.tiny else 4)
        print(f"tiny training step consumes {consumed:.1f} images/s on this CPU", flush=True)
        for experiment, lsj in (("tiny", 128), ("label_1024", 1024)):
            for workers in sorted({0, a.workers}):
                rate = loader_rate(root, experiment, workers, a.batches)
                name = f"data loading (LSJ {lsj}, {workers} workers) vs tiny training step"
                print(
                    f"{name}: ours {rate:.1f} images/s, baseline {consumed:.1f} images/s, ratio {rate / consumed:.2f}"
                )
                out[(lsj, workers)] = rate
    return out


if __name__ == "__main__":
    main()
