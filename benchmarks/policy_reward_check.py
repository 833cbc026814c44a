"""What did a policy trained in the world model learn: to raise r, and does raising r do the task? For a run of
dmo_sapo_diamond.py or of `ppo_baseline.py --env world-model` (its agent.pt), the trained policy (mean action) against
two references, zero actions and uniform random actions:

1. in DIAMOND: from the same `windows` play-data windows with the same sampler noise, `steps` steps; mean r per
   step (s_start = the window's last frame, s_goal = the goal image, as in imagination) over all steps and over
   the last 16. This is what the policy was trained to raise; the per-epoch `imagination/reward` of a run mixes the
   policy's progress with which play windows the rollouts happened to start from (and, for PPO, how far its 64-step
   episodes drift in DIAMOND), this does not.
2. in the simulator: `episodes` episodes from the evaluation seeds (the script's protocol); mean r on the real
   frames of the first `steps` steps (s_start = frame wm_context - 1, as the exploitation check), and the final
   coverage, successes and distance of the T from its target, and the share of steps with the tool on the T.

A policy that learned r scores above both references on r in DIAMOND and on real frames; if its coverage is not
above theirs too, r does not ask for the task. A DMO policy acts on the RSSM state filtered over the frames, a PPO
policy on the last frame_stack frames; both runs' world model, reward model and play data are those of their args.json.

    python benchmarks/policy_reward_check.py --runs runs/PushT-v0__dmo_sapo_diamond__1__TIME [more runs]
    python benchmarks/policy_reward_check.py --runs runs/PushT-v0__ppo_baseline__1__TIME
"""

import dataclasses
import json
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
import ppo_baseline as ppo  # noqa: E402
from dmo_gradient_check import load  # noqa: E402


@dataclasses.dataclass
class Args:
    runs: list[str]
    """run folders with agent.pt, of dmo_sapo_diamond.py or of ppo_baseline.py --env world-model"""
    windows: int = 64
    """play-data windows to start from in DIAMOND"""
    episodes: int = 50
    """simulator episodes"""
    steps: int = 64
    """steps scored with r, in DIAMOND and on the real frames"""
    seed: int = 0
    """seed of the windows, the sampler noise and the random actions"""
    unpatched: bool = False
    """a DMO run with --patch-every: score in DIAMOND as it was trained, not as the run patched it"""


class Reference(nn.Module):
    """Zero or uniform random actions, whatever the policy is shown."""

    def __init__(self, kind, seed):
        super().__init__()
        self.kind, self.generator = kind, torch.Generator().manual_seed(seed)

    def forward(self, frames, feat):
        n = len(frames if frames is not None else feat)
        if self.kind == "zero":
            return torch.zeros(n, 2)
        return torch.rand(n, 2, generator=self.generator) * 2 - 1


class Recorder:
    """An agent for ppo_baseline.evaluate, which calls agent.act(frame stack): acts with `act` and keeps the newest
    frame of the first `steps` calls."""

    def __init__(self, act, steps):
        self.policy, self.steps, self.frames = act, steps, []

    def act(self, obs):
        frames = dmo.to_float(obs)
        if len(self.frames) < self.steps:
            self.frames.append(frames[:, -1])
        return self.policy(frames, None)


class Subject:
    """What the check needs of a run, whichever script trained it: the world model (denoiser, context, sampler
    steps), r and the goal's embedding, the play data, the RSSM (DMO only, else None), the trained policy
    `act(frames, feat)` (the last `context` frames in [-1, 1]; the RSSM features, or None), and
    `evaluate(act, episodes, steps)`: the script's own evaluation in the simulator, with the first `steps` frames."""

    def __init__(self, run, unpatched=False):
        if not os.path.exists(os.path.join(run, "agent.pt")):
            raise SystemExit(f"error: {run} has no agent.pt; pass run folders of dmo_sapo_diamond.py or ppo_baseline.py")
        with open(os.path.join(run, "args.json")) as f:
            saved = json.load(f)
        if saved.get("exp_name") == "ppo_baseline":
            self.load_ppo(run, saved)
        else:
            self.load_dmo(run, unpatched)
        goal = dmo.to_float(torch.as_tensor(envs.pusht_goal_image(self.args.img_size)).permute(2, 0, 1))
        self.goal_e = self.reward_model.embed(goal[None])

    def load_dmo(self, run, unpatched):
        args, self.data, self.denoiser, self.reward_model, self.rssm = load(run, finetuned=True, patched=not unpatched)
        self.args, self.context, self.sampler_steps = args, args.wm_context, args.wm_denoising_steps
        actor = dmo.Actor(self.rssm.feat_dim, 2, args.hidden).eval()
        actor.load_state_dict(dmo.load_checkpoint(os.path.join(run, "agent.pt"), "agent")["actor"])
        self.act = lambda frames, feat: actor(feat, deterministic=True)[0]

        def evaluate(act, episodes, steps):
            policy = lambda feat, deterministic: (act(None, feat), None)
            metrics, _, (frames, _, _) = dmo.evaluate(args, self.rssm, policy, episodes, args.eval_seed,
                                                   torch.device("cpu"), keep=steps)
            return metrics, frames
        self.evaluate = evaluate

    def load_ppo(self, run, saved):
        args = ppo.Args(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(ppo.Args)}})
        if args.env != "world-model":
            raise SystemExit(f"error: {run} trained PPO in the simulator; the check needs one trained in the world model")
        world = ppo.DiamondWorld(args, torch.device("cpu"))
        self.args, self.rssm, self.data = args, None, dmo.load_play_data(args, torch.device("cpu"))
        self.denoiser, self.reward_model = world.denoiser, world.reward_model
        self.context, self.sampler_steps = world.context, world.steps
        agent = ppo.Agent(args.img_size, args.frame_stack, args.cnn_channels, args.hidden).eval()
        agent.load_state_dict(dmo.load_checkpoint(os.path.join(run, "agent.pt"), "ppo_agent")["agent"])
        self.act = lambda frames, feat: agent.act(dmo.to_uint8(frames[:, -args.frame_stack:]))

        def evaluate(act, episodes, steps):
            recorder = Recorder(act, steps)
            metrics, _ = ppo.evaluate(args, recorder, episodes, args.eval_seed, torch.device("cpu"))
            return metrics, torch.stack(recorder.frames, 1)
        self.evaluate = evaluate


@torch.no_grad()
def from_play_windows(subject, policy, a):
    """Mean r per step (all steps, last 16) of `policy` from `a.windows` play-data windows, in DIAMOND and in the
    simulator reset to the windows' states. Both show the policy the same kind of input (frames, and for DMO the
    RSSM posterior's mode filtered over them, as the evaluation does) and score the frames alike."""
    s, n = subject, subject.context
    starts = dmo.window_starts(s.data, n)
    first = starts[torch.randint(len(starts), (a.windows,), generator=torch.Generator().manual_seed(a.seed))]
    if s.rssm is not None:
        frames, past, state = dmo.play_context(s.data, s.rssm, first, n, sample=False)
    else:
        idx = first[:, None] + torch.arange(n)
        frames, past, state = dmo.to_float(s.data["obs"][idx]), s.data["action"][idx][:, :-1], None
    start_e = s.reward_model.embed(frames[:, -1])  # s_start
    sims = [gym.make(s.args.env_id, obs_size=s.args.img_size) for _ in range(a.windows)]
    for sim, sim_state in zip(sims, s.data["state"][(first + n - 1).numpy()]):
        sim.reset(options={"state": sim_state})
    generator = torch.Generator().manual_seed(a.seed)
    no_reset = torch.zeros(a.windows, dtype=torch.bool)
    out = {}
    for where in ("diamond", "simulator"):
        f, p, st, rewards = frames, past, state, []
        for _ in range(a.steps):
            action = policy(f, None if st is None else s.rssm.feat(st))
            if where == "diamond":
                frame = s.denoiser.sample(f, torch.cat([p, action[:, None]], 1), s.sampler_steps, generator=generator)
            else:
                obs = [sim.step(act.numpy())[0] for sim, act in zip(sims, action)]
                frame = dmo.to_float(torch.as_tensor(np.stack(obs)).permute(0, 3, 1, 2))
            f, p = torch.cat([f[:, 1:], frame[:, None]], 1), torch.cat([p[:, 1:], action[:, None]], 1)
            rewards.append(s.reward_model.reward(s.reward_model.embed(frame), start_e, s.goal_e.expand_as(start_e)))
            if st is not None:
                st, _ = s.rssm.obs_step(st, action, s.rssm.encode(frame / 2), no_reset, sample=False)
        rewards = torch.stack(rewards)
        out[where] = (rewards.mean().item(), rewards[-16:].mean().item())
    return out


@torch.no_grad()
def in_simulator(subject, policy, a):
    """The run's own evaluation protocol; mean r on the real frames after the first context ones (s_start = the
    last of those, as the exploitation check)."""
    metrics, frames = subject.evaluate(policy, a.episodes, a.steps)
    n, rm = subject.context, subject.reward_model
    e = rm.embed(frames[:, n:])
    e_start = rm.embed(frames[:, n - 1])[:, None].expand_as(e)
    r = rm.reward(e, e_start, subject.goal_e.expand_as(e))
    return r.mean().item(), metrics


def main(a):
    print(f"from {a.windows} play windows, {a.steps} steps; evaluation: {a.episodes} episodes, r on the first "
          f"{a.steps} frames")
    print("| run | policy | play windows, DIAMOND: r/step, all / last 16 steps | play windows, simulator: the same "
          "| evaluation: r/step | final coverage | successes | final T distance from target (px) "
          "| steps with the tool on the T |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in a.runs:
        subject = Subject(run, a.unpatched)
        for name, policy in (("trained", subject.act), ("zero actions", Reference("zero", a.seed)),
                             ("random actions", Reference("random", a.seed))):
            windows = from_play_windows(subject, policy, a)
            r_real, m = in_simulator(subject, policy, a)
            cells = " | ".join(f"{x:.3f} / {y:.3f}" for x, y in windows.values())
            print(f"| {os.path.basename(run.rstrip('/'))} | {name} | {cells} | {r_real:.3f} | {m['mean_coverage']:.3f} "
                  f"| {m['successes']} / {a.episodes} | {m['mean_final_distance']:.1f} | {m['contact_fraction']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
