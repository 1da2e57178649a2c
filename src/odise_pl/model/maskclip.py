"""MaskCLIP (Ding et al. 2022) on an open_clip ViT: one class token per mask that only sees its mask.

PARITY with the official ``MaskCLIP`` (``odise/modeling/meta_arch/clip.py``). There, Q copies of the
class token (after ``ln_pre``) are put in front of the ViT's ``[class, patches]`` tokens and one
attention mask is applied in every layer: no token attends to a mask token (a mask token not even to
itself), and mask token q attends only to the class token and to the patches its mask covers. The
image's own tokens are therefore exactly those of a plain forward pass.

We compute the same thing without the (Q + 1 + N)^2 attention: the image tokens run their usual
layers, and in each layer the Q mask tokens attend to that layer's keys / values of the image
tokens, restricted by a (Q, 1 + N) mask. Same values (tested against the official code's outputs in
``tests/test_official_parity.py``), and cheaper: the image tokens never pay for the mask tokens, and
the image tokens' keys and values serve both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def patch_visibility(
    mask_logits: Tensor, image_size: tuple[int, int], patch: int, threshold: float = 0.5
) -> Tensor:
    """Mask logits (B, Q, h, w) at any size -> (B, Q, g_h * g_w) bool: True where the mask token may
    attend to the patch.

    PARITY: the logits are resized (bilinear) to CLIP's input size, passed through a sigmoid and
    max-pooled over each patch; a patch is visible when the pooled value is >= ``threshold``
    (official: masked where < 0.5). A mask with any pixel above the threshold keeps a patch.
    """
    m = F.interpolate(mask_logits, size=image_size, mode="bilinear", align_corners=False).sigmoid()
    return (F.max_pool2d(m, kernel_size=patch, stride=patch) >= threshold).flatten(2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return rearrange(x, "b n (h c) -> b h n c", h=heads)


# DIVERGES(maskclip-attention): image tokens run their layers once; the Q mask tokens attend to their keys / values (README table)
def mask_token_embeddings(visual: nn.Module, pixels: Tensor, visible: Tensor) -> Tensor:
    """``pixels: (B, 3, S, S)`` normalised CLIP input, ``visible: (B, Q, N)`` -> ``(B, Q, D)``: each mask
    token's output after ``ln_post`` and the projection (raw, not normalised).

    ``visual``: an open_clip ``VisionTransformer`` (conv1, class_embedding, positional_embedding,
    ln_pre, transformer.resblocks with ``nn.MultiheadAttention``, ln_post, proj).
    """
    blocks = visual.transformer.resblocks
    if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
        raise NotImplementedError(
            f"MaskCLIP needs an open_clip ViT with standard attention blocks; {type(visual).__name__} differs. "
            "Use an OpenAI-style ViT CLIP (e.g. ViT-L-14-336), or model.predictor.clip_side=pooling"
        )
    x = rearrange(visual.conv1(pixels.to(visual.conv1.weight.dtype)), "b w gh gw -> b (gh gw) w")
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    b, q = visible.shape[:2]
    tokens = x[:, :1].expand(b, q, -1)  # the mask tokens start as copies of the class token
    # (B, 1, Q, 1 + N): the class token is always visible, so no row is empty
    attend = torch.cat([visible.new_ones(b, q, 1), visible.to(torch.bool)], dim=2)[:, None]
    for block in blocks:
        attn: nn.MultiheadAttention = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        h = block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        q_img, k, v = (_split_heads(t, heads) for t in qkv.split(width, dim=-1))
        q_mask = _split_heads(
            F.linear(block.ln_1(tokens), attn.in_proj_weight[:width], attn.in_proj_bias[:width]), heads
        )
        img_out = F.scaled_dot_product_attention(q_img, k, v)
        mask_out = F.scaled_dot_product_attention(q_mask, k, v, attn_mask=attend)
        img_out, mask_out = (attn.out_proj(rearrange(o, "b h n c -> b n (h c)")) for o in (img_out, mask_out))
        x = x + block.ls_1(img_out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        tokens = tokens + block.ls_1(mask_out)
        tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
    out = visual.ln_post(tokens)
    return out @ visual.proj if visual.proj is not None else out
