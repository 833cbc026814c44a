"""The floors every learned policy is compared with: uniform random actions and zero actions (standing still) in
the simulators, on the same seeds as the training scripts' final evaluation (their `eval_seed`, 1_000_000 on), and
on `--sets` further disjoint sets of seeds to show the spread of a 50-episode evaluation.

    python benchmarks/random_policy.py --episodes 50 --sets 3
"""

import dataclasses
import os
import sys

import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402,F401  (registers the environments)


@dataclasses.dataclass
class Args:
    episodes: int = 50
    """evaluation episodes per set"""
    sets: int = 3
    """sets of seeds: eval_seed + k * episodes, ... for k = 0 .. sets - 1 (k = 0: the scripts' evaluation seeds)"""
    eval_seed: int = 1_000_000
    """first evaluation seed"""
    env_ids: tuple[str, ...] = ("PushTReach-v0", "PushTPuck-v0", "PushT-v0", "EgoPushCube-v0")
    """the simulators"""


def run(env_id, policy, seeds, rng):
    env = gym.make(env_id)
    successes, distance, coverage, returns = [], [], [], []
    for seed in seeds:
        env.reset(seed=seed)
        done, ret = False, 0.0
        while not done:
            action = rng.uniform(-1, 1, env.action_space.shape) if policy == "random" else np.zeros(env.action_space.shape)
            _, reward, terminated, truncated, info = env.step(action.astype(np.float32))
            ret += reward
            done = terminated or truncated
        successes.append(info["is_success"])
        distance.append(info.get("distance", np.nan))
        coverage.append(info.get("coverage", np.nan))
        returns.append(ret)
    return [np.mean(x) for x in (successes, distance, coverage, returns)]


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"{args.episodes} episodes a set, {args.sets} sets; mean over the sets ± their std")
    print("| environment | actions | success rate | final distance (px) | final coverage | mean return |")
    print("| --- | --- | --- | --- | --- | --- |")
    for env_id in args.env_ids:
        for policy in ("random", "zero"):
            rng = np.random.default_rng(0)
            rows = np.array([run(env_id, policy, range(args.eval_seed + k * args.episodes,
                                                       args.eval_seed + (k + 1) * args.episodes), rng)
                             for k in range(args.sets)])
            cells = [f"{m:.3f} ± {s:.3f}" if np.isfinite(m) else "-" for m, s in zip(rows.mean(0), rows.std(0))]
            print(f"| {env_id} | {policy} | " + " | ".join(cells) + " |", flush=True)
