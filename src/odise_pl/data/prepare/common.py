"""What the dataset preparations share: required inputs, confined outputs, the shipped class lists."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from odise_pl.data.vocab import parse_openseg
from odise_pl.errors import DatasetError


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else a :class:`DatasetError` naming it as ``what``."""
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


def within(folder: Path, *parts: str) -> Path:
    """``folder / parts...``, refused unless it stays inside ``folder``: names come from index and
    split files, and a name like ``../../x`` must not read or write outside the dataset.
    """
    path = folder.joinpath(*parts)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DatasetError(
            f"{'/'.join(parts)!r} (from a dataset index or split list) leads outside {folder}; "
            "the file is not a genuine release: re-download it"
        )
    return path


def copy_image(src: Path, dst_dir: Path) -> None:
    """Copy ``src`` into ``dst_dir`` under its own name, unless it is there."""
    dst = within(dst_dir, src.name)
    if not dst.exists():
        shutil.copyfile(src, dst)


def plain_vocab(file: str):
    """A shipped class list (``data/vocabularies/FILE``, openseg format) as a :class:`~odise_pl.data.vocab.Vocabulary`."""
    text = resources.files("odise_pl.data").joinpath("vocabularies", file).read_text(encoding="utf-8")
    return parse_openseg(text, file, strict=False)
