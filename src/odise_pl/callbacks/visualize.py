"""Log sample panoptic predictions at each validation: W&B / TensorBoard images, PNG files otherwise."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from odise_pl.visualize import overlay


class PanopticVisualizer(L.Callback):
    """Renders the first ``num_images`` validation images with their predicted segments.

    Args:
        num_images: images per validation.
        out_dir: where PNGs go (always written; also sent to W&B / TensorBoard when those log).
    """

    def __init__(self, num_images: int = 4, out_dir: str | None = None):
        self.num_images, self.out_dir = num_images, out_dir

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.is_global_zero or not outputs or batch_idx >= self.num_images:
            return
        names = [v[0] for v in module.vocabulary]
        for k, pred in enumerate(outputs.get("preds", [])[:1]):
            meta = batch["meta"][k]
            h, w = meta["input_size"]
            image = batch["images"][k, :, :h, :w].permute(1, 2, 0).cpu().numpy().astype(np.uint8)
            image = np.asarray(Image.fromarray(image).resize((meta["width"], meta["height"]), Image.BILINEAR))
            ids, segs = pred["panoptic"]
            picture = overlay(image, ids.cpu().numpy(), segs, names)
            tag = f"val/panoptic_{batch_idx}"
            self._write(trainer, picture, tag, meta)

    def _write(self, trainer, picture: Image.Image, tag: str, meta: dict) -> None:
        out = Path(self.out_dir or trainer.default_root_dir) / "visualizations"
        out.mkdir(parents=True, exist_ok=True)
        picture.save(out / f"step{trainer.global_step:06d}_{Path(str(meta['file_name'])).stem}.png")
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                logger.log_image(key=tag, images=[picture], step=trainer.global_step)
            elif name == "TensorBoardLogger":
                logger.experiment.add_image(tag, np.asarray(picture), trainer.global_step, dataformats="HWC")
