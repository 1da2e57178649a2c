import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import savemat

from odise_pl.data.coco_panoptic import COCOPanopticDataset
from odise_pl.data.prepare import prepare_ade20k, prepare_pascal_context, prepare_pascal_voc
from odise_pl.data.prepare.ade20k import ade_thing_mapping
from odise_pl.data.semantic import SemanticSegDataset
from odise_pl.data.vocab import dataset_vocab
from odise_pl.errors import DatasetError
from odise_pl.eval import dataset_vocabulary

ROOT = Path(__file__).resolve().parents[1]


def fake_ade(root: Path, n=2):
    rng = np.random.default_rng(0)
    mapping = ade_thing_mapping()
    inst_cls = sorted(mapping)[:2]  # two Instance100 classes
    thing_sem = [mapping[c] for c in inst_cls]
    stuff_sem = [c for c in range(1, 151) if c not in set(mapping.values())][:2]
    for d in ("images/validation", "annotations/validation", "annotations_instance/validation"):
        (root / d).mkdir(parents=True)
    truth = {}
    for k in range(n):
        name = f"ADE_val_{k:08d}"
        sem = np.zeros((40, 60), np.uint8)
        sem[:20] = stuff_sem[0]
        sem[20:] = stuff_sem[1]
        inst = np.zeros((40, 60, 3), np.uint8)
        inst[5:15, 5:20, 0], inst[5:15, 5:20, 1] = inst_cls[0], 1
        inst[25:35, 30:50, 0], inst[25:35, 30:50, 1] = inst_cls[1], 1
        inst[25:35, 5:15, 0], inst[25:35, 5:15, 1] = inst_cls[1], 2  # a second instance of the class
        sem[5:15, 5:20], sem[25:35, 30:50], sem[25:35, 5:15] = thing_sem[0], thing_sem[1], thing_sem[1]
        sem[0:3, 0:3] = 0  # "other": void
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
            root / "images/validation" / f"{name}.jpg"
        )
        Image.fromarray(sem).save(root / "annotations/validation" / f"{name}.png")
        Image.fromarray(inst).save(root / "annotations_instance/validation" / f"{name}.png")
        truth[name] = (sem, inst)
    return truth, thing_sem, stuff_sem


def test_ade20k_panoptic_and_semantic(tmp_path):
    truth, thing_sem, stuff_sem = fake_ade(tmp_path)
    prepare_ade20k(tmp_path)
    entry = OmegaConf.load(ROOT / "conf/datasets/ade150.yaml").ade150
    ds = COCOPanopticDataset(
        root=str(tmp_path),
        split="val",
        captions=False,
        image_dir=entry.dataset.image_dir,
        panoptic_json=entry.dataset.panoptic_json,
        panoptic_dir=entry.dataset.panoptic_dir,
    )
    vocab = dataset_vocabulary(entry, ds)
    assert len(vocab) == 150 and vocab.names == dataset_vocab("ade150").names
    item = ds[0]
    sem, inst = truth["ADE_val_00000000"]
    got = {
        (int(lab), bool(t)): m.numpy() for m, lab, t in zip(item["masks"], item["labels"], item["isthing"])
    }
    assert sum(item["isthing"].tolist()) == 3  # 3 instances, 2 of the same class
    assert np.array_equal(got[(stuff_sem[0] - 1, False)], (sem == stuff_sem[0]))
    thing_masks = [m.numpy() for m, t in zip(item["masks"], item["isthing"]) if t]
    expected = [
        (inst[..., 0] == c) & (inst[..., 1] == i)
        for c, i in {(int(a), int(b)) for a, b in inst[inst[..., 0] > 0][:, :2]}
    ]
    assert sorted(int(m.sum()) for m in thing_masks) == sorted(int(m.sum()) for m in expected)
    d2 = np.asarray(Image.open(tmp_path / "annotations_detectron2/validation/ADE_val_00000000.png"))
    assert np.array_equal(d2, np.where(sem == 0, 255, sem.astype(np.int64) - 1))


def test_pascal_voc(tmp_path):
    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(voc / "JPEGImages/2007_000001.jpg")
    lab = np.zeros((10, 12), np.uint8)
    lab[2:6, 3:9], lab[6] = 15, 255
    im = Image.fromarray(lab, mode="P")
    im.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    im.save(voc / "SegmentationClass/2007_000001.png")
    out = prepare_pascal_voc(voc, tmp_path / "d2")
    ds = SemanticSegDataset(
        root=str(out), image_dir="images/validation", label_dir="annotations_pascal21/validation"
    )
    item = ds[0]
    assert item["labels"].tolist() == [0, 15]
    assert np.array_equal(item["masks"][1].numpy(), lab == 15)
    with pytest.raises(DatasetError, match="split list"):
        prepare_pascal_voc(tmp_path / "nope", tmp_path / "d3")


def test_pascal_context_459_and_59(tmp_path):
    voc = tmp_path / "VOC2010"
    (voc / "JPEGImages").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "JPEGImages/2008_000002.jpg")
    full = dataset_vocab("pc459")
    table = full.ids[[n[0] for n in full.names].index("table")]
    accordion = full.ids[[n[0] for n in full.names].index("accordion")]
    lab = np.zeros((8, 8), np.uint16)
    lab[:4], lab[4:6] = table, accordion  # table is one of the 59 ("diningtable"), accordion is not
    savemat(tmp_path / "labels/2008_000002.mat", {"LabelMap": lab})
    split = tmp_path / "val.txt"
    split.write_text("2008_000002\n")
    out = prepare_pascal_context(voc, tmp_path / "labels", tmp_path / "ctx", split)
    t459 = np.asarray(Image.open(out / "annotations_ctx459/validation/2008_000002.tif"))
    assert t459[0, 0] == table - 1 and t459[4, 0] == accordion - 1 and t459[7, 0] == 65535
    p59 = np.asarray(Image.open(out / "annotations_ctx59/validation/2008_000002.png"))
    diningtable = [n[0] for n in dataset_vocab("pc59").names].index("diningtable")
    assert p59[0, 0] == diningtable and p59[4, 0] == 255 and p59[7, 0] == 255


@pytest.mark.parametrize(
    "script",
    ["prepare_ade20k.py", "prepare_ade20k_full.py", "prepare_pascal_voc.py", "prepare_pascal_context.py"],
)
def test_scripts_have_help(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage" in out.stdout


def fake_ade_full(root: Path) -> dict[str, int]:
    """A miniature ADE20K_2021_17_01: index pickle (with a numpy array, as the real one has), two
    validation images and one training image with *_seg.png class maps. Returns name -> class value."""
    import pickle

    from odise_pl.data.prepare.ade20k_full import ADE_FULL_ANCHORS

    names847 = [", ".join(n) for n in dataset_vocab("ade847").names]  # prompt-eng list has the same order
    plain = [", ".join(n) for n in parse_plain_847()]
    objectnames = [f"filler {i}" for i in range(3300)]
    for name, value in ADE_FULL_ANCHORS.items():  # class value = position + 1 in the real release
        objectnames[value - 1] = name
    free = iter(i for i in range(3300) if objectnames[i].startswith("filler"))
    for name in plain:
        if name not in ADE_FULL_ANCHORS:
            objectnames[next(free)] = name
    assert len(names847) == 847
    value = {n: objectnames.index(n) + 1 for n in plain}
    rng = np.random.default_rng(0)
    folders, files = [], []
    for split, name, (h, w) in (
        ("validation", "ADE_val_00000001.jpg", (600, 800)),  # shorter side 600 -> resized to 512
        ("validation", "ADE_val_00000002.jpg", (40, 60)),
        ("training", "ADE_train_00000001.jpg", (40, 60)),
    ):
        folder = f"ADE20K_2021_17_01/images/ADE/{split}/urban/street"
        d = root / "images/ADE" / split / "urban/street"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
        cls = np.zeros((h, w), np.int64)  # 0: unlabelled
        cls[: h // 2] = value["wall"]
        cls[h // 2 :, : w // 2] = value["sky"]
        cls[h // 2 :, w // 2 :] = value[plain[400]]
        cls[:2, :2] = 3300  # "filler 3299": not one of the 847
        seg = np.zeros((h, w, 3), np.uint8)
        seg[..., 0] = cls // 256 * 10 + 3  # R / 10 (floor) is the high byte
        seg[..., 1] = cls % 256
        seg[..., 2] = 7  # instance channel: ignored
        Image.fromarray(seg).save(d / name.replace(".jpg", "_seg.png"))
        folders.append(folder)
        files.append(name)
    index = {
        "folder": folders,
        "filename": files,
        "objectnames": objectnames,
        "objectPresence": np.zeros((3, 2)),
    }
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    return value


def parse_plain_847():
    from odise_pl.data.prepare.common import plain_vocab

    return plain_vocab("ade20k_847.txt").names


def test_ade20k_full_847(tmp_path):
    from odise_pl.data.prepare import prepare_ade20k_full

    root = tmp_path / "ADE20K_2021_17_01"
    fake_ade_full(root)
    prepare_ade20k_full(root)
    lab_dir = root / "annotations_detectron2/validation"
    assert sorted(p.name for p in lab_dir.iterdir()) == ["ADE_val_00000001.tif", "ADE_val_00000002.tif"]
    small = np.asarray(Image.open(lab_dir / "ADE_val_00000002.tif"))
    assert small.dtype == np.uint16 and small.shape == (40, 60)
    assert small[10, 10] == 0 and small[30, 10] == 2 and small[30, 50] == 400  # wall, sky, train id 400
    assert small[0, 0] == 65535  # not one of the 847
    big = np.asarray(Image.open(lab_dir / "ADE_val_00000001.tif"))
    assert big.shape == (512, 683)  # shorter side 600 -> 512 (800 * 512 / 600 = 682.7)
    assert set(np.unique(big).tolist()) <= {0, 2, 400, 65535}
    assert Image.open(root / "images_detectron2/validation/ADE_val_00000001.jpg").size == (683, 512)
    # The reader and the shipped config agree with the layout.
    cfg = OmegaConf.load(ROOT / "conf/datasets/ade847.yaml").ade847.dataset
    ds = SemanticSegDataset(
        root=str(root),
        image_dir=cfg.image_dir,
        label_dir=cfg.label_dir,
        label_format=cfg.label_format,
        ignore_label=cfg.ignore_label,
    )
    assert len(ds) == 2


def test_ade20k_full_refuses_code_in_the_index(tmp_path):
    import os
    import pickle

    from odise_pl.data.prepare import prepare_ade20k_full

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    root = tmp_path / "ADE20K_2021_17_01"
    root.mkdir()
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps({"folder": [Evil()]}))
    with pytest.raises(DatasetError, match="system is not allowed"):
        prepare_ade20k_full(root)
    with pytest.raises(DatasetError, match="index_ade20k.pkl"):
        prepare_ade20k_full(tmp_path / "nope")


def test_ade20k_full_wrong_release(tmp_path):
    from odise_pl.data.prepare.ade20k_full import ade_full_id_map

    with pytest.raises(DatasetError, match="2021_17_01"):
        ade_full_id_map(["wall", "sky"])


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_ade20k_full_index_of_any_protocol_is_read(tmp_path, protocol):
    from odise_pl.data.prepare.ade20k_full import load_ade_full_index

    index = {
        "folder": ["a"],
        "filename": ["ADE_val_00000001.jpg"],
        "objectnames": np.array(["wall", "sky"]),
        "objectPresence": np.arange(6, dtype=np.int32).reshape(2, 3),
        "flag": np.bool_(True),
        "scale": np.float64(2.5),
    }
    (tmp_path / "index_ade20k.pkl").write_bytes(pickle.dumps(index, protocol=protocol))
    got = load_ade_full_index(tmp_path / "index_ade20k.pkl")
    assert type(got["objectPresence"]) is np.ndarray and got["objectPresence"].tolist() == [
        [0, 1, 2],
        [3, 4, 5],
    ]
    assert got["objectnames"].tolist() == ["wall", "sky"] and got["flag"] and got["scale"] == 2.5


def _forged_object_array() -> bytes:
    """An object-dtype array whose data are raw bytes (forged pointers): numpy would dereference them."""
    arr = np.array([None, None], dtype=object)
    cls, args, state = arr.__reduce__()
    state = (*state[:4], b"\x41" * 16)  # raw bytes instead of the list of objects
    return pickle.dumps(
        {"folder": ["a"], "filename": ["b"], "objectnames": _Raw(cls, args, state)}, protocol=4
    )


class _Raw:
    """Pickles as the given reduce tuple (to write a forged array)."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_forged_object_array, id="object-dtype-forged-pointers"),
        pytest.param(lambda: pickle.dumps({"x": np.array([None], dtype=object)}), id="object-dtype"),
        pytest.param(lambda: pickle.dumps({"x": np.zeros(2, dtype="V8")}), id="void-dtype"),
        pytest.param(
            lambda: pickle.dumps({"x": np.zeros(2, dtype=[("a", "i4"), ("b", "O")])}), id="structured"
        ),
    ],
)
def test_ade20k_full_index_with_unsafe_arrays_is_refused_without_crashing(tmp_path, payload):
    import subprocess
    import sys

    path = tmp_path / "index_ade20k.pkl"
    path.write_bytes(payload())
    # in a child process: before the fix, a forged object array crashed the interpreter (rc 139)
    code = (
        "import sys; from odise_pl.data.prepare.ade20k_full import load_ade_full_index\n"
        "from odise_pl.errors import DatasetError\n"
        "try:\n    load_ade_full_index(sys.argv[1])\nexcept DatasetError as e:\n    print('refused:', e); sys.exit(3)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, (res.returncode, res.stderr[-1000:])
    assert "not allowed in a dataset index" in res.stdout


def test_names_that_leave_the_dataset_folder_are_refused(tmp_path):
    from odise_pl.data.prepare import prepare_ade20k_full, prepare_pascal_voc

    root = tmp_path / "ADE20K_2021_17_01"
    fake_ade_full(root)
    index = pickle.loads((root / "index_ade20k.pkl").read_bytes())
    index["filename"][0] = "../../../ADE_val_00000001.jpg"  # would write three levels above its output
    (root / "index_ade20k.pkl").write_bytes(pickle.dumps(index))
    src = root / "images/ADE/validation/urban/street"  # where that name reads from (inside the dataset)
    for f in ("ADE_val_00000001.jpg", "ADE_val_00000001_seg.png"):
        (root / "images/ADE" / f).write_bytes((src / f).read_bytes())
    with pytest.raises(DatasetError, match="leads outside"):
        prepare_ade20k_full(root)
    assert not (tmp_path / "ADE_val_00000001.jpg").exists() and not list(tmp_path.parent.glob("ADE_val_*"))
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("../../../escape\n")
    with pytest.raises(DatasetError, match="leads outside"):
        prepare_pascal_voc(voc, tmp_path / "out")
