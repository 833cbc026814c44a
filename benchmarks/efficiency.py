"""Sample and wall-clock efficiency of DMO vs PPO trained in the same global world model (paper Fig. 5 and 8: on
Push-T DMO needs 8M samples where PPO needs 40M). Reads the TensorBoard events of one run of each and prints the
world-model samples and the wall-clock each needs before its curve reaches a fraction of the way from the first
point to the best final point of the two.

    python benchmarks/efficiency.py --dmo runs/DMO_RUN --ppo runs/PPO_RUN --fraction 0.9
    python benchmarks/efficiency.py --dmo runs/DMO_RUN --ppo runs/PPO_RUN --tag eval/mean_coverage --smooth 1

The curve is `imagination/reward` (mean reward-model reward per world-model step, against world-model samples),
which both scripts log the same way, smoothed by a trailing mean of `--smooth` points. The imagined rewards are
standardised and may be negative, so the target is  r_0 + fraction (r_best - r_0)  with r_0 the mean of the two
runs' first smoothed points and r_best the larger final smoothed point. `--tag eval/mean_coverage` (or another
`eval/` scalar) compares instead the evaluations in the simulator that both scripts log against the same samples:
the quick ones during training (10 episodes; DMO every `eval_every` epochs, PPO every `eval_every` iterations) and
the final one. That curve measures the task, which a policy cannot raise by exploiting the world model; its first
point comes after some training. Wall-clock counts from each run's first event: give DMO the same --wm-checkpoint
and --reward-checkpoint as PPO so that neither includes training them (DMO's includes its RSSM pretraining, a cost
DMO does pay).
"""

import dataclasses

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@dataclasses.dataclass
class Args:
    dmo: str
    """run directory of dmo_sapo_diamond.py"""
    ppo: str
    """run directory of ppo_baseline.py --env world-model"""
    fraction: float = 0.9
    """fraction of the way from the first point to the best final point"""
    smooth: int = 10
    """points in the trailing mean that smooths each curve"""
    tag: str = "imagination/reward"
    """the TensorBoard scalar compared: imagination/reward (the paper's Fig. 8), or an eval/ scalar of the quick
    evaluations in the simulator, e.g. eval/mean_coverage"""


def read_curve(run_dir, tag, smooth):
    """-> samples (N,), smoothed values (N,), seconds since the run's first event (N,)."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        raise SystemExit(f"error: {run_dir}: no '{tag}' scalars (not a DMO or world-model PPO run, not started, or "
                         f"a run from before PPO's quick evaluations)")
    points = events.Scalars(tag)
    values = np.array([p.value for p in points])
    smoothed = np.array([values[max(0, i + 1 - smooth): i + 1].mean() for i in range(len(values))])
    return (np.array([p.step for p in points]), smoothed,
            np.array([p.wall_time for p in points]) - events.FirstEventTimestamp())


if __name__ == "__main__":
    args = tyro.cli(Args)
    curves = {"DMO": read_curve(args.dmo, args.tag, args.smooth), "PPO": read_curve(args.ppo, args.tag, args.smooth)}
    r0 = np.mean([values[0] for _, values, _ in curves.values()])
    best = max(values[-1] for _, values, _ in curves.values())
    target = r0 + args.fraction * (best - r0)
    if best <= r0:
        print(f"note: neither run ends above its first {args.tag}; the target below means little")
    print(f"{args.tag}: first {r0:.3f}, best final {best:.3f}, target ({args.fraction:.0%}) {target:.3f}\n")
    print("| method | samples to target | wall-clock to target | final value | samples in total | wall-clock in total |")
    print("| --- | --- | --- | --- | --- | --- |")
    needed = {}
    for name, (steps, values, seconds) in curves.items():
        hit = np.flatnonzero(values >= target)
        needed[name] = steps[hit[0]] if len(hit) else None
        to_target = f"{steps[hit[0]]:,} | {seconds[hit[0]] / 60:.1f} min" if len(hit) else "not reached | -"
        print(f"| {name} | {to_target} | {values[-1]:.3f} | {steps[-1]:,} | {seconds[-1] / 60:.1f} min |")
    below = [name for name, (_, values, _) in curves.items() if values[-1] < target]
    if below:  # a curve that touched the target and fell back did not reach it in any useful sense
        print(f"\n{' and '.join(below)} end{'s' * (len(below) == 1)} below the target: no sample ratio "
              f"(the paper, Push-T: PPO needs 5x DMO's)")
    elif needed["DMO"] and needed["PPO"]:
        print(f"\nPPO needs {needed['PPO'] / needed['DMO']:.1f}x the world-model samples of DMO (paper, Push-T: 5x)")
