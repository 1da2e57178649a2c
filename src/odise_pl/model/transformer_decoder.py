"""Mask2Former's masked-attention transformer decoder with ODISE's mask-embedding head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from odise_pl.model.position_encoding import PositionEmbeddingSine


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between: (..., in) -> (..., out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class _Attention(nn.Module):
    """Post-norm attention block (Mask2Former's pre_norm=False): q (B, Q, C), kv (B, S, C) -> (B, Q, C)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, query: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        out = self.attn(q, k, v, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(query + self.dropout(out))


class _FFN(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def mask_pool(features: Tensor, masks: Tensor) -> Tensor:
    """Average of ``features: (B, C, H, W)`` inside each of ``masks: (B, Q, H, W)`` (0/1) -> (B, Q, C)."""
    m = masks.flatten(2)
    area = m.sum(-1, keepdim=True)
    # features @ masks^T rather than masks @ features^T: the same sums, but the gradient for the
    # features comes out in their own (B, C, HW) layout, so adding it to the mask product's
    # gradient and the convolution backward need no transposing copy of a (B, C, H, W) tensor.
    pooled = torch.bmm(features.flatten(2), m.transpose(1, 2)).transpose(1, 2)
    return pooled / (area + 1e-8)  # PARITY: the official MaskPooling's denominator (0 for an empty mask)


class MaskedTransformerDecoder(nn.Module):
    """``multi_scale: [(B, C, h_l, w_l)] x 3`` (coarsest first), ``mask_features: (B, C, H/4, W/4)`` ->::

        pred_masks: (B, Q, H/4, W/4) logits
        mask_embed: (B, Q, D)  the mask embedding z_i, D = embed_dim (official: projection_dim = mask_dim, 256)
        pred_objectness: (B, Q, 2) logits (object, no object), only with ``objectness``
        aux_outputs: [{pred_masks, mask_embed[, pred_objectness]}] x num_layers  (learnable queries +
            all but the last layer; training only: inference computes just their attention masks)

    Masked attention, ``num_layers`` layers round-robin over the 3 scales, predictions after the
    learnable queries and after every layer (deep supervision: num_layers + 1 sets).

    Mask-embedding head (PARITY with the facts file): pixel features pooled inside each predicted
    mask (hard threshold 0.5 on the sigmoid, detached) -> LayerNorm + Linear, added to the query
    output, then LayerNorm + 3-layer MLP to ``embed_dim``.

    ``objectness``: the official caption models' binary head (``class_embed``, Linear(hidden, 2) on
    the normed query output): caption supervision has no category labels, so whether a query is
    an object is learnt as a 1-class classification (all targets "object", unmatched queries "no
    object"), and at test time it gives the no-object probability. Category models score "no
    object" with the classifier's null embedding instead and leave it off.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 9,
        dropout: float = 0.0,
        embed_dim: int = 256,
        num_levels: int = 3,
        objectness: bool = False,
    ):
        super().__init__()
        self.num_heads, self.num_layers, self.num_levels = num_heads, num_layers, num_levels
        self.embed_dim = embed_dim
        self.pe = PositionEmbeddingSine(hidden_dim // 2)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim else nn.Identity()
            for _ in range(num_levels)
        )
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.cross_attn = nn.ModuleList(_Attention(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.self_attn = nn.ModuleList(_Attention(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.ffn = nn.ModuleList(_FFN(hidden_dim, dim_feedforward, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        # ODISE's mask-embedding head.
        self.pooled_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
        self.embed_head = nn.Sequential(nn.LayerNorm(hidden_dim), MLP(hidden_dim, hidden_dim, embed_dim, 3))
        self.class_embed = nn.Linear(hidden_dim, 2) if objectness else None

    def _attention_mask(self, output: Tensor, small_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normed output (B, Q, C), mask embedding (B, Q, C)) and the next layer's attention mask
        ``(B * heads, Q, h * w)`` (True = blocked).
        """
        out = self.decoder_norm(output)
        mask_embed = self.mask_embed(out)
        # Attend only inside the predicted mask. Mask2Former resizes the full-resolution mask logits
        # (bilinear); bilinear resizing is linear, so resizing the mask features first and then
        # taking the dot product gives the same logits, at the attention level's resolution
        # instead of 1/4 of the image.
        with torch.no_grad():
            small = torch.einsum("bqc,bchw->bqhw", mask_embed.detach(), small_features)
            attn_mask = (small.flatten(2) < 0).repeat_interleave(self.num_heads, dim=0)  # sigmoid < 0.5
        return out, mask_embed, attn_mask

    def _predict_sets(
        self, heads: list[tuple[Tensor, Tensor]], mask_features: Tensor
    ) -> list[dict[str, Tensor]]:
        """``{pred_masks (B, Q, H, W), mask_embed (B, Q, D)[, pred_objectness (B, Q, 2)]}`` for each
        (normed output, mask embedding).

        All prediction sets go through one product with the mask features (K = sets x queries)
        instead of one per set: the same arithmetic, but the backward pass into ``mask_features``
        is one large matrix product rather than 2 x sets products plus as many accumulations of a
        (B, C, H/4, W/4) gradient, the largest tensor of the decoder.
        """
        n = len(heads)
        out = torch.cat([o for o, _ in heads], 1) if n > 1 else heads[0][0]
        mask_embed = torch.cat([e for _, e in heads], 1) if n > 1 else heads[0][1]
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        # sigmoid > 0.5, written straight as floats (no bool tensor of (B, sets x Q, H, W) in between)
        hard = torch.gt(masks.detach(), 0, out=masks.new_empty(masks.shape, dtype=mask_features.dtype))
        embed = self.embed_head(out + self.pooled_proj(mask_pool(mask_features, hard)))
        sets = [{"pred_masks": m, "mask_embed": e} for m, e in zip(masks.chunk(n, 1), embed.chunk(n, 1))]
        if self.class_embed is not None:
            for d, o in zip(sets, self.class_embed(out).chunk(n, 1)):
                d["pred_objectness"] = o
        return sets

    def forward(self, multi_scale: list[Tensor], mask_features: Tensor, aux: bool | None = None) -> dict:
        """``aux``: also predict the auxiliary sets (default: in training only)."""
        srcs, pos, sizes = [], [], []
        for i in range(self.num_levels):
            x = multi_scale[i]
            sizes.append(tuple(x.shape[-2:]))
            pos.append(rearrange(self.pe(x), "b c h w -> b (h w) c"))
            srcs.append(rearrange(self.input_proj[i](x), "b c h w -> b (h w) c") + self.level_embed.weight[i])
        b = mask_features.shape[0]
        with torch.no_grad():
            # CPU bilinear downsampling of an NCHW tensor copies it to channels-last first, per call:
            # one copy for the three sizes instead (same numbers, ~3x less time here).
            mf = mask_features.detach().contiguous(memory_format=torch.channels_last)
            # DIVERGES(attn-mask-resize): mask features resized before the dot product (bilinear is linear: same logits)
            small = [F.interpolate(mf, size=s, mode="bilinear", align_corners=False) for s in sizes]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        output = self.query_feat.weight[None].expand(b, -1, -1)
        # Auxiliary prediction sets feed the deep-supervision losses only: skipped outside training.
        full = self.training if aux is None else aux
        heads = []
        out, mask_embed, attn_mask = self._attention_mask(output, small[0])
        if full:
            heads.append((out, mask_embed))
        for i in range(self.num_layers):
            lvl = i % self.num_levels
            # A query whose mask is empty everywhere attends to everything (else softmax over nothing).
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.cross_attn[i](
                output + query_pos, srcs[lvl] + pos[lvl], srcs[lvl], output, attn_mask
            )
            output = self.self_attn[i](output + query_pos, output + query_pos, output, output)
            output = self.ffn[i](output)
            if i < self.num_layers - 1:
                out, mask_embed, attn_mask = self._attention_mask(output, small[(i + 1) % self.num_levels])
                if full:
                    heads.append((out, mask_embed))
        out = self.decoder_norm(output)
        heads.append((out, self.mask_embed(out)))
        preds = self._predict_sets(heads, mask_features)
        result = preds[-1]
        if full:
            result["aux_outputs"] = preds[:-1]
        return result
