"""The floor every learned policy is compared with: uniform random actions in the simulators, evaluated on the
same seeds as the training scripts' final evaluation (their `eval_seed`, 1_000_000 on).

    python benchmarks/random_policy.py --episodes 50
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
    """evaluation episodes per environment"""
    eval_seed: int = 1_000_000
    """first evaluation seed"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    print("| environment | episodes | success rate | mean final coverage | mean return |")
    print("| --- | --- | --- | --- | --- |")
    for env_id in ("PushT-v0", "EgoPushCube-v0"):
        env = gym.make(env_id)
        rng = np.random.default_rng(0)
        successes, coverage, returns = [], [], []
        for i in range(args.episodes):
            env.reset(seed=args.eval_seed + i)
            done, ret = False, 0.0
            while not done:
                _, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
                ret += reward
                done = terminated or truncated
            successes.append(info["is_success"])
            coverage.append(info.get("coverage", np.nan))
            returns.append(ret)
        cov = f"{np.mean(coverage):.3f}" if env_id == "PushT-v0" else "-"
        print(f"| {env_id} | {args.episodes} | {np.mean(successes):.2f} | {cov} | {np.mean(returns):.2f} |")
