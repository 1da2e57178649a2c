import pytest

from odise_pl import weights as W


def test_missing_sd_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-sd"
    missing.mkdir()
    with pytest.raises(W.WeightsNotFoundError) as err:
        W.load_unet("pretrained", str(missing))
    msg = str(err.value)
    assert "UNet2DConditionModel" in msg and str(missing) in msg and "weights.sd_source=" in msg


def test_missing_hub_weights_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(W.WeightsNotFoundError, match="weights.mode=random"):
        W.load_vae("pretrained", "someone/not-a-cached-model")


def test_missing_open_clip_weights(tmp_path):
    with pytest.raises(W.WeightsNotFoundError) as err:
        W.load_open_clip("pretrained", "ViT-B-32", str(tmp_path / "missing.bin"))
    assert "ViT-B-32" in str(err.value) and "weights.clip_pretrained=" in str(err.value)


def test_unknown_mode():
    with pytest.raises(ValueError, match="weights mode"):
        W.load_unet("huge")


def test_frozen_models_have_no_grad():
    for m in (W.load_unet("tiny"), W.load_vae("tiny"), W.load_text_encoder("tiny"), W.load_open_clip("tiny")):
        assert not any(p.requires_grad for p in m.parameters()) and not m.training
