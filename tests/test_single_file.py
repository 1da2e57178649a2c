"""`weights.sd_source=/path/to/sd-v1-3.ckpt`: Stable Diffusion v1 from the original single-file release.

The fixture is written here in the original latent-diffusion layout from tiny diffusers /
transformers models, by the inverse of the key mapping (the layout of CompVis' ``ldm`` modules, as
diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py`` documents it), written
independently of the forward mapping under test (diffusers' ``single_file_utils``).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from odise_pl import single_file, weights
from odise_pl.errors import WeightsNotFoundError

# -- the latent-diffusion layout, from diffusers names ------------------------------------------------

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_prefixes() -> dict[str, str]:
    out = {}
    for i in range(4):
        for j in range(2):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{3 * i + j + 1}.0."
            if i < 3:
                out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{3 * i + j + 1}.1."
        for j in range(3):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{3 * i + j}.0."
            if i > 0:
                out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{3 * i + j}.1."
        if i < 3:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{3 * (i + 1)}.0.op."
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."
    out["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        out[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return out


def unet_to_ldm(state: dict) -> dict:
    prefixes = _unet_prefixes()
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in _UNET_TOP.items():
            if new.startswith(hf):
                new = sd + new[len(hf) :]
        for hf, sd in prefixes.items():
            if new.startswith(hf):
                rest = new[len(hf) :]
                if "resnets" in hf:
                    for a, b in _RESNET.items():
                        rest = rest.replace(a, b) if rest.startswith(a) else rest
                new = sd + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict) -> dict:
    prefixes = {}
    for i in range(4):
        for j in range(2):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < 3:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{3 - i}.upsample."
        for j in range(3):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{3 - i}.block.{j}."
    for side in ("encoder", "decoder"):
        for j in range(2):
            prefixes[f"{side}.mid_block.resnets.{j}."] = f"{side}.mid.block_{j + 1}."
        prefixes[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        prefixes[f"{side}.conv_norm_out."] = f"{side}.norm_out."
    attn = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
    out = {}
    for key, value in state.items():
        new = key
        for hf, sd in prefixes.items():
            if new.startswith(hf):
                rest = new[len(hf) :].replace("conv_shortcut.", "nin_shortcut.")
                if "attentions" in hf:
                    for a, b in attn.items():
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                    if rest.endswith("weight") and value.ndim == 2:  # ldm: 1x1 convolutions
                        value = value[:, :, None, None]
                new = sd + rest
                break
        out["first_stage_model." + new] = value
    return out


def text_to_ldm(state: dict) -> dict:
    # SD v1 was saved with transformers 4's CLIPTextModel: its modules under `text_model.`
    return {"cond_stage_model.transformer.text_model." + k: v for k, v in state.items()}


@pytest.fixture
def tiny_sd(monkeypatch):
    """The tiny models, and SD v1's architecture made tiny so that a file of their size loads."""
    torch.manual_seed(0)
    models = {
        "unet": weights.load_unet("tiny"),
        "vae": weights.load_vae("tiny"),
        "text_encoder": weights.load_text_encoder("tiny"),
    }
    for full, tiny in (("SD_V1_UNET", "TINY_UNET"), ("SD_V1_VAE", "TINY_VAE"), ("SD_V1_TEXT", "TINY_TEXT")):
        monkeypatch.setattr(weights, full, getattr(weights, tiny))
    return models


def _ldm_state(models: dict) -> dict:
    return {
        **unet_to_ldm(models["unet"].state_dict()),
        **vae_to_ldm(models["vae"].state_dict()),
        **text_to_ldm(models["text_encoder"].state_dict()),
        "betas": torch.linspace(0, 1, 10),  # the schedule buffers an ldm checkpoint also holds
    }


class LightningCallbackStub:
    """Stands for what the original .ckpt stores beside the weights (Lightning's callback states)."""


def _load_all(path: str) -> dict:
    return {
        "unet": weights.load_unet("pretrained", path),
        "vae": weights.load_vae("pretrained", path),
        "text_encoder": weights.load_text_encoder("pretrained", path),
    }


def _assert_equal_models(loaded: dict, models: dict) -> None:
    for name, model in models.items():
        ours, theirs = loaded[name].state_dict(), model.state_dict()
        assert set(ours) == set(theirs), name
        for k in theirs:
            assert torch.equal(ours[k], theirs[k]), (name, k)
        assert not any(p.requires_grad for p in loaded[name].parameters())  # frozen


def test_the_original_ckpt_layout_loads_every_weight(tiny_sd, tmp_path):
    """A Lightning-pickled .ckpt with the weights under `state_dict`, a foreign object beside them
    (read as an inert placeholder) and the UNet's EMA copy (not used, as officially)."""
    state = _ldm_state(tiny_sd)
    ema = {
        "model_ema." + k.removeprefix("model.diffusion_model.").replace(".", ""): torch.zeros_like(v)
        for k, v in state.items()
        if k.startswith("model.diffusion_model.")
    }
    path = tmp_path / "sd-v1-3.ckpt"
    torch.save(
        {"state_dict": {**state, **ema}, "global_step": 470000, "callbacks": {"cb": LightningCallbackStub()}},
        path,
    )
    _assert_equal_models(_load_all(str(path)), tiny_sd)
    # the three models took their parts: nothing of the file stays in memory
    assert not single_file._cache


def test_a_safetensors_file_of_the_same_layout_loads(tiny_sd, tmp_path):
    path = tmp_path / "sd-v1-3.safetensors"
    save_file({k: v.contiguous() for k, v in _ldm_state(tiny_sd).items()}, str(path))
    loaded = _load_all(str(path))
    _assert_equal_models(loaded, tiny_sd)
    # same features as the diffusers models themselves
    x = torch.randn(1, 4, 16, 16)
    cond = torch.randn(1, 77, 32)
    t = torch.tensor([10])
    torch.testing.assert_close(
        loaded["unet"](x, t, cond).sample, tiny_sd["unet"](x, t, cond).sample, rtol=0, atol=0
    )


def test_code_named_by_the_file_never_runs(tiny_sd, tmp_path):
    class Hostile:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'MARKER')!r}, 'w').write('ran')",))

    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": _ldm_state(tiny_sd), "extra": Hostile()}, path, pickle_protocol=2)
    # the file's `exec` is an inert placeholder: the weights load, nothing runs
    _assert_equal_models(_load_all(str(path)), tiny_sd)
    assert not (tmp_path / "MARKER").exists()
    # ... and this is what unpickling the object the file holds does
    pickle.loads(pickle.dumps(Hostile()))
    assert (tmp_path / "MARKER").read_text() == "ran"


def test_missing_file_and_wrong_contents_are_clear_errors(tiny_sd, tmp_path):
    with pytest.raises(
        WeightsNotFoundError, match=r"not found: .*sd-v1-3.ckpt[\s\S]*weights.sd_source=/path/to/sd-v1-3.ckpt"
    ):
        weights.load_unet("pretrained", str(tmp_path / "sd-v1-3.ckpt"))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(WeightsNotFoundError, match="no diffusion UNet weights.*model.diffusion_model"):
        weights.load_unet("pretrained", str(other))
    # an SD checkpoint of other shapes (here: a UNet 2x wider) names what does not fit
    single_file._cache.clear()
    wide = tmp_path / "wide.safetensors"
    state = _ldm_state(tiny_sd)
    state = {
        k: (torch.cat([v, v]) if k.endswith("conv_in.weight") or k.endswith("input_blocks.0.0.weight") else v)
        for k, v in state.items()
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(wide))
    with pytest.raises(
        WeightsNotFoundError, match=r"do not fit Stable Diffusion v1.x.*shape 1 \(e.g. conv_in.weight"
    ):
        weights.load_unet("pretrained", str(wide))
