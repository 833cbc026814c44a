"""Frames per second of the RSSM (rssm.py): world-model training and imagination with a policy.

Training: one step on a batch of 16 x 64 frames (encode, observe, loss, backward, Adam).
Imagination: 16 steps from 128 states with a small policy MLP, forward and backward into the policy, as
actor learning (SAPO / DMO) does. Sizes: rssm.presets (Coupled paper Table 4: push_t, push_cube).

    python benchmarks/rssm_throughput.py                                  # small and push_t
    python benchmarks/rssm_throughput.py --sizes push_cube --warmup 0    # Table 4's big size (slow on a CPU)
"""

import dataclasses
import os
import sys
import time

import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rssm import RSSM, RSSMConfig  # noqa: E402


@dataclasses.dataclass
class Args:
    sizes: tuple[str, ...] = ("small", "push_t")
    """rssm.presets to measure (push_cube: 192 s per training step on this 2-core CPU, under load)"""
    iters: int = 1
    """timed iterations of each measurement"""
    warmup: int = 1
    """untimed iterations before them"""
    batch: int = 16
    """training batch (sequences)"""
    seq_len: int = 64
    """training sequence length"""
    imag_batch: int = 128
    """imagination batch (rollouts)"""
    horizon: int = 16
    """imagination horizon"""
    action_dim: int = 2
    """action size (Push-T and Push-Cube: 2)"""
    threads: int = 0
    """torch threads (0: PyTorch's default)"""
    device: str = "cpu"
    """torch device"""


def timed(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure(size, args):
    d = args.device
    m = RSSM(RSSMConfig.preset(size, obs_shape=(3, 64, 64), action_dim=args.action_dim)).to(d)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4, eps=1e-8)
    B, T = args.batch, args.seq_len
    obs = torch.rand(B, T, 3, 64, 64, device=d) - 0.5
    actions, rewards = torch.rand(B, T, args.action_dim, device=d) * 2 - 1, torch.randn(B, T, device=d)
    is_first, conts = torch.zeros(B, T, dtype=torch.bool, device=d), torch.ones(B, T, device=d)
    is_first[:, 0] = True

    def train():
        post, prior = m.observe(m.encode(obs), actions, is_first)
        loss, _ = m.loss(post, prior, obs, rewards, conts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    policy = nn.Sequential(nn.Linear(m.feat_dim, 256), nn.SiLU(), nn.Linear(256, 128), nn.SiLU(),
                           nn.Linear(128, args.action_dim), nn.Tanh()).to(d)

    def imagine():
        states, _ = m.imagine(start, policy, args.horizon)
        policy.zero_grad(set_to_none=True)
        (-m.reward(m.feat(states)).mean()).backward()

    t_train = timed(train, args.iters, args.warmup, d)
    m.requires_grad_(False)  # actor learning: the gradient flows through the model into the policy only
    start = {k: v.expand(args.imag_batch, *v.shape[1:]).clone() for k, v in m.initial(1).items()}
    t_imag = timed(imagine, args.iters, args.warmup, d)
    params = sum(p.numel() for p in m.parameters()) / 1e6
    return params, B * T / t_train, t_train, args.imag_batch * args.horizon / t_imag, t_imag


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(f"| size | params (M) | train frames/s (B{args.batch} x T{args.seq_len}) | s/step "
          f"| imagine frames/s (B{args.imag_batch} x H{args.horizon}, fwd+bwd) | s/rollout |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        params, fps_train, t_train, fps_imag, t_imag = measure(size, args)
        row = f"| {size} | {params:.1f} | {fps_train:.0f} | {t_train:.2f} | {fps_imag:.0f} | {t_imag:.3f} |"
        print(row, flush=True)
