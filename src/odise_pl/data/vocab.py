"""Vocabularies: lists of categories, each with synonyms, for open-vocabulary classification.

Sources: a file in the openseg format (``id:name,synonym,...`` per line; ``invalid_class_id``
entries are skipped), a command-line string (``"cat;dog,puppy;grass"``: ``;`` between categories,
``,`` between synonyms), or a shipped dataset vocabulary by name (:data:`DATASET_VOCABS`; the
synonym-expanded ``_with_prompt_eng`` lists of the official evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from odise_pl.errors import VocabularyError

# name -> (file, number of leading thing categories: COCO's 80 things come first by id; ADE-150's
# things are listed in ADE_150_THINGS).
DATASET_VOCABS = {
    "coco": "coco_panoptic_with_prompt_eng.txt",
    "ade150": "ade20k_150_with_prompt_eng.txt",
    "ade847": "ade20k_847_with_prompt_eng.txt",
    "pc59": "pascal_context_59_with_prompt_eng.txt",
    "pc459": "pascal_context_459_with_prompt_eng.txt",
    "voc21": "pascal_voc_21_with_prompt_eng.txt",
    "lvis": "lvis_1203_with_prompt_eng.txt",
}


@dataclass
class Vocabulary:
    """K categories: ``names[k]`` is a non-empty list of synonyms (the first is the display name)."""

    names: list[list[str]]
    ids: list[int] = field(default_factory=list)
    isthing: list[bool] = field(default_factory=list)
    # strict: no name may appear in two categories (user vocabularies). The official dataset lists
    # are taken as they are: ADE-847 has two categories named "pot" and shares synonyms.
    strict: bool = True

    def __post_init__(self):
        if not self.names:
            raise VocabularyError("the vocabulary is empty: give at least one category")
        self.ids = self.ids or list(range(len(self.names)))
        self.isthing = self.isthing or [True] * len(self.names)
        seen: dict[str, int] = {}
        for k, syns in enumerate(self.names):
            if not syns or any(not s for s in syns):
                raise VocabularyError(f"category {k} has an empty name")
            for s in syns if self.strict else []:
                key = s.lower()
                if key in seen and seen[key] != k:
                    raise VocabularyError(
                        f"'{s}' names two categories ({self.names[seen[key]][0]!r} and {syns[0]!r}); "
                        "merge them into one category (synonyms go after a comma) or rename one"
                    )
                seen[key] = k

    def __len__(self) -> int:
        return len(self.names)

    @property
    def display_names(self) -> list[str]:
        return [n[0] for n in self.names]

    def __add__(self, other: Vocabulary) -> Vocabulary:
        """Union; a category of ``other`` whose names overlap one already present is skipped."""
        known = {s.lower() for syns in self.names for s in syns}
        names, ids, things = list(self.names), list(self.ids), list(self.isthing)
        next_id = max(ids) + 1
        for syns, thing in zip(other.names, other.isthing):
            if known & {s.lower() for s in syns}:
                continue
            names.append(syns)
            ids.append(next_id)
            things.append(thing)
            next_id += 1
            known |= {s.lower() for s in syns}
        return Vocabulary(names, ids, things, strict=self.strict and other.strict)


def _clean(names: list[str]) -> list[str]:
    out = []
    for n in names:
        n = " ".join(n.strip().split())
        if n and n not in out:
            out.append(n)
    return out


def parse_openseg(text: str, source: str = "<string>", strict: bool = True) -> Vocabulary:
    """``id:name,syn,...`` lines -> Vocabulary (ids kept; invalid_class_id skipped)."""
    names, ids = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().lstrip("-").isdigit():
            raise VocabularyError(f"{source}:{lineno}: expected 'id:name,synonym,...', got {line!r}")
        syns = _clean(rest.split(","))
        if not syns:
            raise VocabularyError(f"{source}:{lineno}: category {head} has no name")
        if syns == ["invalid_class_id"]:
            continue
        names.append(syns)
        ids.append(int(head))
    if not names:
        raise VocabularyError(f"{source}: no categories found")
    return Vocabulary(names, ids, strict=strict)


def load_vocab_file(path: str | Path) -> Vocabulary:
    """A vocabulary file in the openseg format (or one category per line: ``name,syn,...``)."""
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"vocabulary file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of a name
    except UnicodeDecodeError as err:
        raise VocabularyError(f"vocabulary file {path} is not UTF-8 text: {err}") from err
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and all(":" not in ln for ln in lines):  # plain one-category-per-line file
        return Vocabulary([_clean(ln.split(",")) for ln in lines])
    return parse_openseg(text, str(path))


def parse_vocab_string(text: str) -> Vocabulary:
    """``"cat;dog,puppy;grass"`` -> 3 categories; the second has a synonym."""
    cats = [_clean(part.split(",")) for part in text.split(";")]
    cats = [c for c in cats if c]
    if not cats:
        raise VocabularyError(
            f"no category names in {text!r}; separate categories with ';' and synonyms with ','"
        )
    return Vocabulary(cats)


def dataset_vocab(name: str) -> Vocabulary:
    """A shipped dataset vocabulary (``coco``, ``ade150``, ``ade847``, ``pc59``, ``pc459``, ``voc21``,
    ``lvis``), or the path of your own vocabulary file (openseg format, ``id:name,synonym,...`` per
    line: ids are your dataset's category ids; see :func:`load_vocab_file`).
    """
    if name not in DATASET_VOCABS and ("/" in name or name.endswith(".txt")):
        return load_vocab_file(name)
    if name not in DATASET_VOCABS:
        raise VocabularyError(
            f"unknown dataset vocabulary {name!r}; choose from {sorted(DATASET_VOCABS)} or give the path of a "
            "vocabulary file (openseg format: one 'id:name,synonym,...' per line)"
        )
    text = (
        resources.files("odise_pl.data")
        .joinpath("vocabularies", DATASET_VOCABS[name])
        .read_text(encoding="utf-8")
    )
    vocab = parse_openseg(text, DATASET_VOCABS[name], strict=False)
    if name == "coco":  # COCO panoptic: ids 1-90 are things, 92-200 stuff
        vocab.isthing = [i < 91 for i in vocab.ids]
    return vocab


def training_vocabulary(source: str, categories: list[dict]) -> list[list[str]]:
    """The training categories as synonym lists, in the dataset's category order.

    ``categories``: the dataset's ``{"id", "name"}`` entries in its contiguous order. ``source``:
    ``dataset`` (each category's own name) or a shipped vocabulary (:data:`DATASET_VOCABS`) that must
    list exactly the dataset's category ids (matched by id). PARITY: the official label model trains
    on the COCO panoptic synonym lists (``coco``), max over synonyms, as at test time.
    """
    if source == "dataset":
        names = [[c["name"]] for c in categories]
        try:  # two categories of one name cannot be told apart: refused here as evaluation refuses them
            Vocabulary(names)
        except VocabularyError as err:
            raise VocabularyError(f"the training dataset's categories: {err}") from None
        return names
    vocab = dataset_vocab(source)
    by_id = dict(zip(vocab.ids, vocab.names))
    ours = {c["id"] for c in categories}
    if ours != set(by_id):
        missing = sorted(ours - set(by_id))
        names = {c["id"]: c["name"] for c in categories}
        detail = (
            f"it has no category with id {', '.join(f'{i} ({names[i]})' for i in missing[:5])}"
            if missing
            else f"the dataset has {len(ours)} categories, {source} {len(by_id)}"
        )
        raise VocabularyError(
            f"model.train_vocabulary={source} does not describe this dataset's categories ({detail}); "
            "use model.train_vocabulary=dataset (the dataset's own names)"
        )
    return [by_id[c["id"]] for c in categories]
