import numpy as np
import pytest
from PIL import Image

from odise_pl.data.semantic import SemanticSegDataset
from odise_pl.errors import DatasetError


def write(root, names, shape=(20, 30), classes=4, fmt="png"):
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for n in names:
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(root / "img" / f"{n}.jpg")
        lab = rng.integers(0, classes, shape)
        lab[:2] = 255
        labels[n] = lab
        if fmt == "png":
            Image.fromarray(lab.astype(np.uint8)).save(root / "lab" / f"{n}.png")
        else:
            Image.fromarray(lab.astype(np.uint16)).save(root / "lab" / f"{n}.tif")
    return labels


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_reader_masks_equal_label_map(tmp_path, fmt):
    labels = write(tmp_path, ["a", "b"], fmt=fmt)
    ds = SemanticSegDataset(root=str(tmp_path), image_dir="img", label_dir="lab", label_format=fmt)
    assert len(ds) == 2
    item = ds[0]
    for m, c in zip(item["masks"], item["labels"]):
        assert np.array_equal(m.numpy(), labels["a"] == int(c))
    assert 255 not in item["labels"].tolist()


def test_labels_out_of_range_and_missing_folder(tmp_path):
    write(tmp_path, ["a"], classes=10)
    ds = SemanticSegDataset(root=str(tmp_path), image_dir="img", label_dir="lab", num_classes=3)
    with pytest.raises(DatasetError, match="outside"):
        ds[0]
    with pytest.raises(DatasetError, match="prepare"):
        SemanticSegDataset(root=str(tmp_path), image_dir="nope", label_dir="lab")
