"""Functional kernels behind the model's modules: multi-scale deformable attention.

``deform_attn``: the entry points and the choice of implementation; ``deform_attn_reference``: the
``grid_sample`` form (Deformable DETR's ``ms_deform_attn_core_pytorch``); ``deform_attn_cpu``: our
CPU kernel, one weighted gather with a hand-written backward whose derivation its docstring gives.
"""

from odise_pl.model.ops.deform_attn import (
    IMPLS,
    Impl,
    check_impl,
    ms_deform_attn,
    ms_deform_attn_from_offsets,
)

__all__ = ["IMPLS", "Impl", "check_impl", "ms_deform_attn", "ms_deform_attn_from_offsets"]
