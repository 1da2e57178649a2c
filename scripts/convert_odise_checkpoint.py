#!/usr/bin/env python
"""Convert an official ODISE checkpoint (NVlabs/ODISE releases, detectron2 .pth) into our
trainable-only checkpoint (.safetensors), then evaluate it with our code:

    python scripts/convert_odise_checkpoint.py odise_label_coco_50e-b67d2efc.pth odise_label.safetensors
    python -m odise_pl.eval ckpt_path=odise_label.safetensors datasets=[ade150,coco]

A caption model (``odise_caption_coco_50e-853cc971.pth``) converts the same way (recognised by its
objectness head). The output carries its model config (``odise_pl/checkpoints/description.py``): evaluation,
the demo and the notebooks rebuild the right model from the file, with no ``experiment=``.

Every trainable tensor of ours is taken from the file (a file lacking any is an error listing them);
the file's frozen Stable Diffusion / CLIP weights are skipped (ours load from ``weights.*``) and its
``criterion.empty_weight`` buffer is derived from our config. Our model is built with
``weights.mode=meta`` only to read its names and shapes: nothing is downloaded or allocated.
See odise_pl/checkpoints/official.py for the mapping.
"""

import argparse
import sys
from pathlib import Path

from safetensors.torch import save

from odise_pl.checkpoints.description import describe, safetensors_metadata
from odise_pl.checkpoints.official import (
    convert_state_dict,
    is_caption_checkpoint,
    read_their_checkpoint,
    their_feature_order,
)
from odise_pl.data.vocab import dataset_vocab
from odise_pl.errors import CheckpointError, OutputError
from odise_pl.fs import atomic_write, check_writable_file


def build_net(experiment: str, overrides: list[str], weights_mode: str = "meta"):
    import hydra
    from hydra import compose, initialize_config_dir

    from odise_pl.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
        shapes_only = compose(
            "train", overrides=[f"experiment={experiment}", f"weights.mode={weights_mode}", *overrides]
        )
    # cfg (real weights) is what the output describes; shapes_only builds the model to read names / shapes.
    return hydra.utils.instantiate(shapes_only.model).net, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="their .pth (detectron2 checkpoint)")
    p.add_argument("output", help="our .safetensors")
    p.add_argument(
        "--experiment",
        default=None,
        help="our experiment with the same architecture (default: caption_1024 for a caption model, "
        "recognised by its objectness head, else label_1024)",
    )
    p.add_argument("--override", action="append", default=[], help="extra Hydra override")
    p.add_argument("--weights-mode", default="meta", help="how our model is built to read its shapes")
    a = p.parse_args(argv)
    try:
        check_writable_file(a.output)  # before minutes of reading a multi-GB file, not after
        theirs = read_their_checkpoint(a.checkpoint)
        experiment = a.experiment or ("caption_1024" if is_caption_checkpoint(theirs) else "label_1024")
        print(f"our architecture: experiment={experiment}")
        net, cfg = build_net(experiment, a.override, a.weights_mode)
        bb = cfg.model.net.backbone
        order = their_feature_order(
            list(bb.unet_block_indices),
            list(bb.vae_encoder_block_indices),
            list(bb.vae_decoder_block_indices),
            len(bb.timesteps),
        )
        converted, report = convert_state_dict(theirs, net.trainable_state_dict(), order)
    except (CheckpointError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"mapped {len(converted)} tensors ({sum(v.numel() for v in converted.values()) / 1e6:.2f}M values): "
        "every trainable tensor of the model"
    )
    print(f"skipped {len(report['skipped_frozen'])} frozen tensors (ours load from weights.*)")
    for key in report["derived"]:
        print(f"not needed: {key}")
    for key in report["unmapped"]:
        print(f"WARNING not a tensor of a released ODISE model, ignored: {key}")
    # Self-describing: `python -m odise_pl.eval ckpt_path=OUT` rebuilds this model with no experiment=.
    desc = describe(cfg, experiment)
    if cfg.model.train_vocabulary != "dataset":
        desc["vocabulary"] = dataset_vocab(cfg.model.train_vocabulary).names
    meta = {"source": str(a.checkpoint), **safetensors_metadata(desc)}
    state = {k: v.contiguous() for k, v in converted.items()}
    atomic_write(Path(a.output), lambda f: f.write(save(state, metadata=meta)))
    print(f"wrote {a.output}")
    return 1 if report["unmapped"] else 0


if __name__ == "__main__":
    sys.exit(main())
