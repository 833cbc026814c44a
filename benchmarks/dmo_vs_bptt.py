"""Cost of one actor update of dmo_sapo_diamond.py: DMO (DIAMOND steps the rollout under no_grad, the gradient
goes through the RSSM) against plain backpropagation through the DIAMOND sampler (3 Euler steps x 16 frames,
through the generated frames, the reward model and the encoder), on the same batch and horizon.
Seed 000's claim: the latter is intractable at scale. Each measurement runs in a fresh process so that its
peak memory is its own (CPU: peak resident set size; CUDA: peak allocated memory).

    python benchmarks/dmo_vs_bptt.py                          # `default` and `paper` sizes, CPU
    python benchmarks/dmo_vs_bptt.py --cuda --paper-batch 128  # on a GPU, the paper's 128 rollouts
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmo_sapo_diamond as dmo  # noqa: E402


@dataclasses.dataclass
class Args:
    default_batch: int = 32
    """rollouts per update at the `default` size (the preset's num_envs)"""
    paper_batch: int = 1
    """rollouts per update at the `paper` size (the preset has 128; backprop through the sampler at 128 does
    not fit in this machine's 24 GB, so the CPU comparison uses a smaller, equal batch for both methods)"""
    horizon: int = 16
    """imagination steps per update (Table 4)"""
    cuda: bool = False
    """measure on the GPU"""
    one: Optional[str] = None
    """internal: measure one 'SIZE,METHOD,BATCH' in this process and print JSON"""


def differentiable_sample(denoiser, past_frames, past_actions, steps):
    """Denoiser.sample without no_grad and without the 8-bit quantisation (which has no gradient)."""
    b = len(past_frames)
    x = torch.randn(b, *past_frames.shape[2:], device=past_frames.device)
    sigmas = denoiser.sigmas(steps, past_frames.device)
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(b)
        _, c_out, c_skip, _ = (c[:, None, None, None] for c in denoiser.conditioners(s))
        denoised = c_skip * x + c_out * denoiser.model_output(x, s, past_frames, past_actions)
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
    return x.clamp(-1, 1)


def bptt_actor_loss(args, actor, critic, rssm, denoiser, reward_model, goal_e, rollouts, alpha):
    """The same objective as dmo.imagine_horizon, differentiated through the global model itself."""
    state, frames, actions, ret = rollouts.state, rollouts.frames, rollouts.actions, 0.0
    no_reset = torch.zeros(len(frames), dtype=torch.bool, device=frames.device)
    for h in range(args.horizon):
        action, log_prob = actor(rssm.feat(state))
        next_frame = differentiable_sample(denoiser, frames, torch.cat([actions, action[:, None]], 1),
                                           args.wm_denoising_steps)
        state, _ = rssm.obs_step(state, action, rssm.encode(next_frame / 2), no_reset)
        r = reward_model.reward(reward_model.embed(next_frame), rollouts.start_e, goal_e.expand_as(rollouts.start_e))
        ret = ret + args.gamma**h * (r - alpha * log_prob)
        frames = torch.cat([frames[:, 1:], next_frame[:, None]], 1)
        actions = torch.cat([actions[:, 1:], action[:, None]], 1)
    ret = ret + args.gamma**args.horizon * critic.value(rssm.feat(state))
    return -ret.mean() / args.horizon


def measure(size, method, batch, horizon, cuda):
    device = torch.device("cuda" if cuda else "cpu")
    args = dmo.Args(**{**dmo.PRESETS[size], "num_envs": batch, "horizon": horizon, "episode_length": horizon})
    S = args.img_size
    torch.manual_seed(0)
    denoiser = dmo.Denoiser(2, args.wm_context, args.wm_channels, args.wm_depths, args.wm_cond_channels).to(device)
    for p in denoiser.parameters():  # random weights: the cost does not depend on training
        p.data.normal_(0, 0.02)
    reward_model = dmo.RewardModel(S).to(device)
    rssm = dmo.RSSM(dmo.RSSMConfig.preset(args.rssm_size, obs_shape=(3, S, S), action_dim=2)).to(device)
    for p in [*denoiser.parameters(), *reward_model.parameters()]:
        p.requires_grad_(method == "bptt")  # BPTT differentiates through them; DMO never does
    actor, critic = dmo.Actor(rssm.feat_dim, 2, args.hidden).to(device), dmo.Critic(rssm.feat_dim, args.hidden).to(device)
    goal_e = reward_model.embed(torch.zeros(1, 3, S, S, device=device)).detach()
    data = {"obs": torch.randint(0, 256, (64, 3, S, S), dtype=torch.uint8, device=device),
            "action": torch.rand(64, 2, device=device) * 2 - 1, "is_first": torch.zeros(64, dtype=torch.bool),
            "episode": torch.zeros(64, dtype=torch.long)}
    rollouts = dmo.Rollouts(args, data, rssm, reward_model, goal_e, device, denoiser)
    alpha = torch.tensor(0.1, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "dmo":
        terms, _ = dmo.imagine_horizon(args, actor, critic, rssm, rollouts, alpha)
        loss = -sum(terms).mean() / args.horizon
    else:
        loss = bptt_actor_loss(args, actor, critic, rssm, denoiser, reward_model, goal_e, rollouts, alpha)
    t1 = time.perf_counter()
    loss.backward(inputs=list(actor.parameters()))
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = sum(p.grad.norm() ** 2 for p in actor.parameters()).sqrt().item()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "peak_mb": (peak - base) / 2**20, "grad_norm": grad}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.one:
        size, method, batch = args.one.split(",")
        print(json.dumps(measure(size, method, int(batch), args.horizon, args.cuda)))
        sys.exit(0)
    print("| size | batch x horizon | method | forward s | backward s | update s | peak memory MB | "
          "DMO cheaper: time / memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, batch in (("default", args.default_batch), ("paper", args.paper_batch)):
        rows = {}
        for method in ("dmo", "bptt"):
            cmd = [sys.executable, __file__, "--one", f"{size},{method},{batch}", "--horizon", str(args.horizon)]
            out = subprocess.run(cmd + (["--cuda"] if args.cuda else []), capture_output=True, text=True)
            if out.returncode != 0:
                rows[method] = None
                print(f"| {size} | {batch} x {args.horizon} | {method} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = ""
            if method == "bptt" and rows.get("dmo"):
                d = rows["dmo"]
                ratio = (f"{(r['forward_s'] + r['backward_s']) / (d['forward_s'] + d['backward_s']):.1f}x / "
                         f"{r['peak_mb'] / max(d['peak_mb'], 1e-3):.0f}x")
            print(f"| {size} | {batch} x {args.horizon} | {method} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
                  f"{r['forward_s'] + r['backward_s']:.2f} | {r['peak_mb']:.0f} | {ratio} |", flush=True)
