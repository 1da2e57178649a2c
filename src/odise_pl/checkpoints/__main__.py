"""``python -m odise_pl.checkpoints export CKPT OUT.safetensors``."""

import sys

from odise_pl.checkpoints.export import main

sys.exit(main())
