import pytest

from odise_pl.data.vocab import (
    DATASET_VOCABS,
    dataset_vocab,
    load_vocab_file,
    parse_openseg,
    parse_vocab_string,
)
from odise_pl.errors import VocabularyError


def test_openseg_format_keeps_ids_and_skips_invalid():
    v = parse_openseg("0:invalid_class_id\n1:person,child\n3:car\n")
    assert v.names == [["person", "child"], ["car"]] and v.ids == [1, 3]


def test_string_and_plain_file(tmp_path):
    v = parse_vocab_string(" cat ; dog, puppy ;grass")
    assert v.names == [["cat"], ["dog", "puppy"], ["grass"]]
    f = tmp_path / "v.txt"
    f.write_text("cat\ndog,puppy\n")
    assert load_vocab_file(f).names == [["cat"], ["dog", "puppy"]]


def test_non_ascii_names():
    assert parse_vocab_string("café;Straße,street").names == [["café"], ["Straße", "street"]]


@pytest.mark.parametrize("text", ["", " ; ", ";;"])
def test_empty_vocabulary(text):
    with pytest.raises(VocabularyError, match="no category names|empty"):
        parse_vocab_string(text)


def test_duplicate_names_are_refused():
    with pytest.raises(VocabularyError, match="names two categories"):
        parse_vocab_string("cat;dog;Cat")
    with pytest.raises(VocabularyError, match="names two categories"):
        parse_vocab_string("dog,puppy;puppy")


def test_bad_file(tmp_path):
    with pytest.raises(VocabularyError, match="not found"):
        load_vocab_file(tmp_path / "missing.txt")
    f = tmp_path / "bad.txt"
    f.write_text("1:cat\nnot a line with id\n")
    with pytest.raises(VocabularyError, match="bad.txt:2"):
        load_vocab_file(f)


def test_shipped_dataset_vocabularies():
    sizes = {"coco": 133, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459, "voc21": 21, "lvis": 1203}
    for name in DATASET_VOCABS:
        assert len(dataset_vocab(name)) == sizes[name]
    assert sum(dataset_vocab("coco").isthing) == 80
    merged = dataset_vocab("coco") + dataset_vocab("ade150")
    assert len(merged) > 133 and len(set(merged.ids)) == len(merged)
    with pytest.raises(VocabularyError, match="unknown dataset vocabulary"):
        dataset_vocab("imagenet")


def test_training_vocabulary_matches_the_dataset_by_id():
    from odise_pl.data.synthetic import categories
    from odise_pl.data.vocab import training_vocabulary

    coco = dataset_vocab("coco")
    # COCO panoptic's categories (any order in the JSON, contiguous by id): the synonym lists by id
    cats = [{"id": i, "name": f"json name {i}"} for i in reversed(coco.ids)]
    got = training_vocabulary("coco", cats)
    assert got[-1] == coco.names[0] and got[-1][:2] == ["person", "child"]  # id 1: person + synonyms
    assert training_vocabulary("dataset", cats)[0] == [f"json name {coco.ids[-1]}"]
    # a dataset that is not COCO's, even where some ids coincide, is refused with the fix
    with pytest.raises(VocabularyError, match=r"no category with id 101 \(grass\).*train_vocabulary=dataset"):
        training_vocabulary("coco", categories())
    with pytest.raises(VocabularyError, match="has 2 categories, coco 133"):
        training_vocabulary("coco", cats[:2])
