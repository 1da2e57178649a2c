#!/usr/bin/env python
"""Pascal VOC 2012 -> 21-class semantic labels for `datasets=[voc21]`.

    python scripts/prepare_pascal_voc.py --voc2012 data/VOCdevkit/VOC2012 --out data/pascal_voc_d2

Reads JPEGImages/, SegmentationClass/ (palette PNGs: 0 background .. 20, 255 border) and
ImageSets/Segmentation/val.txt; writes OUT/images/validation and OUT/annotations_pascal21/validation.
"""

import argparse
import sys

from odise_pl.data.prepare import prepare_pascal_voc
from odise_pl.errors import OdiseError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc2012", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val")
    a = p.parse_args()
    try:
        print(f"wrote {prepare_pascal_voc(a.voc2012, a.out, a.split)}")
    except OdiseError as err:
        sys.exit(f"error: {err}")
