"""The floors of rwm_mbpo_ppo.py's tasks: standing still (zero actions) and uniform random actions, scored by the
script's own `evaluate` on the start states and commands of each seed's final evaluation (seed + 20000) and of its
evaluations during training (seed + 10000).

    python benchmarks/rwm_references.py --seeds 1 2 3 --episodes 32
    python benchmarks/rwm_references.py --preset paper          # the Ant

Prints a table: mean tracking error, return, falls and successes per policy and evaluation set.
"""

import dataclasses
import os
import sys
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rwm_mbpo_ppo as rwm  # noqa: E402


@dataclasses.dataclass
class Args:
    preset: Literal["tiny", "default", "paper"] = "default"
    """the script's preset (its task, episode length and command schedule)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds whose evaluation sets are scored"""
    episodes: int = 32
    """episodes per evaluation set (the preset's eval_episodes by default in the script)"""


class Fixed:
    """A policy with the Agent's `actor` interface: zero actions, or uniform random ones."""

    def __init__(self, act_dim, random, seed):
        self.act_dim, self.random, self.gen = act_dim, random, torch.Generator().manual_seed(seed)

    def actor(self, obs):
        if self.random:
            return torch.rand(obs.shape[0], self.act_dim, generator=self.gen) * 2 - 1
        return torch.zeros(obs.shape[0], self.act_dim)


def main(a):
    args = rwm.Args(**rwm.PRESETS[a.preset])
    task = rwm.TASKS[args.env_id]
    print(f"{args.env_id}, {a.episodes} episodes of {args.episode_steps} steps per set\n")
    print("| policy | set | mean tracking error | return | falls | successes |\n| --- | --- | --- | --- | --- | --- |")
    for name, random in (("standing still", False), ("random actions", True)):
        for offset, set_name in ((20_000, "final"), (10_000, "during training")):
            rows = []
            for seed in a.seeds:
                policy = Fixed(task.act_dim, random, seed)
                rows.append(rwm.evaluate(policy, rwm.Normalizer(task.obs_dim), args, a.episodes, seed + offset))
            te, ret = np.array([r["mean_tracking_error"] for r in rows]), np.array([r["mean_return"] for r in rows])
            falls, succ = np.mean([r["fall_rate"] for r in rows]), np.mean([r["success_rate"] for r in rows])
            print(f"| {name} | {set_name} (seeds {', '.join(map(str, a.seeds))}) | {te.mean():.3f} ± {te.std():.3f} "
                  f"| {ret.mean():.2f} ± {ret.std():.2f} | {falls:.2f} | {succ:.2f} |", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
