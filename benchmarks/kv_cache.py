"""Time to generate one frame with the DreamerV4 dynamics of dmo_sapo_dreamerv4.py against the length of its context:
with the KV cache (4 denoising passes over the new frame's tokens only, then one pass that writes its keys and
values) and by recomputation (4 passes over the whole context and the new frame, no cache). Random weights: the
cost does not depend on them. Issue 22's goal: flat with the cache, >= 10x faster than recomputation at context 96.

    python benchmarks/kv_cache.py                      # `default` sizes, 8 rollouts, CPU
    python benchmarks/kv_cache.py --preset paper --cuda
"""

import dataclasses
import os
import sys
import time
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmo_sapo_dreamerv4 as dv4  # noqa: E402


@dataclasses.dataclass
class Args:
    preset: Literal["tiny", "default", "paper"] = "default"
    """the script's preset whose dynamics sizes are timed"""
    batch: int = 8
    """rollouts generated together"""
    contexts: tuple[int, ...] = (8, 16, 32, 64, 96)
    """context lengths (frames) to time"""
    repeats: int = 3
    """frames timed per measurement (after one warm-up)"""
    cuda: bool = False
    """time on the GPU"""


@torch.no_grad()
def recompute_frame(dyn, z_ctx, a_ctx, action, steps, tau_ctx):
    """The next frame without a cache: every denoising step runs the whole context (at tau_ctx) and the new frame."""
    B, T = z_ctx.shape[:2]
    z = torch.randn(B, 1, dyn.latents, dyn.bottleneck, device=z_ctx.device)
    actions = torch.cat([a_ctx, action[:, None]], 1)
    for k in range(steps):
        tau = torch.cat([torch.full((B, T), tau_ctx, device=z.device), torch.full((B, 1), k / steps, device=z.device)], 1)
        d = torch.cat([torch.full((B, T), 1 / dyn.max_shortcut, device=z.device),
                       torch.full((B, 1), 1 / steps, device=z.device)], 1)
        pred, _ = dyn(torch.cat([z_ctx, z], 1), tau, d, actions)
        z = z + (pred[:, -1:] - z) / steps / (1 - k / steps)
    return z


def timed(fn, repeats, cuda):
    fn()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main(args):
    device = torch.device("cuda" if args.cuda else "cpu")
    a = dv4.Args(**{**dataclasses.asdict(dv4.Args()), **dv4.PRESETS[args.preset]})
    dyn = dv4.make_dynamics(a).to(device).eval()
    n_params = sum(p.numel() for p in dyn.parameters()) / 1e6
    print(f"{args.preset} dynamics: {n_params:.1f}M parameters, {dyn.n_tokens} tokens per frame, {a.dyn_layers} layers, "
          f"{a.dyn_sampling_steps} denoising steps, batch {args.batch}, {device}, {torch.get_num_threads()} threads")
    print("| context (frames) | cached (ms/frame) | recomputed (ms/frame) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    tau_ctx = min(round((1 - a.dyn_context_noise) * a.dyn_max_shortcut), a.dyn_max_shortcut - 1) / a.dyn_max_shortcut
    for T in args.contexts:
        if T > a.dyn_max_context:
            continue
        torch.manual_seed(0)
        z_ctx = torch.rand(args.batch, T, a.tok_latents, a.tok_bottleneck, device=device) * 2 - 1
        a_ctx = torch.rand(args.batch, T, dv4.ACTION_DIM, device=device) * 2 - 1
        action = torch.zeros(args.batch, dv4.ACTION_DIM, device=device)
        base = dv4.KVCache(a.dyn_layers, a.dyn_max_context)
        dv4.observe(dyn, base, z_ctx, a_ctx, a.dyn_context_noise)

        # each generated frame joins the context (the last repeats time contexts T+1 .. T+repeats, or a full window)
        t_cache = timed(lambda: dv4.generate(dyn, base, action, a.dyn_sampling_steps, a.dyn_context_noise),
                        args.repeats, args.cuda)
        t_full = timed(lambda: recompute_frame(dyn, z_ctx, a_ctx, action, a.dyn_sampling_steps, tau_ctx),
                       args.repeats, args.cuda)
        print(f"| {T} | {1000 * t_cache:.1f} | {1000 * t_full:.1f} | {t_full / t_cache:.1f}x |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
