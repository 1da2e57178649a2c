"""Converters from what annotation tools export into the COCO panoptic layout our readers take."""

from odise_pl.data.convert.instances import convert_instances
from odise_pl.data.convert.semantic import convert_semantic

__all__ = ["convert_instances", "convert_semantic"]
