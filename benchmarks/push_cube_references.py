"""The references ACT (and DMO on Push-Cube) are read against: the scripted demonstrator that recorded the
demonstrations (privileged: it knows the cube's pose), uniform random actions, zero actions and driving straight
ahead (forward at full speed), evaluated exactly as
act_baseline.py evaluates a policy (its `evaluate`, Table 1's metrics) on the same seeds (eval_seed on) and on
further disjoint sets of seeds for the spread.

    python benchmarks/push_cube_references.py --episodes 50 --sets 3
    python benchmarks/push_cube_references.py --start near --controllers default   # the easier rung's references
"""

import dataclasses
import os
import sys
import time

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import act_baseline as act  # noqa: E402
import envs  # noqa: E402


@dataclasses.dataclass
class Args:
    episodes: int = 50
    """evaluation episodes per set"""
    sets: int = 3
    """sets of seeds: eval_seed + k * episodes, ... for k = 0 .. sets - 1 (k = 0: act_baseline.py's evaluation)"""
    eval_seed: int = 1_000_000
    """first evaluation seed"""
    controllers: tuple[str, ...] = ("default", "alt")
    """low-level controllers to evaluate under"""
    start: str = "full"
    """start distribution of the episodes (envs.EGO_STARTS: full, near)"""


class Demonstrator:
    """envs.push_cube_demonstrator for each episode of the batch (its noise as in the demonstrations)."""

    def __init__(self, episodes, seed):
        self.policies = [envs.push_cube_demonstrator(None, np.random.default_rng(seed + i)) for i in range(episodes)]

    def act(self, frames, states, t, infos):
        return np.stack([p(None, info) for p, info in zip(self.policies, infos)])


class Constant:
    def __init__(self, kind, seed):
        self.kind, self.rng = kind, np.random.default_rng(seed)

    def act(self, frames, states, t, infos):
        shape = (len(frames), 3)
        if self.kind == "random":
            return self.rng.uniform(-1, 1, shape).astype(np.float32)
        return np.tile(np.array([1.0, 0.0, 0.0] if self.kind == "forward" else [0.0] * 3, np.float32), (len(frames), 1))


def fmt(rows, key):
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"{args.episodes} episodes a set, {args.sets} sets, {args.start} start distribution; mean over the sets ± "
          f"their std (Table 1's metrics over the successful episodes of a set)")
    print("| controller | policy | success rate | steps to success | straightness | curvature | cube to net (m) | "
          "touched the cube | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for controller in args.controllers:
        for name in ("demonstrator", "random", "zero", "forward"):
            rows, t0 = [], time.time()
            for k in range(args.sets):
                seed = args.eval_seed + k * args.episodes
                policy = Demonstrator(args.episodes, seed) if name == "demonstrator" else Constant(name, seed)
                rows.append(act.evaluate(policy, args.episodes, seed, controller, start=args.start)[0])
            print(f"| {controller} | {name} | {fmt(rows, 'success_rate')} | {fmt(rows, 'steps_to_success_mean')} | "
                  f"{fmt(rows, 'straightness_mean')} | {fmt(rows, 'curvature_mean')} | "
                  f"{fmt(rows, 'mean_final_cube_to_net_m')} | {fmt(rows, 'touched_cube_fraction')} | "
                  f"{time.time() - t0:.0f} |", flush=True)
