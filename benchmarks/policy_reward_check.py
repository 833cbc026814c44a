"""What did a DMO-SAPO policy learn: to raise r, and does raising r do the task? For a run of dmo_sapo_diamond.py
(its agent.pt), the trained policy (mean action) against two references, zero actions and uniform random actions:

1. in DIAMOND: from the same `windows` play-data windows with the same sampler noise, `steps` steps; mean r per
   step (s_start = the window's last frame, s_goal = the goal image, as in imagination) over all steps and over
   the last 16. This is what DMO-SAPO optimises; the per-epoch `imagination/reward` of a run mixes the policy's
   progress with which play windows the rollouts happened to start from, this does not.
2. in the simulator: `episodes` episodes from the evaluation seeds (the script's protocol); mean r on the real
   frames of the first `steps` steps (s_start = frame wm_context - 1, as the exploitation check), and the final
   coverage, successes and distance of the T from its target, and the share of steps with the tool on the T.

A policy that learned r scores above both references on r in DIAMOND and on real frames; if its coverage is not
above theirs too, r does not ask for the task.

    python benchmarks/policy_reward_check.py --runs runs/PushT-v0__dmo_sapo_diamond__1__TIME [more runs]
"""

import dataclasses
import os
import sys

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dmo_sapo_diamond as dmo  # noqa: E402
import envs  # noqa: E402
from dmo_gradient_check import load  # noqa: E402


@dataclasses.dataclass
class Args:
    runs: list[str]
    """dmo_sapo_diamond.py run folders with agent.pt"""
    windows: int = 64
    """play-data windows to start from in DIAMOND"""
    episodes: int = 50
    """simulator episodes"""
    steps: int = 64
    """steps scored with r, in DIAMOND and on the real frames"""
    seed: int = 0
    """seed of the windows, the sampler noise and the random actions"""


class Reference(nn.Module):
    """Zero or uniform random actions, with the actor's call signature."""

    def __init__(self, kind, seed):
        super().__init__()
        self.kind, self.generator = kind, torch.Generator().manual_seed(seed)

    def forward(self, feat, deterministic=True):
        if self.kind == "zero":
            return torch.zeros(len(feat), 2), None
        return torch.rand(len(feat), 2, generator=self.generator) * 2 - 1, None


def play_windows(args, data, rssm, reward_model, a):
    """The `windows` play-data windows both DIAMOND and the simulator start from: their frames, the actions between
    them, the RSSM state filtered over them, r's embedding of the last frame (s_start), the simulator state there."""
    n = args.wm_context
    starts = dmo.window_starts(data, n)
    first = starts[torch.randint(len(starts), (a.windows,), generator=torch.Generator().manual_seed(a.seed))]
    frames, past, state = dmo.play_context(data, rssm, first, n, sample=False)
    return frames, past, state, reward_model.embed(frames[:, -1]), data["state"][(first + n - 1).numpy()]


@torch.no_grad()
def from_play_windows(args, data, denoiser, reward_model, goal_e, rssm, policy, a):
    """Mean r per step (all steps, last 16) of `policy` from the play windows, in DIAMOND and in the simulator.
    Both filter the frames with the RSSM posterior (mode, as the evaluation does) and score them alike."""
    frames, past, state, start_e, sim_states = play_windows(args, data, rssm, reward_model, a)
    sims = [gym.make(args.env_id, obs_size=args.img_size) for _ in range(a.windows)]
    for sim, s in zip(sims, sim_states):
        sim.reset(options={"state": s})
    generator = torch.Generator().manual_seed(a.seed)
    no_reset = torch.zeros(a.windows, dtype=torch.bool)
    out = {}
    for where in ("diamond", "simulator"):
        f, p, s, rewards = frames, past, state, []
        for _ in range(a.steps):
            action, _ = policy(rssm.feat(s), deterministic=True)
            if where == "diamond":
                frame = denoiser.sample(f, torch.cat([p, action[:, None]], 1), args.wm_denoising_steps,
                                        generator=generator)
                f, p = torch.cat([f[:, 1:], frame[:, None]], 1), torch.cat([p[:, 1:], action[:, None]], 1)
            else:
                obs = [sim.step(act.numpy())[0] for sim, act in zip(sims, action)]
                frame = dmo.to_float(torch.as_tensor(np.stack(obs)).permute(0, 3, 1, 2))
            rewards.append(reward_model.reward(reward_model.embed(frame), start_e, goal_e.expand_as(start_e)))
            s, _ = rssm.obs_step(s, action, rssm.encode(frame / 2), no_reset, sample=False)
        rewards = torch.stack(rewards)
        out[where] = (rewards.mean().item(), rewards[-16:].mean().item())
    return out


@torch.no_grad()
def in_simulator(args, reward_model, goal_e, rssm, policy, a):
    metrics, _, (frames, _) = dmo.evaluate(args, rssm, policy, a.episodes, args.eval_seed, torch.device("cpu"),
                                           keep=a.steps)
    n = args.wm_context
    e = reward_model.embed(frames[:, n:])
    e_start = reward_model.embed(frames[:, n - 1])[:, None].expand_as(e)
    r = reward_model.reward(e, e_start, goal_e.expand_as(e))
    return r.mean().item(), metrics


def main(a):
    print(f"from {a.windows} play windows, {a.steps} steps; evaluation: {a.episodes} episodes, r on the first "
          f"{a.steps} frames")
    print("| run | policy | play windows, DIAMOND: r/step, all / last 16 steps | play windows, simulator: the same "
          "| evaluation: r/step | final coverage | successes | final T distance from target (px) "
          "| steps with the tool on the T |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in a.runs:
        if not os.path.exists(os.path.join(run, "agent.pt")):
            raise SystemExit(f"error: {run} has no agent.pt; pass dmo_sapo_diamond.py run folders")
        args, data, denoiser, reward_model, rssm = load(run, finetuned=True)
        goal = dmo.to_float(torch.as_tensor(envs.pusht_goal_image(args.img_size)).permute(2, 0, 1))
        goal_e = reward_model.embed(goal[None])
        actor = dmo.Actor(rssm.feat_dim, 2, args.hidden).eval()
        actor.load_state_dict(dmo.load_checkpoint(os.path.join(run, "agent.pt"), "agent")["actor"])
        for name, policy in (("trained", actor), ("zero actions", Reference("zero", a.seed)),
                             ("random actions", Reference("random", a.seed))):
            windows = from_play_windows(args, data, denoiser, reward_model, goal_e, rssm, policy, a)
            r_real, m = in_simulator(args, reward_model, goal_e, rssm, policy, a)
            cells = " | ".join(f"{x:.3f} / {y:.3f}" for x, y in windows.values())
            print(f"| {os.path.basename(run.rstrip('/'))} | {name} | {cells} | {r_real:.3f} | {m['mean_coverage']:.3f} "
                  f"| {m['successes']} / {a.episodes} | {m['mean_block_distance']:.1f} | {m['contact_fraction']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
