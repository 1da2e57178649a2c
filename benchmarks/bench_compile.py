"""Does ``torch.compile`` pay for the frozen backbone? Full-size (``random`` weights) VAE encoder and
UNet at 512^2, each as the optimised inference path runs it (bf16 autocast, channels-last), eager
vs ``torch.compile`` (inductor, default mode).

Not part of ``make bench``: compiling takes minutes on 2 cores. Prints the compile time (first
call) and ``name: ours X, baseline Y, ratio Z`` with ours = compiled, baseline = eager (best of
``--repeats`` calls after the first). ``python benchmarks/bench_compile.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_inference import build


def timed(fn, args: tuple, kwargs: dict, repeats: int, device: str) -> tuple[float, float]:
    """(first call, best of the next ``repeats``) of ``fn(*args, **kwargs)`` in seconds."""

    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first = once()
    return first, min(once() for _ in range(repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="seconds-long smoke run (what the test suite runs): small sizes, one repeat",
    )
    a = p.parse_args(argv)
    if a.tiny:
        a.repeats = 1
    if a.tiny:
        a.size = 64
    experiment = ("tiny", ("weights.mode=tiny",)) if a.tiny else ("label_512", ())
    backbone = build(*experiment).net.backbone.to(a.device)
    cl = torch.channels_last
    latent = a.size // 8
    parts = {
        "VAE encoder": (
            backbone.vae.encoder.to(memory_format=cl),
            (torch.randn(1, 3, a.size, a.size, device=a.device).contiguous(memory_format=cl),),
            {},
        ),
        "UNet": (
            backbone.unet.to(memory_format=cl),
            (
                torch.randn(1, 4, latent, latent, device=a.device).contiguous(memory_format=cl),
                torch.zeros(1, dtype=torch.long, device=a.device),
            ),
            {
                "encoder_hidden_states": torch.randn(
                    1, 77, backbone.unet.config.cross_attention_dim, device=a.device
                )
            },
        ),
    }
    for name, (module, args, kwargs) in parts.items():
        with torch.no_grad(), torch.autocast(a.device, dtype=torch.bfloat16):
            _, eager = timed(module, args, kwargs, a.repeats, a.device)
            compiled = torch.compile(module)
            first, best = timed(compiled, args, kwargs, a.repeats, a.device)
        tag = f"torch.compile {name} ({a.size}^2, bf16, channels-last, {a.device})"
        print(f"{tag}: first call (compiling) {first:.1f} s")
        print(f"{tag}: ours {best:.2f} s, baseline {eager:.2f} s, ratio {best / eager:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
