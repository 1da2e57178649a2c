"""One CLIP pass serves the implicit captioner and the CLIP opinion when their inputs agree."""

import torch
import torch.nn.functional as F


def count_visual_calls(clip):
    calls = []
    handle = clip.model.visual.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_shared_pass_equals_separate_passes(tiny_clip):
    images = torch.rand(2, 3, 64, 96)
    ref_embed = F.normalize(tiny_clip.model.encode_image(tiny_clip.preprocess(images)), dim=-1)
    tiny_clip._shared = None
    ref_dense = tiny_clip.dense_features(images)  # no shared tokens: its own pass

    calls, handle = count_visual_calls(tiny_clip)
    embed = tiny_clip.encode_image(images)
    dense = tiny_clip.dense_features(images)
    handle.remove()
    assert len(calls) == 1
    assert torch.allclose(embed, ref_embed, atol=1e-6) and torch.allclose(dense, ref_dense, atol=1e-6)


def test_a_different_input_never_gets_stale_tokens(tiny_clip):
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    tiny_clip._shared = None
    ref = tiny_clip.dense_features(b)
    tiny_clip.encode_image(a)
    calls, handle = count_visual_calls(tiny_clip)
    dense = tiny_clip.dense_features(b)
    handle.remove()
    assert len(calls) == 1 and torch.allclose(dense, ref, atol=1e-6)
