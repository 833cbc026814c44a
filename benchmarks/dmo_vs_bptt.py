"""Cost of one actor update of DMO-SAPO (the global model steps the rollout under no_grad, the gradient goes through
the RSSM) against plain backpropagation through the global model's sampler, on the same batch and horizon:
  --world diamond    dmo_sapo_diamond.py: 3 Euler steps of DIAMOND x 16 frames, through the generated frames, the
                     reward model and the encoder;
  --world dreamerv4  dmo_sapo_dreamerv4.py: 4 shortcut steps of the dynamics x 16 frames after 32 real ones (A.4),
                     through the KV cache of the generated frames, the reward head, the decoder and the encoder.
Seed 000's claim: the latter is intractable at scale. Each measurement runs in a fresh process so that its
peak memory is its own (CPU: peak resident set size; CUDA: peak allocated memory).

    python benchmarks/dmo_vs_bptt.py                          # DIAMOND, `default` and `paper` sizes, CPU
    python benchmarks/dmo_vs_bptt.py --cuda --paper-batch 128  # on a GPU, the paper's 128 rollouts
    python benchmarks/dmo_vs_bptt.py --world dreamerv4 --sizes default   # DreamerV4 (`paper` needs a GPU)
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Literal, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmo_sapo_diamond as dmo  # noqa: E402
import dmo_sapo_dreamerv4 as dv4  # noqa: E402


@dataclasses.dataclass
class Args:
    world: Literal["diamond", "dreamerv4"] = "diamond"
    """the global world model (and its script) whose actor update is timed"""
    sizes: tuple[str, ...] = ("default", "paper")
    """the script's presets whose sizes are measured"""
    default_batch: int = 32
    """rollouts per update at the `default` size (the preset's num_envs)"""
    paper_batch: int = 1
    """rollouts per update at the `paper` size (the preset has 128; backprop through the sampler at 128 does
    not fit in this machine's 24 GB, so the CPU comparison uses a smaller, equal batch for both methods)"""
    horizon: int = 16
    """imagination steps per update (Table 4)"""
    cuda: bool = False
    """measure on the GPU"""
    one: Optional[str] = None
    """internal: measure one 'SIZE,METHOD,BATCH' in this process and print JSON"""


def differentiable_sample(denoiser, past_frames, past_actions, steps):
    """Denoiser.sample without no_grad and without the 8-bit quantisation (which has no gradient)."""
    b = len(past_frames)
    x = torch.randn(b, *past_frames.shape[2:], device=past_frames.device)
    sigmas = denoiser.sigmas(steps, past_frames.device)
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        s = sigma.expand(b)
        _, c_out, c_skip, _ = (c[:, None, None, None] for c in denoiser.conditioners(s))
        denoised = c_skip * x + c_out * denoiser.model_output(x, s, past_frames, past_actions)
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
    return x.clamp(-1, 1)


def bptt_actor_loss(args, actor, critic, rssm, denoiser, reward_model, goal_e, rollouts, alpha):
    """The same objective as dmo.imagine_horizon, differentiated through the global model itself."""
    state, frames, actions, ret = rollouts.state, rollouts.frames, rollouts.actions, 0.0
    no_reset = torch.zeros(len(frames), dtype=torch.bool, device=frames.device)
    for h in range(args.horizon):
        action, log_prob = actor(rssm.feat(state))
        next_frame = differentiable_sample(denoiser, frames, torch.cat([actions, action[:, None]], 1),
                                           args.wm_denoising_steps)
        state, _ = rssm.obs_step(state, action, rssm.encode(next_frame / 2), no_reset)
        r = reward_model.reward(reward_model.embed(next_frame), rollouts.start_e, goal_e.expand_as(rollouts.start_e))
        ret = ret + args.gamma**h * (r - alpha * log_prob)
        frames = torch.cat([frames[:, 1:], next_frame[:, None]], 1)
        actions = torch.cat([actions[:, 1:], action[:, None]], 1)
    ret = ret + args.gamma**args.horizon * critic.value(rssm.feat(state))
    return -ret.mean() / args.horizon


class ConcatCache:
    """dv4.KVCache's interface without its in-place writes into preallocated buffers (which autograd cannot follow):
    each pass concatenates its keys and values to the past, so gradients flow into earlier generated frames."""

    def __init__(self, layers):
        self.k, self.v, self.new = [None] * layers, [None] * layers, [None] * layers
        self.frames = self.length = 0

    def reserve(self, T, shape, like):
        pass

    def extend(self, i, k, v):
        if self.k[i] is not None:
            k, v = torch.cat([self.k[i], k], 2), torch.cat([self.v[i], v], 2)
        self.new[i] = (k, v)
        return k, v

    def commit(self, T):
        self.k, self.v = [k for k, _ in self.new], [v for _, v in self.new]
        self.frames, self.length = self.frames + T, self.length + T


def bptt_actor_loss_dreamerv4(args, actor, critic, rssm, tok, dyn, rollouts, alpha):
    """The objective of dv4.imagine_horizon, differentiated through the dynamics' sampler, its cache, the reward head,
    the decoder and the RSSM's encoder; the same init_context real frames fill the cache first."""
    first = rollouts.starts[torch.arange(len(rollouts.obs)) % len(rollouts.starts)]
    idx = (first[:, None] + torch.arange(args.init_context)).to(rollouts.obs.device)
    cache = ConcatCache(args.dyn_layers)
    with torch.no_grad():
        dv4.observe(dyn, cache, tok.encode(dv4.to_float(rollouts.data["obs"][idx])),
                    dv4.actions_into(rollouts.data["action"][idx]), args.dyn_context_noise)
    state, ret, steps = rollouts.state, 0.0, args.dyn_sampling_steps
    no_reset = torch.zeros(len(rollouts.obs), dtype=torch.bool, device=rollouts.obs.device)
    for h in range(args.horizon):
        action, log_prob = actor(rssm.feat(state))
        z = torch.randn(len(action), 1, dyn.latents, dyn.bottleneck, device=action.device)
        d = torch.full((len(action), 1), 1.0 / steps, device=action.device)
        for k in range(steps):  # dv4.generate, with gradient
            tau = torch.full_like(d, k / steps)
            pred, _ = dyn(z, tau, d, action[:, None], cache=cache, write=False)
            z = z + (pred - z) * (1.0 / steps) / (1 - tau[..., None, None])
        logits = dv4.observe(dyn, cache, z, action[:, None], args.dyn_context_noise)
        frame = tok.decode(z[:, 0]).clamp(-1, 1)
        state, _ = rssm.obs_step(state, action, rssm.encode(frame / 2), no_reset)
        r = dv4.expected_reward(logits[:, 0])
        ret = ret + args.gamma**h * (r + alpha * dv4.scaled_entropy(-log_prob, args.target_entropy))
    ret = ret + args.gamma**args.horizon * critic.value(rssm.feat(state))
    return -ret.mean() / args.horizon


def setup_dreamerv4(size, method, batch, horizon, device):
    """Random weights (the cost does not depend on training), random play frames; the rollouts restarted."""
    args = dv4.Args(**{**dv4.PRESETS[size], "num_envs": batch, "horizon": horizon, "episode_length": horizon})
    tok, dyn = dv4.make_tokenizer(args).to(device), dv4.make_dynamics(args).to(device)
    rssm = dv4.make_rssm(args).to(device)
    for p in [*tok.parameters(), *dyn.parameters()]:
        p.requires_grad_(method == "bptt")  # BPTT differentiates through them; DMO never does
    actor = dv4.Actor(rssm.feat_dim, dv4.ACTION_DIM, args.hidden).to(device)
    critic = dv4.Critic(rssm.feat_dim, args.hidden).to(device)
    n, S = args.init_context + 8, args.img_size
    label = torch.zeros(n, dtype=torch.long, device=device)
    data = {"obs": torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, device=device),
            "action": torch.rand(n, dv4.ACTION_DIM, device=device) * 2 - 1,
            "is_first": torch.zeros(n, dtype=torch.bool, device=device), "episode": torch.zeros(n, dtype=torch.long),
            "label": label, "reward": label.float()}
    rollouts = dv4.Rollouts(args, data, rssm, tok, dyn, device)
    rollouts.restart()
    return args, actor, critic, rssm, tok, dyn, rollouts


def measure(size, method, batch, horizon, cuda, world="diamond"):
    device = torch.device("cuda" if cuda else "cpu")
    if world == "dreamerv4":
        torch.manual_seed(0)
        args, actor, critic, rssm, tok, dyn, rollouts = setup_dreamerv4(size, method, batch, horizon, device)
        alpha = torch.tensor(0.1, device=device)
        forward = lambda: (-sum(dv4.imagine_horizon(args, actor, critic, rssm, rollouts, alpha)[0]).mean() / horizon
                           if method == "dmo" else
                           bptt_actor_loss_dreamerv4(args, actor, critic, rssm, tok, dyn, rollouts, alpha))
        return timed(forward, actor, cuda)
    args = dmo.Args(**{**dmo.PRESETS[size], "num_envs": batch, "horizon": horizon, "episode_length": horizon})
    S = args.img_size
    torch.manual_seed(0)
    denoiser = dmo.Denoiser(2, args.wm_context, args.wm_channels, args.wm_depths, args.wm_cond_channels).to(device)
    for p in denoiser.parameters():  # random weights: the cost does not depend on training
        p.data.normal_(0, 0.02)
    reward_model = dmo.RewardModel(S).to(device)
    rssm = dmo.RSSM(dmo.RSSMConfig.preset(args.rssm_size, obs_shape=(3, S, S), action_dim=2)).to(device)
    for p in [*denoiser.parameters(), *reward_model.parameters()]:
        p.requires_grad_(method == "bptt")  # BPTT differentiates through them; DMO never does
    actor, critic = dmo.Actor(rssm.feat_dim, 2, args.hidden).to(device), dmo.Critic(rssm.feat_dim, args.hidden).to(device)
    goal_e = reward_model.embed(torch.zeros(1, 3, S, S, device=device)).detach()
    data = {"obs": torch.randint(0, 256, (64, 3, S, S), dtype=torch.uint8, device=device),
            "action": torch.rand(64, 2, device=device) * 2 - 1, "is_first": torch.zeros(64, dtype=torch.bool),
            "episode": torch.zeros(64, dtype=torch.long)}
    rollouts = dmo.Rollouts(args, data, rssm, reward_model, goal_e, device, denoiser)
    alpha = torch.tensor(0.1, device=device)
    forward = lambda: (-sum(dmo.imagine_horizon(args, actor, critic, rssm, rollouts, alpha)[0]).mean() / args.horizon
                       if method == "dmo" else
                       bptt_actor_loss(args, actor, critic, rssm, denoiser, reward_model, goal_e, rollouts, alpha))
    return timed(forward, actor, cuda)


def timed(forward, actor, cuda):
    """Time the actor loss' forward pass and its backward pass into the actor; the peak memory they add."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = forward()
    t1 = time.perf_counter()
    loss.backward(inputs=list(actor.parameters()))
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad = sum(p.grad.norm() ** 2 for p in actor.parameters()).sqrt().item()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "peak_mb": (peak - base) / 2**20, "grad_norm": grad}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.one:
        size, method, batch = args.one.split(",")
        print(json.dumps(measure(size, method, int(batch), args.horizon, args.cuda, args.world)))
        sys.exit(0)
    print(f"one actor update, {args.world}")
    print("| size | batch x horizon | method | forward s | backward s | update s | peak memory MB | "
          "DMO cheaper: time / memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        batch, rows = args.paper_batch if size == "paper" else args.default_batch, {}
        for method in ("dmo", "bptt"):
            cmd = [sys.executable, __file__, "--one", f"{size},{method},{batch}", "--horizon", str(args.horizon),
                   "--world", args.world]
            out = subprocess.run(cmd + (["--cuda"] if args.cuda else []), capture_output=True, text=True)
            if out.returncode != 0:
                rows[method] = None
                print(f"| {size} | {batch} x {args.horizon} | {method} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = ""
            if method == "bptt" and rows.get("dmo"):
                d = rows["dmo"]
                ratio = (f"{(r['forward_s'] + r['backward_s']) / (d['forward_s'] + d['backward_s']):.1f}x / "
                         f"{r['peak_mb'] / max(d['peak_mb'], 1e-3):.0f}x")
            print(f"| {size} | {batch} x {args.horizon} | {method} | {r['forward_s']:.2f} | {r['backward_s']:.2f} | "
                  f"{r['forward_s'] + r['backward_s']:.2f} | {r['peak_mb']:.0f} | {ratio} |", flush=True)
