"""Is DMO's gradient worth following? Two checks of a dmo_sapo_diamond.py run's local model.

The gate (dmo.action_gradient_gate, also printed by the script after RSSM pretraining): from play states, the
RSSM's one-step action gradient d R_phi(l') / d a through the decoupled step against the simulator's true reward
gradient (central differences of the simulator reset to the recorded state): mean cosine (the gate: >= 0.5),
the share of states where it points the right way, its size against the true one, the cosine by distance to the
target. On Push-T the true reward has no gradient until the tool meets the T, so the gate speaks for the reach
rung (and the other rungs where the reward is dense).

The DIAMOND check: from play-data windows, with random action
sequences of `horizon` steps, J(A) = sum_h r(o_{h+1}) is the global reward of the frames DIAMOND generates (fixed
sampler noise, so J is a deterministic function of the actions). DMO's gradient of J is that of sum_h R_phi(l_{h+1})
through the RSSM's prior along those frames (rssm.decoupled_step, as in the script). Two measurements:

1. Directional derivatives: g . d against the central difference (J(A + eps d) - J(A - eps d)) / 2 eps along random
   unit directions d; their correlation over rollouts and directions, the share with the same sign, and the central
   difference's own consistency (eps against eps / 3: near 1 means J is smooth at that scale, the gradient exists).
2. Open-loop ascent: Adam on the action sequences themselves, following DMO's gradient, its negation, or random
   directions; r per step in DIAMOND before and after. Following a useful gradient raises r, its negation lowers it.

    python benchmarks/dmo_gradient_check.py --runs runs/PushT-v0__dmo_sapo_diamond__1__TIME [--finetuned]
    python benchmarks/dmo_gradient_check.py --gate-only --runs runs/PushTReach-v0__dmo_sapo_diamond__1__TIME
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
    """dmo_sapo_diamond.py run folders with finished world-model, reward-model and RSSM checkpoints (or the
    --*-checkpoint paths recorded in their args.json)"""
    finetuned: bool = False
    """use the RSSM as fine-tuned during RL (agent.pt) instead of the pretrained one (rssm.pt), and DIAMOND as
    patched during RL (world_model_patched.pt, runs with --patch-every) instead of the trained one"""
    rollouts: int = 64
    """play-data windows the action sequences start from"""
    horizon: int = 8
    """steps of each action sequence"""
    eps: float = 0.3
    """step of the central differences (actions live in [-1, 1])"""
    directions: int = 6
    """random directions per rollout"""
    ascent_steps: int = 30
    """Adam steps of the open-loop ascent"""
    ascent_lr: float = 0.05
    """Adam learning rate on the actions"""
    seed: int = 0
    """seed of the starts, the actions, the directions and DIAMOND's sampler noise"""
    gate_states: int = 512
    """play states of the gate"""
    gate_only: bool = False
    """print the gate only (runs of the oracle, --forward-model sim, have no DIAMOND to check)"""


def load(run, finetuned, patched=None, diamond=True):
    """A run's args, play data, DIAMOND (as patched, if the run patched it and `patched`, default `finetuned`), r and
    RSSM (as fine-tuned in agent.pt with `finetuned`, else as pretrained). Without `diamond`: no DIAMOND, no r."""
    with open(os.path.join(run, "args.json")) as f:
        saved = json.load(f)
    args = dmo.Args(**{k: tuple(v) if k == "betas" else v for k, v in saved.items()
                       if k in {f.name for f in dataclasses.fields(dmo.Args)}})
    device = torch.device("cpu")
    data = dmo.load_play_data(args, device)
    denoiser = reward_model = None
    if diamond:
        denoiser = dmo.Denoiser(2, args.wm_context, args.wm_channels, args.wm_depths, args.wm_cond_channels).eval()
        patched_path = os.path.join(run, "world_model_patched.pt")
        use_patched = finetuned if patched is None else patched
        wm = patched_path if use_patched and os.path.exists(patched_path) else args.wm_checkpoint or os.path.join(run, "world_model.pt")
        denoiser.load_state_dict(dmo.load_checkpoint(wm, "world_model")["model"])
        reward_model = dmo.load_reward_model(args.reward_checkpoint or os.path.join(run, "reward_model.pt"))
    if args.local_obs == "state":
        data["local"] = torch.as_tensor(envs.state_observation(data["state"]))
    rssm = dmo.make_rssm(args, data).eval()
    if finetuned:
        rssm.load_state_dict(dmo.load_checkpoint(os.path.join(run, "agent.pt"), "agent")["rssm"])
    else:
        rssm.load_state_dict(dmo.load_checkpoint(args.rssm_checkpoint or os.path.join(run, "rssm.pt"), "rssm")["model"])
    for p in [*rssm.parameters(), *(denoiser.parameters() if diamond else []), *(reward_model.parameters() if diamond else [])]:
        p.requires_grad_(False)
    return args, data, denoiser, reward_model, rssm


def check(run, a):
    args, data, denoiser, reward_model, rssm = load(run, a.finetuned)
    torch.manual_seed(a.seed)
    goal = dmo.to_float(torch.as_tensor(envs.goal_image(args.env_id, args.img_size)).permute(2, 0, 1))
    goal_e = reward_model.embed(goal[None])
    args.num_envs = a.rollouts
    start = dmo.Rollouts(args, data, rssm, reward_model, goal_e, torch.device("cpu"))  # frames, actions, RSSM state
    B, H = a.rollouts, a.horizon

    def rollout(actions, grad):
        """J (B,) from DIAMOND's frames and r; with grad, also DMO's surrogate sum_h R_phi(l_{h+1}) (B,)."""
        frames, past, state = start.frames, start.actions, start.state
        generator = torch.Generator().manual_seed(a.seed)  # the same sampler noise for every call
        j, j_hat = 0.0, 0.0
        for h in range(H):
            action = actions[:, h]
            next_frame = denoiser.sample(frames, torch.cat([past, action.detach()[:, None]], 1),
                                         args.wm_denoising_steps, generator=generator)
            j = j + reward_model.reward(reward_model.embed(next_frame), start.start_e, goal_e.expand_as(start.start_e))
            if grad:
                state = rssm.decoupled_step(state, action, rssm.encode(next_frame / 2))
                j_hat = j_hat + rssm.reward(rssm.feat(state))
            frames = torch.cat([frames[:, 1:], next_frame[:, None]], 1)
            past = torch.cat([past[:, 1:], action.detach()[:, None]], 1)
        return j, j_hat

    def sequences():
        return torch.rand(B, H, 2) * 1.6 - 0.8  # inside [-1, 1] with room for the eps steps

    # 1. directional derivatives
    actions = sequences().requires_grad_(True)
    g = torch.autograd.grad(rollout(actions, True)[1].sum(), actions)[0]
    dots, diffs, diffs_small = [], [], []
    for _ in range(a.directions):
        d = torch.randn(B, H, 2)
        d = d / d.flatten(1).norm(dim=1)[:, None, None]
        for eps, out in ((a.eps, diffs), (a.eps / 3, diffs_small)):
            out.append((rollout(actions + eps * d, False)[0] - rollout(actions - eps * d, False)[0]) / (2 * eps))
        dots.append((g * d).flatten(1).sum(1))
    dots, diffs, diffs_small = (torch.cat(x).detach().numpy() for x in (dots, diffs, diffs_small))
    corr = float(np.corrcoef(dots, diffs)[0, 1])
    sign = float(((dots > 0) == (diffs > 0)).mean())
    smooth = float(np.corrcoef(diffs, diffs_small)[0, 1])

    # 2. open-loop ascent on the actions
    ascent = {}
    initial = sequences()
    for name in ("dmo", "negated", "random"):
        actions = initial.clone().requires_grad_(True)
        opt = torch.optim.Adam([actions], lr=a.ascent_lr)
        for step in range(a.ascent_steps + 1):
            j, j_hat = rollout(actions, True)
            if step == 0:
                before = j.mean().item() / H
            if step == a.ascent_steps:
                break
            direction = torch.autograd.grad(j_hat.sum(), actions)[0]
            direction = {"dmo": direction, "negated": -direction, "random": torch.randn_like(direction)}[name]
            actions.grad = -direction  # Adam minimises
            opt.step()
            with torch.no_grad():
                actions.clamp_(-1, 1)
        ascent[name] = (before, j.mean().item() / H)
    return corr, sign, smooth, ascent


def gate(run, a):
    args, data, _, _, rssm = load(run, a.finetuned, diamond=False)
    if data["state"] is None:
        raise SystemExit(f"error: {run}'s play data has no simulator states: the gate needs them")
    return dmo.action_gradient_gate(args, data, rssm, n=a.gate_states, seed=a.seed)


def main(a):
    print(f"gate: {a.gate_states} play states, random actions, RSSM {'fine-tuned' if a.finetuned else 'pretrained'}; "
          f"it passes at a mean cosine of {dmo.GATE_COSINE}")
    print("| run | cosine with the true gradient | right way | size vs true | cosine by distance to the target |")
    print("| --- | --- | --- | --- | --- |")
    for run in a.runs:
        g = gate(run, a)
        bins = ", ".join(f"{lo:.0f}-{hi:.0f} px {c:+.2f}" for lo, hi, c in g["by_distance"])
        print(f"| {os.path.basename(run.rstrip('/'))} | {g['cosine']:+.3f} | {g['positive']:.0%} of {g['states']} | "
              f"{g['size_ratio']:.2f}x | {bins} |")
    if a.gate_only:
        return
    print(f"rollouts {a.rollouts}, horizon {a.horizon}, eps {a.eps}, {a.directions} directions each; open-loop "
          f"ascent {a.ascent_steps} Adam steps at lr {a.ascent_lr}; RSSM {'fine-tuned' if a.finetuned else 'pretrained'}")
    print("| run | corr(DMO g.d, central difference) | same sign | central difference eps vs eps/3 "
          "| ascent r/step: DMO | negated | random |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in a.runs:
        needed = "agent.pt" if a.finetuned else "args.json"
        if not os.path.exists(os.path.join(run, needed)):
            raise SystemExit(f"error: {run} has no {needed}; pass dmo_sapo_diamond.py run folders")
        corr, sign, smooth, ascent = check(run, a)
        cells = " | ".join(f"{b:.3f} -> {e:.3f}" for b, e in ascent.values())
        print(f"| {os.path.basename(run.rstrip('/'))} | {corr:.3f} | {sign:.2f} | {smooth:.3f} | {cells} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
