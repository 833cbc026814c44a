"""What does a run's global reward model r reward? Two tables.

1. On the held-out play episodes (the last 10 %, as the script holds them out): the Pearson correlation of
   r(s_t | s_0, goal image) with the true coverage, with the T's closeness to its target (minus the distance of its
   centre, in pixels of the 512 px workspace), and with the tool's closeness to where the goal image draws it. In
   play the tool and the T move together, so these correlations mix what r wants of each.
2. Controlled, on rendered states: `paths` random T poses, each moved in 8 steps along a straight path to its target
   pose with the tool fixed away from it (s_start = the path's first frame): how often one step raises r, and r's
   gain over the path. With the T fixed at the path's start and the tool at 32 random spots: r's spread across them
   and its slope against the tool's distance from the T (negative: r wants the tool near the T). A useful r gains
   much over the T path and little from where the tool is.

    python benchmarks/reward_model_probe.py --runs runs/PushT-v0__dmo_sapo_diamond__1__TIME [more runs]
"""

import dataclasses
import json
import os
import sys

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmo_sapo_diamond as dmo  # noqa: E402
import envs  # noqa: E402


@dataclasses.dataclass
class Args:
    runs: list[str]
    """dmo_sapo_diamond.py run folders with a finished reward_model.pt (or a --reward-checkpoint in args.json)"""
    paths: int = 48
    """random T poses of the controlled table"""
    seed: int = 0
    """seed of the controlled table's poses and tool spots"""
    goal_tool_xy: tuple[float, float] = (256.0, 400.0)
    """where envs.pusht_goal_image draws the tool"""


def load(run, goal_tool_xy):
    with open(os.path.join(run, "args.json")) as f:
        saved = json.load(f)
    args = dmo.Args(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(dmo.Args)}})
    model = dmo.load_reward_model(args.reward_checkpoint or os.path.join(run, "reward_model.pt"))
    goal = dmo.to_float(torch.as_tensor(envs.pusht_goal_image(args.img_size, goal_tool_xy)).permute(2, 0, 1))
    return args, saved, model, goal


def true_coverage(states):
    """gym-pusht's coverage of the T's target for each simulator state."""
    env = envs.PushTEnv()
    return np.array([env.reset(options={"state": s})[1]["coverage"] for s in states])


def on_held_out_play(args, model, goal, goal_tool_xy):
    data = dmo.load_play_data(args, torch.device("cpu"))
    r, state = dmo.goal_rewards(model, data, goal, dmo.held_out_episodes(data), torch.device("cpu"))
    coverage = true_coverage(state)
    t_close = -np.linalg.norm(state[:, 2:4] - envs.PushTEnv.goal_pose[:2], axis=1)
    tool_close = -np.linalg.norm(state[:, :2] - np.array(goal_tool_xy), axis=1)
    corr = lambda x: float(np.corrcoef(r, x)[0, 1])
    return len(r), corr(coverage), corr(t_close), corr(tool_close)


@torch.no_grad()
def controlled(args, model, goal, paths, seed):
    rng, env = np.random.default_rng(seed), envs.PushTEnv(obs_size=args.img_size)
    render = lambda states: dmo.to_float(torch.stack([torch.as_tensor(env.reset(options={"state": s})[0])
                                                      for s in states]).permute(0, 3, 1, 2))
    goal_e, target = model.embed(goal[None]), envs.PushTEnv.goal_pose
    up_steps, gains, spreads, slopes = [], [], [], []
    for _ in range(paths):
        block = np.array([*rng.uniform(150, 362, 2), rng.uniform(0, 2 * np.pi)])
        turn = (target[2] - block[2] + np.pi) % (2 * np.pi) - np.pi
        path = [np.array([*(block[:2] + f * (target[:2] - block[:2])), block[2] + f * turn])
                for f in np.linspace(0, 1, 8)]
        tool = rng.uniform(30, 482, 2)
        while min(np.linalg.norm(tool - p[:2]) for p in path) < 110:  # away from every T of the path
            tool = rng.uniform(30, 482, 2)
        e = model.embed(render([[*tool, *p] for p in path]))
        r = model.reward(e, e[:1].expand_as(e), goal_e.expand_as(e)).numpy()
        up_steps.append(np.mean(np.diff(r) > 0))
        gains.append(r[-1] - r[0])
        tools = [t for t in rng.uniform(30, 482, (400, 2)) if np.linalg.norm(t - block[:2]) > 70][:32]
        distance = np.linalg.norm(np.array(tools) - block[:2], axis=1)
        e_tools = model.embed(render([[*t, *block] for t in tools]))
        r = model.reward(e_tools, e[:1].expand_as(e_tools), goal_e.expand_as(e_tools)).numpy()
        spreads.append(r.std())
        slopes.append(100 * np.polyfit(distance, r, 1)[0])
    return np.mean(up_steps), np.mean(gains), np.mean(spreads), np.mean(slopes)


def main(a):
    for run in a.runs:
        if not os.path.exists(os.path.join(run, "args.json")):
            raise SystemExit(f"error: {run} has no args.json; pass dmo_sapo_diamond.py run folders")
    loaded = [load(run, a.goal_tool_xy) for run in a.runs]
    name = lambda run: os.path.basename(run.rstrip("/"))
    print("held-out play frames, Pearson correlation of r with:")
    print("| run | seed | goal-video share of pairs | frames | coverage | T near target | tool near the goal image's tool |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run, (args, saved, model, goal) in zip(a.runs, loaded):
        share = saved.get("reward_video_fraction", "by frames (~0.2)")
        n, c, t, tool = on_held_out_play(args, model, goal, a.goal_tool_xy)
        print(f"| {name(run)} | {args.seed} | {share} | {n} | {c:.3f} | {t:.3f} | {tool:.3f} |", flush=True)
    print(f"\ncontrolled ({a.paths} T poses): T moved to its target with the tool fixed; tool moved with the T fixed")
    print("| run | seed | steps along the T path that raise r | r gain over the path | r spread over tool spots "
          "| r per 100 px of tool-T distance |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run, (args, saved, model, goal) in zip(a.runs, loaded):
        up, gain, spread, slope = controlled(args, model, goal, a.paths, a.seed)
        print(f"| {name(run)} | {args.seed} | {up:.3f} | {gain:.2f} | {spread:.3f} | {slope:.3f} |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
