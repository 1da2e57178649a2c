"""Frozen latent diffusion backbone: image + conditioning -> named internal features (Sec. 3.3)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odise_pl.model.precision import dtype_of


class DiffusionBackbone(nn.Module):
    """Frozen latent-diffusion VAE + UNet (SD v1.x, 2.x, SDXL, or a fine-tuned UNet of one of
    them), tapped with forward pre-hooks.

    ``images: (B, 3, H, W) in [0, 1]``, ``cond: (B, L, C)``, optional ``time_offset: (B, T, C_t)``
    (row i is added to the UNet's time embedding for the i-th of the T ``timesteps``)
    -> ``dict[str, Tensor]``, e.g. ``unet_up_11: (B, C, H/8, W/8)``, ``vae_enc_5: (B, C, H/4, W/4)``.

    Taps (PARITY with the official extractor): the input of UNet output block k, which in
    diffusers is what a pre-hook on ``up_blocks[k // n].resnets[k % n]`` receives after the skip
    concatenation (n resnets per up block, 3 in SD v1); the inputs of VAE encoder resnets counted
    across levels in order; the inputs of VAE decoder resnets counted from the lowest resolution.

    Args:
        unet, vae: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``.
        scheduler: diffusers DDPM scheduler; its ``alphas_cumprod`` noises latents (Eq. 1).
        unet_block_indices: UNet output blocks to tap (official: 2, 5, 8, 11: every third), or
            ``auto``: the last output block of each resolution level, read from the UNet's own
            structure (SD v1 / 2.x: 2, 5, 8, 11, the official taps; SDXL, three levels of three
            blocks: 2, 5, 8, at 1/32, 1/16 and 1/8 of the image).
        vae_encoder_block_indices / vae_decoder_block_indices: VAE resnets to tap (official 5, 7 / 2, 5);
            empty to skip. With no decoder taps the VAE decoder is not run at all.
        timesteps: diffusion steps t; several run the UNet once each and concatenate the UNet
            features along channels (supplement's multi-step ablation). Default (0,).
        noise_seed: seed of the one noise tensor shared by all images. PARITY: seed 42, drawn at the
            UNet's native latent size (64 x 64 for SD v1) and bicubic-resized to other latent sizes;
            regenerated at start-up, never saved.
        noise_size: (h, w) the noise is drawn at (default: the UNet's ``sample_size``).
        dtype: ``None`` (as loaded) | ``fp32`` | ``bf16`` | ``fp16``: the frozen UNet / VAE weights' dtype. bf16 halves their
            memory (944M parameters: 3.8 GB in fp32) and is how GPUs run them fastest; the features
            come out in that dtype under autocast and in fp32 otherwise. The noise schedule stays
            float64 whatever this is. Within the tolerance of bf16 autocast (tests/test_optimised_inference.py).
        channels_last: the frozen convolutions in NHWC memory order (faster convolutions on GPUs and
            oneDNN CPUs; exact to rounding).
        gradient_checkpointing: recompute the UNet's blocks in the backward pass instead of keeping
            their activations (diffusers' own checkpointing). Gradients reach the implicit
            captioner through the UNet, so training keeps every UNet activation of every window:
            this is what lets batch 8 at 1024^2 (32 windows) fit on one GPU. Same gradients (tested).
        compile: ``torch.compile`` the UNet and the VAE encoder (inductor; the taps are traced with
            them). Equal to rounding (tested, slow suite). Off by default: on CPU it did not pay
            (``benchmarks/bench_compile.py``) and the first call compiles for minutes; the GPU
            measurement (``benchmarks/gpu/run.sh``) says whether it pays there.

    """

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        scheduler,
        unet_block_indices: Sequence[int] | str = (2, 5, 8, 11),
        vae_encoder_block_indices: Sequence[int] = (5, 7),
        vae_decoder_block_indices: Sequence[int] = (2, 5),
        timesteps: Sequence[int] = (0,),
        noise_seed: int = 42,
        noise_size: Sequence[int] | None = None,
        dtype: str | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.set_execution(dtype=dtype, channels_last=channels_last or None, compile=compile)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.register_buffer("alphas_cumprod", alphas_cumprod(scheduler), persistent=False)
        self.timesteps = tuple(int(t) for t in timesteps)
        if not self.timesteps:
            raise ValueError("timesteps must name at least one diffusion step, e.g. [0]")
        n_train = len(self.alphas_cumprod)
        if any(not 0 <= t < n_train for t in self.timesteps):
            raise ValueError(f"timesteps {self.timesteps} must lie in [0, {n_train})")
        self.noise_seed = int(noise_seed)
        self.noise_size = tuple(noise_size) if noise_size else None
        self._noise_cache: dict[tuple, Tensor] = {}

        if isinstance(unet_block_indices, str):
            if unet_block_indices != "auto":
                raise ValueError(
                    f"unet_block_indices must be a list of indices or 'auto', got {unet_block_indices!r}"
                )
            unet_block_indices = last_block_of_each_level(unet)
        self._unet_taps = self._resolve(
            "unet_up", unet_block_indices, [r for b in unet.up_blocks for r in b.resnets], "UNet output"
        )
        # SDXL's added conditioning: a pooled text embedding (set by the owner: set_added_text) and
        # the size / crop numbers of each input
        self.added_conditioning = getattr(unet.config, "addition_embed_type", None) == "text_time"
        self.register_buffer("added_text", None, persistent=False)
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
        self._recording = False
        self._time_offset: Tensor | None = None
        for name, module in {**self._unet_taps, **self._enc_taps, **self._dec_taps}.items():
            # A partial of a bound method, not a closure: copy.deepcopy rebinds it to the copy.
            module.register_forward_pre_hook(functools.partial(self._store_input, name))
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

    def set_execution(
        self, *, dtype: str | None = None, channels_last: bool | None = None, compile: bool = False
    ) -> None:
        """The frozen UNet / VAE's speed switches (class docstring), also after construction:
        ``dtype`` casts the weights (``None``: unchanged), ``channels_last`` sets the memory format
        (``False``: back to contiguous, ``None``: unchanged), ``compile`` compiles in place.
        """
        weights_dtype = None if dtype is None else dtype_of(dtype, "model.net.backbone.dtype")
        quiet = logging.getLogger("diffusers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # diffusers warns on any cast, even with nothing to keep in fp32
        try:
            for m in (self.unet, self.vae):
                if weights_dtype is not None:
                    m.to(weights_dtype)
                if channels_last is not None:
                    m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        finally:
            quiet.setLevel(level)
        if compile:
            # In place (nn.Module.compile): the modules, their weights and hooks stay the same objects.
            self.unet.compile()
            self.vae.encoder.compile()

    def set_added_text(self, pooled: Tensor) -> None:
        """(1, P) the pooled text embedding SDXL's UNet is conditioned on besides the tokens (the
        owner passes the empty prompt's: the implicit caption conditions the cross-attention).
        """
        self.added_text = pooled.detach()

    def _added_cond(self, images: Tensor, dtype) -> dict | None:
        if not self.added_conditioning:
            return None
        if self.added_text is None:
            raise ValueError(
                "an SDXL UNet needs the pooled text embedding: build the backbone through ODISE, or call "
                "set_added_text(text_encoder.pooled(['']))"
            )
        b, (h, w) = images.shape[0], images.shape[-2:]
        # PARITY with SDXL's pipeline for an uncropped image: original size, crop (0, 0), target size
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=images.device, dtype=dtype)
        return {
            "text_embeds": self.added_text.to(images.device, dtype).expand(b, -1),
            "time_ids": time_ids.expand(b, -1),
        }

    def _store_input(self, name: str, _module, args) -> None:
        # Only during forward: gradient checkpointing re-runs the blocks in backward, and what they
        # would store then would be kept alive until the next forward.
        if self._recording:
            self._store[name] = args[0]

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
        """Name -> (channels, stride w.r.t. the input image), without running the model.

        In the official extractor's order (VAE encoder taps, UNet taps, VAE decoder taps), which is
        the order its ``feature_projections`` are numbered and same-stride features are summed in.
        """
        info = {}
        per_down = len(self.vae.encoder.down_blocks[0].resnets)
        for name, m in self._enc_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (m.in_channels, 2 ** (k // per_down))
        n_up = len(self.unet.up_blocks)
        per_up = len(self.unet.up_blocks[0].resnets)
        for name, m in self._unet_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (
                m.in_channels * len(self.timesteps),
                self.vae_stride * 2 ** (n_up - 1 - k // per_up),
            )
        per_dec = len(self.vae.decoder.up_blocks[0].resnets)
        for name, m in self._dec_taps.items():
            k = int(name.rsplit("_", 1)[1])
            info[name] = (m.in_channels, self.vae_stride // 2 ** (k // per_dec))
        return info

    # -- forward --------------------------------------------------------------------------------
    def noise(self, latent_shape: tuple[int, ...], device, dtype) -> Tensor:
        """(1, C, h, w) standard normal, the same for every image and every call.

        PARITY: drawn once at the UNet's native latent size with seed ``noise_seed`` and resized
        (bicubic) to other latent sizes, as the official ``LdmExtractor`` does.
        """
        key = tuple(latent_shape[1:])
        if key not in self._noise_cache:
            with torch.inference_mode(False):  # reused by training steps after a validation filled it
                base = self.shared_noise()
                if tuple(base.shape[1:]) != key:
                    base = F.interpolate(base, size=key[1:], mode="bicubic", align_corners=False)
                self._noise_cache[key] = base
        return self._noise_cache[key].to(device=device, dtype=dtype)

    def shared_noise(self) -> Tensor:
        """(1, C, S, S) the noise as drawn, S = ``noise_size`` or the UNet's ``sample_size`` (64 for SD v1)."""
        size = self.noise_size or self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        gen = torch.Generator().manual_seed(self.noise_seed)
        return torch.randn((1, self.unet.config.in_channels, *size), generator=gen)

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8); fires the VAE taps."""
        with torch.no_grad():
            posterior = self.vae.encode(images.to(self.vae.dtype) * 2 - 1).latent_dist
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
        """Eq. 1: sqrt(a_t) x + sqrt(1 - a_t) eps with the shared eps.

        In fp32 whatever the latents' dtype (in bf16, alpha_bar_0 = 0.99915 rounds to 1 and the noise
        term sqrt(1 - a) = 0.029 would vanish); the square roots in float64, cast once, as the
        official ``q_sample`` takes them from its float64 tables.
        """
        a = self.alphas_cumprod[t].double()
        eps = self.noise(latents.shape, latents.device, torch.float32)
        x = a.sqrt().float() * latents.float() + (1 - a).sqrt().float() * eps
        return x.to(latents.dtype)

    def forward(self, images: Tensor, cond: Tensor, time_offset: Tensor | None = None) -> dict[str, Tensor]:
        """See class docstring. Gradients flow to ``cond`` / ``time_offset`` only."""
        div = self.size_divisibility
        if images.shape[-1] % div or images.shape[-2] % div:
            raise ValueError(
                f"backbone input {tuple(images.shape[-2:])} must be a multiple of {div}; pad first"
            )
        self._store, self._recording = {}, True
        try:
            return self._forward(images, cond, time_offset)
        finally:
            self._store, self._recording = {}, False

    def _forward(self, images: Tensor, cond: Tensor, time_offset: Tensor | None) -> dict[str, Tensor]:
        latents = self.encode(images)
        feats = {name: self._store[name] for name in (*self._enc_taps, *self._dec_taps)}
        needs_grad = torch.is_grad_enabled() and (
            cond.requires_grad or (time_offset is not None and time_offset.requires_grad)
        )
        unet_feats: dict[str, list[Tensor]] = {name: [] for name in self._unet_taps}
        with ExitStack() as stack:
            stack.enter_context(nullcontext() if needs_grad else torch.no_grad())
            try:
                for i, t in enumerate(self.timesteps):
                    self._time_offset = None if time_offset is None else time_offset[:, i]
                    tt = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
                    self.unet(
                        self.noisy_latents(latents, t),
                        tt,
                        encoder_hidden_states=cond.to(latents.dtype),
                        added_cond_kwargs=self._added_cond(images, latents.dtype),
                    )
                    for name in self._unet_taps:
                        unet_feats[name].append(self._store[name])
            finally:
                self._time_offset = None
        for name, parts in unet_feats.items():
            feats[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if not torch.is_autocast_enabled(images.device.type):
            # bf16 weights, fp32 trained parts: features in the input's dtype outside autocast
            feats = {k: v.to(images.dtype) for k, v in feats.items()}
        return feats


def last_block_of_each_level(unet: nn.Module) -> list[int]:
    """Indices (over all up-block resnets, in order) of each up block's last resnet: "every third
    block" of SD v1 (2, 5, 8, 11), derived from the UNet's own structure.
    """
    out, start = [], 0
    for block in unet.up_blocks:
        start += len(block.resnets)
        out.append(start - 1)
    return out


def alphas_cumprod(scheduler) -> Tensor:
    """(T,) float64 cumulative products of (1 - beta) of a diffusers DDPM scheduler's config.

    Recomputed in float64 from the config rather than taken from the scheduler (which keeps float32):
    PARITY with the official ``GaussianDiffusion`` tables (SD v1's ``scaled_linear`` betas are the
    official ``ldm_linear`` ones: linear in sqrt(beta) from 0.00085 to 0.012 over 1000 steps).
    """
    cfg = scheduler.config
    n = int(cfg.num_train_timesteps)
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    else:
        return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)
