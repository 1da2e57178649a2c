"""Export a training checkpoint to one ``.safetensors`` file of its trainable weights and description:
``python -m odise_pl.checkpoints export CKPT OUT.safetensors``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save

from odise_pl.checkpoints.description import safetensors_metadata
from odise_pl.checkpoints.files import read_checkpoint_file
from odise_pl.errors import CheckpointError, OdiseError, say_error
from odise_pl.fs import atomic_write, check_writable_file
from odise_pl.log_setup import configure_cli, get_logger

log = get_logger(__name__)


def export_safetensors(ckpt_path: str | Path, out: str | Path, trust: bool = False) -> Path:
    """A Lightning checkpoint -> one ``.safetensors`` file of the trainable weights (for inference),
    written atomically; the checkpoint itself is never the output. Its description is checked as
    data first (``trust``: the user's explicit ``--trust-checkpoint-config``).
    """
    ckpt_path, out = Path(ckpt_path), Path(out)
    if out.exists() and (out.is_dir() or out.resolve() == ckpt_path.resolve() or out.samefile(ckpt_path)):
        what = "a directory" if out.is_dir() else "the checkpoint being exported"
        raise CheckpointError(
            f"the output {out} is {what}; give a new file name, e.g. {ckpt_path.with_suffix('.safetensors')}"
        )
    check_writable_file(out)
    ckpt = read_checkpoint_file(ckpt_path, trust=trust)
    state = {k: v.contiguous() for k, v in ckpt.state.items()}
    meta = safetensors_metadata(ckpt.description)
    atomic_write(out, lambda f: f.write(save(state, metadata=meta or None)))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m odise_pl.checkpoints export CKPT OUT.safetensors``."""
    p = argparse.ArgumentParser(description="Export a trainable-only checkpoint to safetensors.")
    p.add_argument("command", choices=["export"])
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument(
        "--trust-checkpoint-config",
        action="store_true",
        help="export a file whose stored config names classes outside odise_pl (only for files you trust)",
    )
    a = p.parse_args(argv)
    configure_cli()
    try:
        out = export_safetensors(a.ckpt, a.out, trust=a.trust_checkpoint_config)
    except OdiseError as err:
        say_error(str(err))
        return 2
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return 0
