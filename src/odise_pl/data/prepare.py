"""Convert official dataset downloads into what the readers need (Mask2Former / ODISE conventions).

* ADE20K (``ADEChallengeData2016``): panoptic PNG + JSON from the semantic (150 classes) and
  instance (100 thing classes: R = class, G = instance) annotations, and ``annotations_detectron2``
  semantic labels (label - 1, 0 -> 255).
* Pascal VOC 2012: ``SegmentationClass`` palette PNGs (0..20, 255 border) -> 8-bit label PNGs.
* Pascal Context (VOC2010 + the full ``trainval/*.mat`` labels, 1..459): 459-class TIFFs (label - 1,
  unlabelled -> 65535) and 59-class PNGs (the 59 common classes by name, others -> 255).
* ADE20K-full (``ADE20K_2021_17_01``): 847-class uint16 TIFFs (65535 = other) from ``*_seg.png``
  (class = R // 10 * 256 + G) through the index's class names; shorter side resized to 512.

The scripts in ``scripts/`` are the command lines; each step says what it read and wrote.
"""

from __future__ import annotations

import json
import pickle
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.io import ids_to_rgb, load_image
from odise_pl.data.vocab import dataset_vocab, parse_openseg
from odise_pl.errors import DatasetError

ADE_SPLITS = {"validation": "val", "training": "train"}


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


def ade_thing_mapping() -> dict[int, int]:
    """Instance100 class id -> SceneParse150 class id (1-based), from the official mapping table."""
    text = (
        resources.files("odise_pl.data")
        .joinpath("vocabularies", "ade20k_instance_catid_mapping.txt")
        .read_text()
    )
    mapping = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2:
            mapping[int(cols[0])] = int(cols[1])
    return mapping


def ade_categories() -> list[dict]:
    """The 150 ADE20K categories (ids 1..150, names from the ADE-150 vocabulary, isthing from the mapping)."""
    vocab = dataset_vocab("ade150")
    things = set(ade_thing_mapping().values())
    return [
        {"id": i, "name": n[0], "isthing": int(i in things), "supercategory": ""}
        for i, n in zip(vocab.ids, vocab.names)
    ]


def ade_panoptic_image(sem: np.ndarray, inst: np.ndarray, mapping: dict[int, int], things: set[int]):
    """Semantic (H, W) 0..150 + instance (H, W, 3) -> (H, W) segment ids + segments_info.

    Things come from the instance map (one segment per (class, instance) pair); stuff from the
    semantic map; thing-class pixels without an instance, and class 0, are VOID.
    """
    ids = np.zeros(sem.shape, dtype=np.int64)
    segments = []
    for c in np.unique(sem):
        c = int(c)
        if c == 0 or c in things:
            continue
        m = sem == c
        sid = c * 1000
        ids[m] = sid
        segments.append((sid, c, m))
    cls, ins = inst[..., 0].astype(np.int64), inst[..., 1].astype(np.int64)
    pairs = np.unique(np.stack([cls[cls > 0], ins[cls > 0]], 1), axis=0) if (cls > 0).any() else []
    for k, (ic, ii) in enumerate(pairs):
        if int(ic) not in mapping:
            raise DatasetError(f"instance class {ic} is not one of ADE20K's 100 thing classes")
        c = mapping[int(ic)]
        m = (cls == ic) & (ins == ii)
        sid = c * 1000 + k + 1
        ids[m] = sid
        segments.append((sid, c, m))
    info = []
    for sid, c, m in segments:
        m = ids == sid  # things overwrite stuff where both are annotated
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        info.append(
            {
                "id": sid,
                "category_id": c,
                "iscrowd": 0,
                "area": int(m.sum()),
                "bbox": [
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ],
            }
        )
    return ids, info


def prepare_ade20k(root: str | Path, splits: tuple[str, ...] = ("validation",)) -> list[Path]:
    """ADEChallengeData2016 -> ``ade20k_panoptic_{val,train}[.json]`` and ``annotations_detectron2/``."""
    root = Path(root)
    mapping, cats = ade_thing_mapping(), ade_categories()
    things = {c["id"] for c in cats if c["isthing"]}
    written = []
    for split in splits:
        short = ADE_SPLITS[split]
        img_dir = _need(root / "images" / split, "ADE20K image folder")
        sem_dir = _need(root / "annotations" / split, "ADE20K semantic annotations")
        inst_dir = _need(
            root / "annotations_instance" / split, "ADE20K instance annotations (annotations_instance/)"
        )
        pan_dir = root / f"ade20k_panoptic_{short}"
        d2_dir = root / "annotations_detectron2" / split
        pan_dir.mkdir(exist_ok=True)
        d2_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k, img in enumerate(tqdm(sorted(img_dir.glob("*.jpg")), desc=f"ADE20K {split}")):
            sem = np.asarray(
                Image.open(_need(sem_dir / f"{img.stem}.png", "semantic annotation")), dtype=np.int64
            )
            inst = np.asarray(
                Image.open(_need(inst_dir / f"{img.stem}.png", "instance annotation")).convert("RGB")
            )
            ids, info = ade_panoptic_image(sem, inst, mapping, things)
            Image.fromarray(ids_to_rgb(ids)).save(pan_dir / f"{img.stem}.png")
            Image.fromarray(np.where(sem == 0, 255, sem - 1).astype(np.uint8)).save(
                d2_dir / f"{img.stem}.png"
            )
            h, w = sem.shape
            images.append({"id": k, "file_name": img.name, "height": h, "width": w})
            annotations.append({"image_id": k, "file_name": f"{img.stem}.png", "segments_info": info})
        out = root / f"ade20k_panoptic_{short}.json"
        with open(out, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
        written += [out, pan_dir, d2_dir]
    return written


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


def _copy_image(src: Path, dst_dir: Path) -> None:
    dst = within(dst_dir, src.name)
    if not dst.exists():
        shutil.copyfile(src, dst)


def prepare_pascal_voc(voc2012: str | Path, out: str | Path, split: str = "val") -> Path:
    """VOC2012 -> ``OUT/images/validation`` + ``OUT/annotations_pascal21/validation`` (0..20, 255)."""
    voc2012, out = Path(voc2012), Path(out)
    names = (
        _need(voc2012 / "ImageSets" / "Segmentation" / f"{split}.txt", "VOC split list").read_text().split()
    )
    img_out, lab_out = out / "images" / "validation", out / "annotations_pascal21" / "validation"
    img_out.mkdir(parents=True, exist_ok=True)
    lab_out.mkdir(parents=True, exist_ok=True)
    for n in tqdm(names, desc="Pascal VOC"):
        _copy_image(_need(within(voc2012 / "JPEGImages", f"{n}.jpg"), "VOC image"), img_out)
        with Image.open(_need(within(voc2012 / "SegmentationClass", f"{n}.png"), "VOC label")) as im:
            lab = np.asarray(im)  # palette indices are the class ids
        if lab.ndim != 2:
            raise DatasetError(f"{voc2012 / 'SegmentationClass' / n}.png is not a palette (class-index) PNG")
        Image.fromarray(lab.astype(np.uint8)).save(within(lab_out, f"{n}.png"))
    return out


def _plain_vocab(file: str):
    text = resources.files("odise_pl.data").joinpath("vocabularies", file).read_text(encoding="utf-8")
    return parse_openseg(text, file, strict=False)


# The 59-class list names PASCAL's "diningtable" what the 459-class list calls "table".
PC59_ALIASES = {"diningtable": "table"}


def pc59_from_459() -> np.ndarray:
    """LUT over 459 full-class ids (1-based, index 0 = unlabelled) -> 59-class index or 255, by name."""
    full, small = _plain_vocab("pascal_context_459.txt"), _plain_vocab("pascal_context_59.txt")
    index = {PC59_ALIASES.get(n[0].lower(), n[0].lower()): k for k, n in enumerate(small.names)}
    lut = np.full(max(full.ids) + 1, 255, dtype=np.uint8)
    for fid, names in zip(full.ids, full.names):
        if names[0].lower() in index:
            lut[fid] = index[names[0].lower()]
    return lut


def prepare_pascal_context(
    voc2010: str | Path, labels_dir: str | Path, out: str | Path, split_file: str | Path
) -> Path:
    """VOC2010 JPEGs + full ``.mat`` labels (``LabelMap``, 1..459, 0 unlabelled) -> 459-class TIFFs
    (label - 1, unlabelled 65535) and 59-class PNGs (255 outside the 59).
    """
    from scipy.io import loadmat

    voc2010, labels_dir, out = Path(voc2010), Path(labels_dir), Path(out)
    names = _need(Path(split_file), "split list").read_text().split()
    img_out = out / "images" / "validation"
    full_out, small_out = out / "annotations_ctx459" / "validation", out / "annotations_ctx59" / "validation"
    for d in (img_out, full_out, small_out):
        d.mkdir(parents=True, exist_ok=True)
    lut59 = pc59_from_459()
    for n in tqdm(names, desc="Pascal Context"):
        _copy_image(_need(within(voc2010 / "JPEGImages", f"{n}.jpg"), "VOC2010 image"), img_out)
        mat = loadmat(str(_need(within(labels_dir, f"{n}.mat"), "Pascal Context label")))
        if "LabelMap" not in mat:
            raise DatasetError(
                f"{labels_dir / n}.mat has no 'LabelMap' (is it the full 459-class trainval set?)"
            )
        lab = mat["LabelMap"].astype(np.int64)
        Image.fromarray(np.where(lab == 0, 65535, lab - 1).astype(np.uint16)).save(
            within(full_out, f"{n}.tif")
        )
        Image.fromarray(lut59[np.clip(lab, 0, len(lut59) - 1)]).save(within(small_out, f"{n}.png"))
    return out


# --- ADE20K-full (847 classes) ---------------------------------------------------------------------

# Full-ADE class ids of a few of the 847 classes, as Mask2Former's ADE20K-full registration numbers
# them (facts). They fix how `objectnames` positions in index_ade20k.pkl translate into the class
# values of the *_seg.png files, and reject an index from another ADE20K release.
ADE_FULL_ANCHORS = {
    "wall": 2978,
    "building, edifice": 312,
    "sky": 2420,
    "tree": 2855,
    "airplane, aeroplane, plane": 14,
    "air conditioner, air conditioning": 10,
}


def _plain_dtype(dtype) -> np.dtype:
    """``dtype`` if it holds plain values (numbers, strings, booleans), else an UnpicklingError: an
    object or void dtype lets a pickle forge pointers that crash the process when the array is read.
    """
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind in "OV" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"arrays of dtype {dtype} are not allowed in a dataset index")
    return dtype


class _PlainArray(np.ndarray):
    """What numpy's pickled arrays are rebuilt into: their state (dtype, data) is checked before
    numpy reads it. Converted back to plain arrays after loading.
    """

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5:
            raise pickle.UnpicklingError("malformed array in the dataset index")
        _plain_dtype(state[2])
        if not isinstance(state[4], (bytes, bytearray)):
            raise pickle.UnpicklingError("array data in the dataset index must be raw bytes")
        super().__setstate__(state)


def _reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"{cls} arrays are not allowed in a dataset index")
    return np.ndarray.__new__(_PlainArray, shape, _plain_dtype(dtype))


def _scalar(dtype, data=b""):
    dtype = _plain_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed scalar in the dataset index")
    return np.frombuffer(data, dtype=dtype)[0]


def _frombuffer(buffer, dtype, shape, order):
    """Numpy's protocol-5 array reconstruction, for plain dtypes only."""
    dtype = _plain_dtype(dtype)
    if not isinstance(buffer, (bytes, bytearray, memoryview, pickle.PickleBuffer)) or order not in ("C", "F"):
        raise pickle.UnpicklingError("malformed array in the dataset index")
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy()


def _latin1_bytes(text, encoding="latin1"):
    """Protocol 2's spelling of a bytes object: ``_codecs.encode(str, 'latin1')``, nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("only latin-1 byte strings are allowed in a dataset index")
    return text.encode("latin1")


def _plain(obj):
    """The loaded index with every checked array turned back into a plain ndarray."""
    if isinstance(obj, _PlainArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


class _IndexUnpickler(pickle.Unpickler):
    """Reads index_ade20k.pkl without running code: only builtin containers and numpy arrays /
    scalars of plain dtypes may be rebuilt (a pickle can otherwise call any importable function,
    and an object dtype would let it forge pointers).
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("_codecs", "encode"): _latin1_bytes,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("collections", "OrderedDict"): dict,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset index")
        return self.ALLOWED[(module, name)]


def load_ade_full_index(path: str | Path) -> dict:
    """index_ade20k.pkl (ADE20K_2021_17_01) -> dict with at least ``folder``, ``filename``, ``objectnames``."""
    path = _need(Path(path), "ADE20K-full index (index_ade20k.pkl from ADE20K_2021_17_01.zip)")
    try:
        with open(path, "rb") as f:
            index = _plain(_IndexUnpickler(f).load())
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError) as err:
        raise DatasetError(f"cannot read {path}: {err}; re-download ADE20K_2021_17_01") from err
    missing = [k for k in ("folder", "filename", "objectnames") if k not in index]
    if not isinstance(index, dict) or missing:
        raise DatasetError(f"{path} is not ADE20K_2021_17_01's index (no {missing})")
    return index


def _norm_name(name: str) -> str:
    return ", ".join(p.strip() for p in str(name).lower().split(",") if p.strip())


def ade_full_id_map(objectnames: list[str]) -> np.ndarray:
    """LUT over full-ADE class values (as decoded from *_seg.png) -> 847-class train id or 65535.

    The 847 classes are matched by name (``ade20k_847.txt``, in train-id order) to the index's
    ``objectnames``; :data:`ADE_FULL_ANCHORS` fix the offset between a name's position and its class
    value. A name that is missing or appears twice in the index is an error listing them all.
    """
    positions: dict[str, list[int]] = {}
    for i, n in enumerate(objectnames):
        positions.setdefault(_norm_name(n), []).append(i)
    offsets = {
        ADE_FULL_ANCHORS[n] - positions[n][0] for n in ADE_FULL_ANCHORS if len(positions.get(n, [])) == 1
    }
    if len(offsets) != 1:
        raise DatasetError(
            "index_ade20k.pkl does not number its classes like ADE20K_2021_17_01 (anchor classes "
            f"{sorted(ADE_FULL_ANCHORS)} give offsets {sorted(offsets)}); use the 2021_17_01 release"
        )
    offset = offsets.pop()
    names = [", ".join(n) for n in _plain_vocab("ade20k_847.txt").names]
    problems, lut = [], np.full(len(objectnames) + offset + 1, 65535, dtype=np.uint16)
    for train_id, name in enumerate(names):
        found = positions.get(_norm_name(name), [])
        if len(found) != 1:
            problems.append(f"{name!r} ({'missing' if not found else f'{len(found)} entries'})")
            continue
        lut[found[0] + offset] = train_id
    if problems:
        raise DatasetError(
            f"{len(problems)} of the 847 ADE20K-full classes cannot be matched to index_ade20k.pkl's objectnames: "
            + "; ".join(problems[:10])
            + " - is this ADE20K_2021_17_01? (please report it with the list)"
        )
    return lut


def ade_full_class_values(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K *_seg.png (H, W, 3) -> (H, W) full-ADE class values: R // 10 * 256 + G."""
    seg = seg_rgb.astype(np.int64)
    return seg[..., 0] // 10 * 256 + seg[..., 1]


def _shorter_side_to(size: int, w: int, h: int) -> tuple[int, int] | None:
    """(w, h) with the shorter side ``size`` when it is longer than that, else None (no resize)."""
    if min(w, h) <= size:
        return None
    return (size, round(h / w * size)) if w <= h else (round(w / h * size), size)


def prepare_ade20k_full(
    root: str | Path, splits: tuple[str, ...] = ("validation",), max_size: int = 512
) -> list[Path]:
    """ADE20K_2021_17_01 (``index_ade20k.pkl`` + ``images/ADE/...`` with ``*_seg.png``) ->
    ``ROOT/images_detectron2/{split}/*.jpg`` and ``ROOT/annotations_detectron2/{split}/*.tif``
    (847-class train ids 0..846 as uint16, 65535 = not one of the 847): Mask2Former's layout.

    As in the official preparation, images and labels whose shorter side exceeds ``max_size`` are
    resized to it (bilinear / nearest): the benchmark is evaluated at that resolution.
    """
    root = Path(root)
    index = load_ade_full_index(root / "index_ade20k.pkl")
    lut = ade_full_id_map(list(index["objectnames"]))
    written = []
    for split in splits:
        if split not in ADE_SPLITS:
            raise DatasetError(f"unknown ADE20K split {split!r}; use {sorted(ADE_SPLITS)}")
        img_out, lab_out = root / "images_detectron2" / split, root / "annotations_detectron2" / split
        img_out.mkdir(parents=True, exist_ok=True)
        lab_out.mkdir(parents=True, exist_ok=True)
        # File names say the split: ADE_train_00000001.jpg / ADE_val_00000001.jpg.
        todo = [
            (folder, name)
            for folder, name in zip(index["folder"], index["filename"])
            if name.split("_")[1] == ADE_SPLITS[split]
        ]
        for folder, name in tqdm(todo, desc=f"ADE20K-full {split}"):
            # `folder` starts at the release folder (ADE20K_2021_17_01/images/ADE/...).
            parts = Path(folder).parts
            rel = Path(*parts[1:]) if parts and parts[0] == root.name else Path(folder)
            image_path = _need(within(root, *rel.parts, name), "ADE20K-full image")
            seg_path = _need(image_path.with_name(image_path.stem + "_seg.png"), "ADE20K-full segmentation")
            image = load_image(image_path)
            with Image.open(seg_path) as im:
                cls = ade_full_class_values(np.asarray(im.convert("RGB")))
            if cls.shape != image.shape[:2]:
                raise DatasetError(f"{seg_path} is {cls.shape}, its image {image.shape[:2]}")
            label = lut[np.clip(cls, 0, len(lut) - 1)]
            size = _shorter_side_to(max_size, image.shape[1], image.shape[0])
            image_im, label_im = Image.fromarray(image), Image.fromarray(label)
            if size is not None:
                image_im = image_im.resize(size, Image.BILINEAR)
                label_im = label_im.resize(size, Image.NEAREST)
            image_im.save(within(img_out, name), quality=95)
            label_im.save(within(lab_out, Path(name).stem + ".tif"))
        written.append(lab_out)
    return written
