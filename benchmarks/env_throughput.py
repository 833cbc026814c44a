"""Steps per second of the simulated robots with 64x64 pixel observations (random actions, auto-reset).

    python benchmarks/env_throughput.py --seconds 10
"""

import dataclasses
import os
import sys
import time

import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402,F401  (registers the environments)


@dataclasses.dataclass
class Args:
    seconds: float = 10.0
    """how long to step each environment"""
    seed: int = 0
    """seed of the actions and resets"""


def steps_per_second(env_id, seconds, seed):
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (10_000, *env.action_space.shape)).astype(np.float32)
    env.reset(seed=seed)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(actions[n % len(actions)])
        n += 1
        if terminated or truncated:
            env.reset()
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    args = tyro.cli(Args)
    print("| environment | observation | steps/s | ms/step |")
    print("| --- | --- | --- | --- |")
    for env_id in ("PushT-v0", "EgoPushCube-v0"):
        sps = steps_per_second(env_id, args.seconds, args.seed)
        print(f"| {env_id} | 64x64 RGB | {sps:.0f} | {1000 / sps:.3f} |")
