"""Convert official dataset downloads into what the readers need (Mask2Former / ODISE conventions),
one module per dataset; the command lines are in ``scripts/prepare_*.py``.

* :mod:`.ade20k` (``ADEChallengeData2016``): panoptic PNG + JSON from the semantic (150 classes) and
  instance (100 thing classes: R = class, G = instance) annotations, and ``annotations_detectron2``
  semantic labels (label - 1, 0 -> 255).
* :mod:`.pascal_voc` (VOC 2012): ``SegmentationClass`` palette PNGs (0..20, 255 border) -> 8-bit label PNGs.
* :mod:`.pascal_context` (VOC2010 + the full ``trainval/*.mat`` labels, 1..459): 459-class TIFFs
  (label - 1, unlabelled -> 65535) and 59-class PNGs (the 59 common classes by name, others -> 255).
* :mod:`.ade20k_full` (``ADE20K_2021_17_01``): 847-class uint16 TIFFs (65535 = other) from
  ``*_seg.png`` (class = R // 10 * 256 + G) through the index's class names; shorter side resized to 512.

Every path built from an index or split list stays inside its folder (:func:`.common.within`).
"""

from odise_pl.data.prepare.ade20k import prepare_ade20k
from odise_pl.data.prepare.ade20k_full import prepare_ade20k_full
from odise_pl.data.prepare.pascal_context import prepare_pascal_context
from odise_pl.data.prepare.pascal_voc import prepare_pascal_voc

__all__ = ["prepare_ade20k", "prepare_ade20k_full", "prepare_pascal_context", "prepare_pascal_voc"]
