"""Does a Push-Cube policy steer, or only drive ahead? Its episodes (the per-episode successes in a run's eval.json)
against driving straight ahead at full speed on the same seeds, split by how the episode starts: the robot's heading
error (the angle between where it faces and the direction to the cube) and the offset of the push (the angle between
the line robot -> cube and the line cube -> net). A policy that steers wins episodes that driving ahead loses.

    python benchmarks/push_cube_steering.py --runs runs/RUN_1 runs/RUN_2 runs/RUN_3
"""

import dataclasses
import json
import math
import os
import sys

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmo_sapo_dreamerv4 as dv4  # noqa: E402
import envs  # noqa: E402


@dataclasses.dataclass
class Args:
    runs: tuple[str, ...]
    """run directories of dmo_sapo_dreamerv4.py (or ppo_baseline.py on EgoPushCube-v0) evaluated on the same seeds"""
    eval_file: str = "eval.json"
    """the evaluation of each run to read (eval_cem_mpc.json: CEM-MPC's)"""


def wrap(angle):
    return (angle + math.pi) % (2 * math.pi) - math.pi


def start_geometry(seed, start):
    """The heading error and the push's offset (radians, absolute) of the episode on `seed`."""
    _, info = gym.make(dv4.ENV_ID, start=start).reset(seed=seed)
    x, y, yaw = info["robot_pose"]
    cube = info["cube_pose"][:2]
    to_cube = math.atan2(cube[1] - y, cube[0] - x)
    to_net = math.atan2(envs.NET_CENTER[1] - cube[1], envs.NET_CENTER[0] - cube[0])
    return abs(wrap(to_cube - yaw)), abs(wrap(to_net - to_cube))


def forward(frames):
    return torch.tensor([[1.0, 0.0, 0.0]]).repeat(len(frames), 1)


if __name__ == "__main__":
    args = tyro.cli(Args)
    evals = []
    for run in args.runs:
        with open(os.path.join(run, args.eval_file)) as f:
            result = json.load(f)
        with open(os.path.join(run, "args.json")) as f:
            run_args = json.load(f)
        if "success_by_episode" not in result:
            raise SystemExit(f"error: {run}/{args.eval_file} has no success_by_episode: evaluate the run again "
                             f"(python dmo_sapo_dreamerv4.py --resume {run})")
        evals.append((run, result, run_args))
    settings = {(r["episodes"], a["eval_seed"], r.get("start", "full"), a.get("eval_max_steps", 200),
                 r.get("controller", "default")) for _, r, a in evals}
    if len(settings) != 1:
        raise SystemExit(f"error: the runs were evaluated on different episodes: {sorted(settings)}")
    (episodes, seed, start, max_steps, controller), = settings
    forward.frames_per_action = 0
    ref = dv4.Args(start=start, eval_max_steps=max_steps)
    ahead, _ = dv4.run_episodes(ref, forward, episodes, seed, torch.device("cpu"), controller)
    ahead = np.array(ahead["success_by_episode"], bool)
    heading, offset = np.array([start_geometry(seed + i, start) for i in range(episodes)]).T
    bins = {"all": np.ones(episodes, bool), "heading error < 0.2 rad": heading < 0.2,
            "heading error >= 0.2 rad": heading >= 0.2, "push offset < 0.25 rad": offset < 0.25,
            "push offset >= 0.25 rad": offset >= 0.25}
    print(f"{episodes} episodes from seed {seed}, {start} start, {controller} controller; success rate (episodes)")
    print("| policy | " + " | ".join(bins) + " | won where ahead lost | lost where ahead won |")
    print("| --- |" + " --- |" * (len(bins) + 2))
    row = lambda s: " | ".join(f"{s[m].mean():.2f} ({m.sum()})" if m.any() else "-" for m in bins.values())
    print(f"| driving straight ahead | {row(ahead)} | | |")
    for run, result, _ in evals:
        won = np.array(result["success_by_episode"], bool)
        print(f"| {os.path.basename(os.path.normpath(run))} | {row(won)} | {(won & ~ahead).sum()} of {(~ahead).sum()} "
              f"| {(~won & ahead).sum()} of {ahead.sum()} |")
