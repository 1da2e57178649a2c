#!/usr/bin/env python
"""Pascal Context (VOC2010 + full 459-class labels) -> `datasets=[pc459]` and `datasets=[pc59]`.

    python scripts/prepare_pascal_context.py --voc2010 data/VOCdevkit/VOC2010 \
        --labels data/pascal_context/trainval --split-file data/pascal_context/val.txt --out data/pascal_ctx_d2

--labels: the unpacked trainval.tar.gz of the full annotations (one LabelMap .mat per image);
--split-file: the 5105 validation image names, one per line. The 59-class labels keep the 59
common classes (matched by name to the 459 list) and mark the rest 255.
"""

import argparse
import sys

from odise_pl.data.prepare import prepare_pascal_context
from odise_pl.errors import OdiseError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc2010", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--split-file", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        print(f"wrote {prepare_pascal_context(a.voc2010, a.labels, a.out, a.split_file)}")
    except OdiseError as err:
        sys.exit(f"error: {err}")
