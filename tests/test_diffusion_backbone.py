import pytest
import torch

from odise_pl import weights as W

from conftest import make_backbone


def manual_unet_taps(unet, x, t, cond):
    """Reference: run the diffusers UNet block by block and record each up-block resnet's input
    (hidden state concatenated with its skip), i.e. the official extractor's output-block inputs."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    h = unet.conv_in(x)
    res = (h,)
    for down in unet.down_blocks:
        if getattr(down, "has_cross_attention", False):
            h, r = down(h, emb, encoder_hidden_states=cond)
        else:
            h, r = down(h, emb)
        res += r
    h = unet.mid_block(h, emb, encoder_hidden_states=cond)
    taps = []
    for up in unet.up_blocks:
        n = len(up.resnets)
        skips, res = res[-n:], res[:-n]
        for j, resnet in enumerate(up.resnets):
            inp = torch.cat([h, skips[-1 - j]], dim=1)
            taps.append(inp)
            h = resnet(inp, emb)
            if getattr(up, "attentions", None) is not None and len(up.attentions):
                h = up.attentions[j](h, encoder_hidden_states=cond).sample
        if up.upsamplers is not None:
            h = up.upsamplers[0](h)
    return taps


def manual_vae_encoder_taps(vae, x):
    enc = vae.encoder
    h = enc.conv_in(x)
    taps = []
    for down in enc.down_blocks:
        for r in down.resnets:
            taps.append(h)
            h = r(h, None)
        if down.downsamplers is not None:
            h = down.downsamplers[0](h)
    return taps


def test_unet_taps_equal_manual_forward(tiny_backbone, tiny_text_encoder):
    bb = tiny_backbone
    torch.manual_seed(1)
    images = torch.rand(2, 3, 128, 192)
    cond = tiny_text_encoder(["a red circle", "a square"])
    feats = bb(images, cond)
    with torch.no_grad():
        latents = bb.vae.encode(images * 2 - 1).latent_dist.mean * bb.vae.config.scaling_factor
        noisy = bb.noisy_latents(latents, 0)
        ref = manual_unet_taps(bb.unet, noisy, torch.zeros(2, dtype=torch.long), cond)
    for k in (2, 5, 8, 11):
        torch.testing.assert_close(feats[f"unet_up_{k}"], ref[k], rtol=1e-5, atol=1e-5)


def test_vae_encoder_taps_equal_manual_forward(tiny_backbone):
    images = torch.rand(1, 3, 128, 128)
    feats = tiny_backbone(images, torch.zeros(1, 77, tiny_backbone.cross_attention_dim))
    with torch.no_grad():
        ref = manual_vae_encoder_taps(tiny_backbone.vae, images * 2 - 1)
    torch.testing.assert_close(feats["vae_enc_5"], ref[5])
    torch.testing.assert_close(feats["vae_enc_7"], ref[7])


def test_decoder_taps_stop_early_but_match_full_decode(tiny_backbone):
    images = torch.rand(1, 3, 128, 128)
    bb = tiny_backbone
    feats = bb(images, torch.zeros(1, 77, bb.cross_attention_dim))
    store = {}
    resnets = [r for b in bb.vae.decoder.up_blocks for r in b.resnets]
    hooks = [
        resnets[k].register_forward_pre_hook(lambda m, a, k=k: store.__setitem__(k, a[0])) for k in (2, 5)
    ]
    with torch.no_grad():
        bb.vae.decode(bb.vae.encode(images * 2 - 1).latent_dist.mean)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(feats["vae_dec_2"], store[2])
    torch.testing.assert_close(feats["vae_dec_5"], store[5])


def test_feature_info_matches_shapes_and_official_strides(tiny_backbone):
    images = torch.rand(1, 3, 256, 128)
    feats = tiny_backbone(images, torch.zeros(1, 77, tiny_backbone.cross_attention_dim))
    info = tiny_backbone.feature_info()
    assert set(info) == set(feats)
    for name, (c, stride) in info.items():
        assert feats[name].shape[1] == c
        assert 256 // feats[name].shape[-2] == stride and 128 // feats[name].shape[-1] == stride
    # The official strides: UNet output blocks 2/5/8/11 at 64/32/16/8, VAE encoder 5/7 at 4/8, decoder 2/5 at 8/4.
    assert {n: s for n, (_, s) in info.items()} == {
        "unet_up_2": 64,
        "unet_up_5": 32,
        "unet_up_8": 16,
        "unet_up_11": 8,
        "vae_enc_5": 4,
        "vae_enc_7": 8,
        "vae_dec_2": 8,
        "vae_dec_5": 4,
    }


def test_noise_is_shared_across_images_and_calls(tiny_backbone):
    lat = torch.zeros(3, 4, 16, 16)
    a = tiny_backbone.noisy_latents(lat, 500)
    b = tiny_backbone.noisy_latents(lat, 500)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], a[2])
    # Eq. 1 by hand: x_t = sqrt(1 - abar_t) * eps for x = 0.
    abar = torch.tensor(tiny_backbone.alphas_cumprod[500].item())
    eps = tiny_backbone.noise(lat.shape, lat.device, lat.dtype)
    torch.testing.assert_close(a[0], ((1 - abar).sqrt() * eps)[0])


def test_shared_noise_is_drawn_at_the_native_size_and_resized(tiny_backbone):
    # PARITY: randn(1, 4, S, S) from seed 42 (S = the UNet's sample size, 64 for SD v1), bicubic to other sizes
    s = tiny_backbone.unet.config.sample_size
    drawn = torch.randn(1, 4, s, s, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(tiny_backbone.noise((1, 4, s, s), "cpu", torch.float32), drawn, rtol=0, atol=0)
    big = tiny_backbone.noise((2, 4, 2 * s, 3 * s), "cpu", torch.float32)
    ref = torch.nn.functional.interpolate(drawn, size=(2 * s, 3 * s), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big, ref, rtol=0, atol=0)


def test_several_timesteps_concatenate_channels():
    bb = make_backbone(timesteps=(0, 100), vae_decoder_block_indices=())
    feats = bb(torch.rand(1, 3, 128, 128), torch.zeros(1, 77, bb.cross_attention_dim))
    single = make_backbone(timesteps=(100,), vae_decoder_block_indices=())
    one = single(torch.rand(1, 3, 128, 128), torch.zeros(1, 77, bb.cross_attention_dim))
    assert (
        feats["unet_up_11"].shape[1] == 2 * one["unet_up_11"].shape[1] == bb.feature_info()["unet_up_11"][0]
    )
    assert "vae_dec_2" not in feats


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="out of range"):
        make_backbone(unet_block_indices=(12,))
    with pytest.raises(ValueError, match="timesteps"):
        make_backbone(timesteps=(1000,))
    bb = make_backbone()
    with pytest.raises(ValueError, match="multiple of 64"):
        bb(torch.rand(1, 3, 100, 128), torch.zeros(1, 77, bb.cross_attention_dim))


def test_time_offset_reaches_unet(tiny_backbone):
    images = torch.rand(1, 3, 128, 128)
    cond = torch.zeros(1, 77, tiny_backbone.cross_attention_dim)
    a = tiny_backbone(images, cond)["unet_up_11"]
    b = tiny_backbone(images, cond, torch.ones(1, 1, tiny_backbone.time_embed_dim))["unet_up_11"]
    c = tiny_backbone(images, cond, torch.zeros(1, 1, tiny_backbone.time_embed_dim))["unet_up_11"]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)


def test_tiny_modes_use_the_real_classes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(W.load_unet("tiny"), UNet2DConditionModel)
    assert isinstance(W.load_vae("tiny"), AutoencoderKL)
    assert isinstance(W.load_text_encoder("tiny"), CLIPTextModel)
    assert W.count_parameters(W.load_unet("tiny")) < 2_000_000


def test_a_deep_copy_taps_its_own_modules(tiny_backbone):
    import copy

    twin = copy.deepcopy(tiny_backbone)
    images, cond = torch.rand(1, 3, 128, 128), torch.zeros(1, 77, twin.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(twin(images, cond), tiny_backbone(images, cond))
    assert tiny_backbone._store == {} and twin._store == {}
