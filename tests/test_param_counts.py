"""Full-size parameter counts in `random` mode against the paper (slow: builds 1.5B parameters)."""

import pytest

from odise_pl import weights as W

pytestmark = pytest.mark.slow


def test_frozen_total_within_2_percent_of_paper():
    counts = {
        "unet": W.count_parameters(W.load_unet("random")),
        "vae": W.count_parameters(W.load_vae("random")),
        "sd_text": W.count_parameters(W.load_text_encoder("random")),
        "clip_vit_l14_336": W.count_parameters(W.load_open_clip("random", "ViT-L-14-336")),
    }
    total = sum(counts.values())
    print({k: f"{v / 1e6:.2f}M" for k, v in counts.items()}, f"total {total / 1e6:.2f}M (paper 1493.8M)")
    assert abs(total - 1493.8e6) / 1493.8e6 < 0.02
    assert abs(counts["unet"] - 859.5e6) / 859.5e6 < 0.001  # SD v1's published UNet size
