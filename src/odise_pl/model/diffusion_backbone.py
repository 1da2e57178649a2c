"""Frozen latent diffusion backbone: image + conditioning -> named internal features (Sec. 3.3)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, nullcontext

import torch
from torch import Tensor, nn


class DiffusionBackbone(nn.Module):
    """Frozen SD v1.x VAE + UNet, tapped with forward pre-hooks.

    ``images: (B, 3, H, W) in [0, 1]``, ``cond: (B, L, C)``, optional ``time_offset: (B, T)``
    -> ``dict[str, Tensor]``, e.g. ``unet_up_11: (B, C, H/8, W/8)``, ``vae_enc_5: (B, C, H/4, W/4)``.

    Taps (PARITY with the official extractor): the input of UNet output block k, which in
    diffusers is what a pre-hook on ``up_blocks[k // n].resnets[k % n]`` receives after the skip
    concatenation (n resnets per up block, 3 in SD v1); the inputs of VAE encoder resnets counted
    across levels in order; the inputs of VAE decoder resnets counted from the lowest resolution.

    Args:
        unet, vae: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``.
        scheduler: diffusers DDPM scheduler; its ``alphas_cumprod`` noises latents (Eq. 1).
        unet_block_indices: UNet output blocks to tap (official: 2, 5, 8, 11: every third).
        vae_encoder_block_indices / vae_decoder_block_indices: VAE resnets to tap (official 5, 7 / 2, 5);
            empty to skip. With no decoder taps the VAE decoder is not run at all.
        timesteps: diffusion steps t; several run the UNet once each and concatenate the UNet
            features along channels (supplement's multi-step ablation). Default (0,).
        noise_seed: seed of the one noise tensor shared by all images (official: fixed at start-up).

    """

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        scheduler,
        unet_block_indices: Sequence[int] = (2, 5, 8, 11),
        vae_encoder_block_indices: Sequence[int] = (5, 7),
        vae_decoder_block_indices: Sequence[int] = (2, 5),
        timesteps: Sequence[int] = (0,),
        noise_seed: int = 0,
    ):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer(
            "alphas_cumprod", torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32), persistent=False
        )
        self.timesteps = tuple(int(t) for t in timesteps)
        if not self.timesteps:
            raise ValueError("timesteps must name at least one diffusion step, e.g. [0]")
        n_train = len(self.alphas_cumprod)
        if any(not 0 <= t < n_train for t in self.timesteps):
            raise ValueError(f"timesteps {self.timesteps} must lie in [0, {n_train})")
        self.noise_seed = int(noise_seed)
        self._noise_cache: dict[tuple, Tensor] = {}

        self._unet_taps = self._resolve(
            "unet_up", unet_block_indices, [r for b in unet.up_blocks for r in b.resnets], "UNet output"
        )
        self._enc_taps = self._resolve(
            "vae_enc",
            vae_encoder_block_indices,
            [r for b in vae.encoder.down_blocks for r in b.resnets],
            "VAE encoder",
        )
        self._dec_taps = self._resolve(
            "vae_dec",
            vae_decoder_block_indices,
            [r for b in vae.decoder.up_blocks for r in b.resnets],
            "VAE decoder",
        )
        self._store: dict[str, Tensor] = {}
        self._time_offset: Tensor | None = None
        for name, module in {**self._unet_taps, **self._enc_taps, **self._dec_taps}.items():
            module.register_forward_pre_hook(self._make_hook(name))
        # The implicit captioner's learned offset is added to the UNet's time embedding output.
        unet.time_embedding.register_forward_hook(self._add_time_offset)
        self.eval()

    # -- construction helpers ---------------------------------------------------------------
    @staticmethod
    def _resolve(
        prefix: str, indices: Sequence[int], modules: list[nn.Module], what: str
    ) -> dict[str, nn.Module]:
        out = {}
        for k in indices:
            if not 0 <= k < len(modules):
                raise ValueError(f"{what} block index {k} out of range: this model has {len(modules)} blocks")
            out[f"{prefix}_{k}"] = modules[k]
        return out

    def _make_hook(self, name: str):
        def hook(_module, args):
            # Overwritten each call, so a re-run (e.g. gradient checkpointing) cannot double-store.
            self._store[name] = args[0]

        return hook

    def _add_time_offset(self, _module, _args, output):
        if self._time_offset is None:
            return output
        return output + self._time_offset.to(output.dtype)

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    # -- shapes, derived from the modules' configs ------------------------------------------
    @property
    def vae_stride(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_divisibility(self) -> int:
        """Inputs must be a multiple of this (the coarsest UNet level): 64 for SD v1."""
        return self.vae_stride * 2 ** (len(self.unet.up_blocks) - 1)

    @property
    def time_embed_dim(self) -> int:
        return int(self.unet.time_embedding.linear_2.out_features)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def feature_info(self) -> dict[str, tuple[int, int]]:
        """Name -> (channels, stride w.r.t. the input image), without running the model."""
        info = {}
        n_up = len(self.unet.up_blocks)
        per_up = len(self.unet.up_blocks[0].resnets)
        for name, m in self._unet_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (
                m.in_channels * len(self.timesteps),
                self.vae_stride * 2 ** (n_up - 1 - k // per_up),
            )
        per_down = len(self.vae.encoder.down_blocks[0].resnets)
        for name, m in self._enc_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (m.in_channels, 2 ** (k // per_down))
        per_dec = len(self.vae.decoder.up_blocks[0].resnets)
        for name, m in self._dec_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (m.in_channels, self.vae_stride // 2 ** (k // per_dec))
        return info

    # -- forward --------------------------------------------------------------------------------
    def noise(self, latent_shape: tuple[int, ...], device, dtype) -> Tensor:
        """(1, C, h, w) standard normal, the same for every image and every call."""
        key = tuple(latent_shape[1:])
        if key not in self._noise_cache:
            gen = torch.Generator().manual_seed(self.noise_seed)
            with torch.inference_mode(False):  # reused by training steps after a validation filled it
                self._noise_cache[key] = torch.randn((1, *key), generator=gen)
        return self._noise_cache[key].to(device=device, dtype=dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8); fires the VAE taps."""
        with torch.no_grad():
            posterior = self.vae.encode(images * 2 - 1).latent_dist
            z = posterior.mean  # PARITY: deterministic posterior mean, not a sample
            if self._dec_taps:
                self._decode_until_last_tap(z)
        return z * self.vae.config.scaling_factor

    def _decode_until_last_tap(self, z: Tensor) -> None:
        # The decoder output itself is never used: stop right after the last tapped resnet has
        # fired by raising from a pre-hook on the module that follows it.
        last = max(int(n.rsplit("_", 1)[1]) for n in self._dec_taps)
        resnets = [r for b in self.vae.decoder.up_blocks for r in b.resnets]
        if last + 1 >= len(resnets):
            self.vae.decode(z)
            return

        class _Stop(Exception):
            pass

        def stop(_m, _a):
            raise _Stop

        handle = resnets[last + 1].register_forward_pre_hook(stop)
        try:
            self.vae.decode(z)
        except _Stop:
            pass
        finally:
            handle.remove()

    def noisy_latents(self, latents: Tensor, t: int) -> Tensor:
        """Eq. 1: sqrt(a_t) x + sqrt(1 - a_t) eps with the shared eps."""
        # In fp32 whatever the latents' dtype: in bf16, alpha_bar_0 = 0.99915 rounds to 1 and the
        # noise term (sqrt(1 - a) = 0.029) would vanish.
        a = self.alphas_cumprod[t].float()
        eps = self.noise(latents.shape, latents.device, torch.float32)
        return (a.sqrt() * latents.float() + (1 - a).sqrt() * eps).to(latents.dtype)

    def forward(self, images: Tensor, cond: Tensor, time_offset: Tensor | None = None) -> dict[str, Tensor]:
        """See class docstring. Gradients flow to ``cond`` / ``time_offset`` only."""
        div = self.size_divisibility
        if images.shape[-1] % div or images.shape[-2] % div:
            raise ValueError(
                f"backbone input {tuple(images.shape[-2:])} must be a multiple of {div}; pad first"
            )
        self._store = {}
        latents = self.encode(images)
        feats = {name: self._store[name] for name in (*self._enc_taps, *self._dec_taps)}
        needs_grad = torch.is_grad_enabled() and (
            cond.requires_grad or (time_offset is not None and time_offset.requires_grad)
        )
        unet_feats: dict[str, list[Tensor]] = {name: [] for name in self._unet_taps}
        with ExitStack() as stack:
            stack.enter_context(nullcontext() if needs_grad else torch.no_grad())
            self._time_offset = time_offset
            try:
                for t in self.timesteps:
                    tt = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
                    self.unet(
                        self.noisy_latents(latents, t), tt, encoder_hidden_states=cond.to(latents.dtype)
                    )
                    for name in self._unet_taps:
                        unet_feats[name].append(self._store[name])
            finally:
                self._time_offset = None
        for name, parts in unet_feats.items():
            feats[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        self._store = {}
        return feats
