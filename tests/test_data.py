import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from odise_pl.data.coco_panoptic import COCOPanopticDataset
from odise_pl.data.io import ids_to_rgb, rgb_to_ids
from odise_pl.data.synthetic import write_dataset
from odise_pl.data.transforms import LSJ, ResizeShortestEdge
from odise_pl.datamodule import collate
from odise_pl.errors import DatasetError


def test_reader_round_trips_the_generator(synthetic_root):
    root, maps = synthetic_root
    ds = COCOPanopticDataset(root=str(root), split="train")
    assert len(ds) == len(maps["train"])
    pan = json.load(open(root / "annotations" / "panoptic_train2017.json"))
    anns = {a["image_id"]: a for a in pan["annotations"]}
    cats = sorted(c["id"] for c in pan["categories"])
    for i in range(len(ds)):
        item = ds[i]
        seg = maps["train"][item["image_id"]]
        segs = anns[item["image_id"]]["segments_info"]
        assert item["masks"].shape == (len(segs), *seg.shape)
        for j, s in enumerate(segs):
            assert torch.equal(item["masks"][j], torch.from_numpy(seg == s["id"]))
            assert item["labels"][j] == cats.index(s["category_id"])
            assert bool(item["iscrowd"][j]) == bool(s["iscrowd"])
        assert item["image"].shape == (3, *seg.shape) and item["image"].dtype == torch.uint8
        assert len(item["captions"]) == 2
    assert ds.class_names == ["circle", "square", "triangle", "sky", "grass", "water"]
    assert ds.isthing == [True, True, True, False, False, False]


def test_png_id_encoding_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 256**3 - 1]])
    assert np.array_equal(rgb_to_ids(ids_to_rgb(ids)), ids)


def test_generator_is_deterministic(tmp_path):
    a = write_dataset(tmp_path / "a", 3, 1, seed=5)
    b = write_dataset(tmp_path / "b", 3, 1, seed=5)
    for k in a["train"]:
        assert np.array_equal(a["train"][k], b["train"][k])
    assert (tmp_path / "a/train2017/000000000001.jpg").read_bytes() == (
        tmp_path / "b/train2017/000000000001.jpg"
    ).read_bytes()


def test_some_crowd_and_void(synthetic_root):
    root, maps = synthetic_root
    pan = json.load(open(root / "annotations" / "panoptic_train2017.json"))
    assert any(s["iscrowd"] for a in pan["annotations"] for s in a["segments_info"])
    assert any((m == 0).any() for m in maps["train"].values())


def test_lsj_keeps_masks_aligned_with_pixels():
    # Each segment is a flat, distinct colour: after LSJ, every interior pixel of a mask must
    # still have its segment's colour (edges blend under bilinear resizing, so erode first).
    h, w = 96, 128
    seg = np.zeros((h, w), np.int64)
    seg[:, 64:] = 1
    seg[20:70, 10:50] = 2
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    image = colours[torch.from_numpy(seg)].permute(2, 0, 1)
    masks = torch.stack([torch.from_numpy(seg == k) for k in range(3)])
    for seed in range(10):
        random.seed(seed)
        item = {
            "image": image.clone(),
            "masks": masks.clone(),
            "labels": torch.arange(3),
            "isthing": torch.ones(3, dtype=torch.bool),
            "iscrowd": torch.zeros(3, dtype=torch.bool),
        }
        out = LSJ(size=64, min_scale=0.3, max_scale=2.0)(item)
        assert out["image"].shape == (3, 64, 64) and out["masks"].shape[-2:] == (64, 64)
        for m, k in zip(out["masks"], out["labels"]):
            padded = torch.nn.functional.pad(m[None, None].float(), (2, 2, 2, 2))  # outside = background
            inner = (-torch.nn.functional.max_pool2d(-padded, 5, 1, 0))[0, 0] > 0.5
            if inner.any():
                px = out["image"][:, inner].T.int()
                # antialiased downscaling blends a little beyond one pixel; a misalignment would differ by ~255
                assert (px - colours[k].int()).abs().max() <= 16, f"seed {seed} segment {k}"
        # padding belongs to no segment and is marked invalid
        assert not out["masks"][:, ~out["valid"]].any()


def test_resize_shortest_edge_keeps_ground_truth_size(synthetic_root):
    root, _ = synthetic_root
    ds = COCOPanopticDataset(root=str(root), split="val", transform=ResizeShortestEdge(64, 128))
    item = ds[0]
    assert min(item["image"].shape[-2:]) == 64
    assert item["masks"].shape[-2:] == (item["height"], item["width"])
    batch = collate([item], 64)
    assert batch["images"].shape[-1] % 64 == 0 and batch["targets"][0]["masks"].shape[-2:] == (
        item["height"],
        item["width"],
    )


@pytest.fixture()
def copy_root(synthetic_root, tmp_path):
    root, _ = synthetic_root
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_corrupt_image_names_the_file(copy_root):
    bad = copy_root / "train2017" / "000000000001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = COCOPanopticDataset(root=str(copy_root), split="train")
    with pytest.raises(DatasetError, match=str(bad)):
        ds[0]


def test_png_with_ids_missing_from_json(copy_root):
    png = copy_root / "annotations" / "panoptic_train2017" / "000000000001.png"
    arr = np.array(Image.open(png))
    arr[:4, :4] = (7, 7, 7)  # id 7 + 7*256 + 7*65536, not in segments_info
    Image.fromarray(arr).save(png)
    ds = COCOPanopticDataset(root=str(copy_root), split="train")
    with pytest.raises(DatasetError, match="not in the segments_info") as err:
        ds[0]
    assert str(png) in str(err.value)


def test_missing_captions_file(copy_root):
    cap = copy_root / "annotations" / "captions_train2017.json"
    cap.unlink()
    with pytest.raises(DatasetError, match="captions file not found") as err:
        COCOPanopticDataset(root=str(copy_root), split="train")
    assert str(cap) in str(err.value) and "data.train_dataset.captions=false" in str(err.value)
    assert len(COCOPanopticDataset(root=str(copy_root), split="train", captions=False)) == 12


def test_missing_root_and_json(tmp_path):
    with pytest.raises(DatasetError, match="odise_pl.data.synthetic"):
        COCOPanopticDataset(root=str(tmp_path / "nowhere"))
    (tmp_path / "r").mkdir()
    with pytest.raises(DatasetError, match="panoptic_train2017.json"):
        COCOPanopticDataset(root=str(tmp_path / "r"))


def test_synthetic_cli(tmp_path, capsys):
    from odise_pl.data.synthetic import main

    main(["--out", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1"])
    assert "wrote 2 train + 1 val" in capsys.readouterr().out
    assert len(list((tmp_path / "s/annotations/panoptic_val2017").glob("*.png"))) == 1


def test_lsj_keeps_segments_the_crop_empties_as_the_official_mapper():
    """PARITY: Mask2Former's LSJ mapper keeps every segment as a target, also one the crop emptied
    (it counts in matching and in the mask-loss normaliser); keep_empty=false drops it."""
    import random

    from odise_pl.data.transforms import LSJ

    def item():
        masks = torch.zeros(2, 200, 200, dtype=torch.bool)
        masks[0, :10, :10] = True  # top-left corner
        masks[1, 150:, 150:] = True  # bottom-right corner
        return {"image": torch.zeros(3, 200, 200, dtype=torch.uint8), "masks": masks,
                "labels": torch.tensor([1, 2]), "isthing": torch.tensor([True, False]),
                "iscrowd": torch.tensor([False, False])}  # fmt: skip

    for seed in range(200):
        random.seed(seed)
        kept = LSJ(size=64, min_scale=2.0, max_scale=2.0, flip=False)(item())
        if not kept["masks"][0].any() and kept["masks"][1].any():
            break
    else:
        raise AssertionError("no crop emptied the first segment")
    assert kept["masks"].shape[0] == 2 and kept["labels"].tolist() == [1, 2]
    random.seed(seed)
    dropped = LSJ(size=64, min_scale=2.0, max_scale=2.0, flip=False, keep_empty=False)(item())
    assert dropped["labels"].tolist() == [2] and torch.equal(dropped["masks"][0], kept["masks"][1])
