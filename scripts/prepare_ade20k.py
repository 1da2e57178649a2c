#!/usr/bin/env python
"""ADE20K (ADEChallengeData2016) -> panoptic PNG/JSON + detectron2 semantic labels.

Download ADEChallengeData2016.zip (images + 150-class annotations) and the instance annotations
(annotations_instance/), unzip into one folder, then:

    python scripts/prepare_ade20k.py --root data/ADEChallengeData2016 [--splits validation training]

Writes ROOT/ade20k_panoptic_val.json, ROOT/ade20k_panoptic_val/*.png and
ROOT/annotations_detectron2/validation/*.png (used by `datasets=[ade150]`).
"""

import argparse
import sys

from odise_pl.data.prepare import prepare_ade20k
from odise_pl.errors import OdiseError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the ADEChallengeData2016 folder")
    p.add_argument("--splits", nargs="+", default=["validation"], choices=["validation", "training"])
    a = p.parse_args()
    try:
        for path in prepare_ade20k(a.root, tuple(a.splits)):
            print(f"wrote {path}")
    except OdiseError as err:
        sys.exit(f"error: {err}")
