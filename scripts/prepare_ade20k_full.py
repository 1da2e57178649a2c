#!/usr/bin/env python
"""ADE20K-full (ADE20K_2021_17_01, 847 classes) -> `datasets=[ade847]`.

Download ADE20K_2021_17_01.zip from https://groups.csail.mit.edu/vision/datasets/ADE20K/ (needs a
free account), unzip it so that ROOT holds index_ade20k.pkl and images/ADE/{training,validation}/,
then:

    python scripts/prepare_ade20k_full.py --root data/ADE20K_2021_17_01 [--splits validation training]

Writes ROOT/images_detectron2/{split}/*.jpg and ROOT/annotations_detectron2/{split}/*.tif (train ids
0..846, 65535 = other; shorter side 512 as in Mask2Former / ODISE). The index is read with a
restricted unpickler (containers and numpy arrays only).
"""

import argparse
import sys

from odise_pl.data.prepare import prepare_ade20k_full
from odise_pl.errors import OdiseError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the ADE20K_2021_17_01 folder")
    p.add_argument("--splits", nargs="+", default=["validation"], choices=["validation", "training"])
    p.add_argument("--max-size", type=int, default=512, help="shorter side above this is resized to it")
    a = p.parse_args()
    try:
        for path in prepare_ade20k_full(a.root, tuple(a.splits), a.max_size):
            print(f"wrote {path}")
    except OdiseError as err:
        sys.exit(f"error: {err}")
