"""What does a run's global reward model r reward? On the held-out play episodes (the last 10 %, as the script
holds them out), the Pearson correlation of r(s_t | s_0, goal image) with the true coverage, with the T's
closeness to its target (minus the distance of its centre, in pixels of the 512 px workspace), and with the tool's
closeness to where the goal image draws it. A useful r correlates with the first two; one that has learned where
the tool ends up correlates with the last.

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
    goal_tool_xy: tuple[float, float] = (256.0, 400.0)
    """where envs.pusht_goal_image draws the tool"""


def probe(run, goal_tool_xy):
    with open(os.path.join(run, "args.json")) as f:
        saved = json.load(f)
    args = dmo.Args(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(dmo.Args)}})
    path = args.reward_checkpoint or os.path.join(run, "reward_model.pt")
    model = dmo.RewardModel(args.img_size).eval()
    model.load_state_dict(dmo.load_checkpoint(path, "reward_model")["model"])
    data = dmo.load_play_data(args, torch.device("cpu"))
    goal = dmo.to_float(torch.as_tensor(envs.pusht_goal_image(args.img_size)).permute(2, 0, 1))
    held_out = dmo.held_out_episodes(data)
    r, state = dmo.goal_rewards(model, data, goal, held_out, torch.device("cpu"))
    coverage = dmo.true_coverage(state)
    t_close = -np.linalg.norm(state[:, 2:4] - envs.PushTEnv.goal_pose[:2], axis=1)
    tool_close = -np.linalg.norm(state[:, :2] - np.array(goal_tool_xy), axis=1)
    corr = lambda x: float(np.corrcoef(r, x)[0, 1])
    return saved.get("seed"), saved.get("reward_video_fraction"), len(r), corr(coverage), corr(t_close), corr(tool_close)


def main(a):
    print("| run | seed | goal-video share of pairs | held-out frames | r vs coverage | r vs T near target "
          "| r vs tool near the goal image's tool |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in a.runs:
        if not os.path.exists(os.path.join(run, "args.json")):
            raise SystemExit(f"error: {run} has no args.json; pass dmo_sapo_diamond.py run folders")
        seed, share, n, c, t, tool = probe(run, a.goal_tool_xy)
        print(f"| {os.path.basename(run.rstrip('/'))} | {seed} | {share if share is not None else 'by frames (~0.2)'} "
              f"| {n} | {c:.3f} | {t:.3f} | {tool:.3f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
