#!/usr/bin/env python
"""Your annotations -> the COCO panoptic layout our training and evaluation read (conf/data/custom.yaml).

COCO *instance* JSON, as CVAT, Label Studio, labelme2coco and most annotation tools export it
(polygons or RLE), plus optionally semantic label PNGs for stuff:

    python scripts/convert_coco_instances.py --instances export/train.json --images export/images \\
        --out data/custom --split train [--semantic export/stuff_png --stuff-ids 101 102] [--link]

Writes OUT/images/SPLIT/, OUT/annotations/panoptic_SPLIT.json and OUT/annotations/panoptic_SPLIT/.
Overlapping instances: the smallest wins each pixel; crowd regions stay crowd; stuff fills what no
instance claims (odise_pl/data/convert/instances.py states every rule).
"""

import argparse
import sys

from odise_pl.data.convert import convert_instances
from odise_pl.errors import OdiseError, say_error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", required=True, help="the COCO instance JSON")
    p.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    p.add_argument("--out", required=True, help="dataset root to write (paths.custom)")
    p.add_argument("--split", default="train", help="train, val, ... (default train)")
    p.add_argument(
        "--semantic", help="folder of stuff label PNGs (pixel = stuff category id; 0/255 unlabelled)"
    )
    p.add_argument("--stuff-ids", type=int, nargs="*", default=[], help="category ids that are stuff")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    a = p.parse_args(argv)
    try:
        path = convert_instances(
            a.instances, a.images, a.out, a.split, a.semantic, tuple(a.stuff_ids), link=a.link
        )
    except OdiseError as err:
        say_error(str(err))
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
