"""ADE20K-full (847 classes, ``ADE20K_2021_17_01``) -> Mask2Former's uint16 TIFF labels, through a
restricted unpickler of ``index_ade20k.pkl``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from odise_pl.data.io import load_image
from odise_pl.data.prepare.ade20k import ADE_SPLITS
from odise_pl.data.prepare.common import need, plain_vocab, within
from odise_pl.errors import DatasetError
from odise_pl.fs import check_writable_dir

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
    path = need(Path(path), "ADE20K-full index (index_ade20k.pkl from ADE20K_2021_17_01.zip)")
    try:
        with open(path, "rb") as f:
            index = _plain(_IndexUnpickler(f).load())
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, TypeError) as err:
        raise DatasetError(f"cannot read {path}: {err}; re-download ADE20K_2021_17_01") from err
    if not isinstance(index, dict):
        raise DatasetError(
            f"{path} is not ADE20K_2021_17_01's index (its top level is a {type(index).__name__}, not a "
            "dict); re-download ADE20K_2021_17_01"
        )
    missing = [k for k in ("folder", "filename", "objectnames") if k not in index]
    if missing:
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
    names = [", ".join(n) for n in plain_vocab("ade20k_847.txt").names]
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
    root = check_writable_dir(
        need(Path(root), "ADE20K_2021_17_01 folder (holding index_ade20k.pkl)")
    )  # outputs go here: before the work
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
        for folder, name in tqdm(todo, desc=f"ADE20K-full {split}", unit="image"):
            # `folder` starts at the release folder (ADE20K_2021_17_01/images/ADE/...).
            parts = Path(folder).parts
            rel = Path(*parts[1:]) if parts and parts[0] == root.name else Path(folder)
            image_path = need(within(root, *rel.parts, name), "ADE20K-full image")
            seg_path = need(image_path.with_name(image_path.stem + "_seg.png"), "ADE20K-full segmentation")
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
