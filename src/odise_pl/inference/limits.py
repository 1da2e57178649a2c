"""Limits on what one request may ask of the model: the web demo's guard against a request that
blocks or exhausts the server, applied by ``odise_pl.demo`` too.

Each limit is checked *before* the work it bounds: the vocabulary's length before it is parsed, its
categories, synonyms and words before anything is tokenised, an image's pixels from its header
before it is decoded. Each refusal is a :class:`LimitError` naming the limit, the value and the
option that raises it. The defaults admit the large vocabularies people use (LVIS' 1,203
categories, ImageNet-21k's 21,843) and images up to 16 MPixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from odise_pl.data.vocab import Vocabulary
from odise_pl.errors import OdiseError


class LimitError(OdiseError, ValueError):
    """A request over one of :class:`InputLimits`; the message names the limit and how to raise it."""


@dataclass(frozen=True)
class InputLimits:
    """What one request may contain (each ``None``: no limit).

    Args:
        max_vocab_chars: characters of the typed vocabulary (or a vocabulary file).
        max_categories: categories, typed and ticked dataset vocabularies together.
        max_synonyms: names of one category (its embeddings are padded to the longest list).
        max_words: words of one name (CLIP reads 77 tokens; a name is a short phrase).
        max_word_chars: characters of one word (CLIP's BPE costs at least the square of a word's
            length: a 40 KB "word" kept a server busy for a minute).
        max_pixels: width x height of an image, read from its header before decoding.
        timeout_s: seconds one request may take, checked between its stages (encoding chunks,
            inference); a request over it is refused.
    """

    max_vocab_chars: int | None = 1_000_000
    max_categories: int | None = 25_000
    max_synonyms: int | None = 32
    max_words: int | None = 16
    max_word_chars: int | None = 64
    max_pixels: int | None = 16_000_000
    timeout_s: float | None = 120.0

    # the command-line option of each limit (odise_pl.app / odise_pl.demo)
    OPTIONS = {
        "max_vocab_chars": "--max-vocab-chars",
        "max_categories": "--max-categories",
        "max_synonyms": "--max-synonyms",
        "max_words": "--max-words",
        "max_word_chars": "--max-word-chars",
        "max_pixels": "--max-pixels",
        "timeout_s": "--request-timeout",
    }

    @classmethod
    def none(cls) -> InputLimits:
        """No limit at all (library callers that check their own input)."""
        return cls(**{k: None for k in cls.OPTIONS})

    @classmethod
    def add_arguments(cls, parser, defaults: InputLimits) -> None:
        """One ``--max-...`` option per limit on an argparse parser (0: no limit)."""
        group = parser.add_argument_group("limits of one request (0: none)")
        for name, option in cls.OPTIONS.items():
            kind = float if name == "timeout_s" else int
            group.add_argument(option, dest=f"limit_{name}", type=kind, default=getattr(defaults, name) or 0)

    @classmethod
    def from_args(cls, args) -> InputLimits:
        values = {name: getattr(args, f"limit_{name}") for name in cls.OPTIONS}
        bad = [f"{cls.OPTIONS[k]}={v}" for k, v in values.items() if v < 0]
        if bad:
            raise LimitError(f"{bad[0]}: limits are positive numbers (0: no limit)")
        return cls(**{k: (v or None) for k, v in values.items()})

    def _over(self, name: str, what: str) -> LimitError:
        return LimitError(
            f"{what}, over the limit of {getattr(self, name):,} (raise it with {self.OPTIONS[name]})"
        )

    def check_text(self, text: str | None, what: str = "the vocabulary") -> None:
        """Before parsing: the typed (or file) vocabulary's length."""
        if text and self.max_vocab_chars is not None and len(text) > self.max_vocab_chars:
            raise self._over("max_vocab_chars", f"{what} has {len(text):,} characters")

    def check_vocabulary(self, vocab: Vocabulary) -> None:
        """Before tokenising: categories, synonyms per category, words per name, characters per word."""
        if self.max_categories is not None and len(vocab) > self.max_categories:
            raise self._over("max_categories", f"the vocabulary has {len(vocab):,} categories")
        for names in vocab.names:
            if self.max_synonyms is not None and len(names) > self.max_synonyms:
                raise self._over("max_synonyms", f"category {_show(names[0])} has {len(names):,} names")
            for name in names:
                words = name.split()
                if self.max_words is not None and len(words) > self.max_words:
                    raise self._over("max_words", f"the name {_show(name)} has {len(words):,} words")
                longest = max(words, key=len, default="")
                if self.max_word_chars is not None and len(longest) > self.max_word_chars:
                    raise self._over(
                        "max_word_chars", f"the word {_show(longest)} has {len(longest):,} characters"
                    )

    def check_file(self, path: str | Path) -> None:
        """A vocabulary file's size, before it is read."""
        path = Path(path)
        if path.is_file() and self.max_vocab_chars is not None:
            size = path.stat().st_size
            if size > 4 * self.max_vocab_chars:  # UTF-8: at most 4 bytes a character
                raise self._over("max_vocab_chars", f"the vocabulary file {path} has {size:,} bytes")

    def check_pixels(self, width: int, height: int, what: str = "The image") -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise LimitError(
                f"{what} is {width}x{height} = {width * height / 1e6:.1f} MPixels, over the limit of "
                f"{self.max_pixels / 1e6:.1f}: downscale it (or raise the limit with --max-pixels)"
            )


def _show(text: str, limit: int = 24) -> str:
    text = re.sub(r"\s+", " ", text)
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class Deadline:
    """A request's time budget, checked between its stages (Python cannot stop a running call)."""

    def __init__(self, limits: InputLimits):
        import time

        self._clock = time.monotonic
        self.limit = limits.timeout_s
        self.end = None if self.limit is None else self._clock() + self.limit

    def check(self, stage: str) -> None:
        if self.end is not None and self._clock() > self.end:
            raise LimitError(
                f"the request took longer than {self.limit:g} s (at {stage}); use a smaller vocabulary or "
                "image (or raise the limit with --request-timeout)"
            )
