#!/usr/bin/env python
"""A semantic-segmentation folder (images + label PNGs + a class list) -> COCO panoptic, stuff only:

    python scripts/convert_semantic_folder.py --images imgs/ --labels labels/ --classes classes.txt \\
        --out data/custom --split train [--ignore 255] [--link]

classes.txt: ``id:name,synonym`` lines (id = pixel value), or one ``name,synonym`` per line (pixel
value = line index). One stuff segment per class present in each image; odise_pl/data/convert/semantic.py.
"""

import argparse
import sys

from odise_pl.data.convert import convert_semantic
from odise_pl.errors import OdiseError, say_error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--labels", required=True, help="label PNGs named as the images")
    p.add_argument("--classes", required=True, help="class list (see above)")
    p.add_argument("--out", required=True, help="dataset root to write (paths.custom)")
    p.add_argument("--split", default="train")
    p.add_argument("--ignore", type=int, default=255, help="the label value of unlabelled pixels")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    a = p.parse_args(argv)
    try:
        path = convert_semantic(a.images, a.labels, a.classes, a.out, a.split, a.ignore, link=a.link)
    except OdiseError as err:
        say_error(str(err))
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
