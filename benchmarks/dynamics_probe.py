"""Does the DreamerV4 dynamics of a dmo_sapo_dreamerv4.py run predict the next frame better than copying the last one?
On fixed play windows (the run's tokenizer): the x-prediction of the last frame's latents with the context at the
generation's noise level and the last frame from pure noise (tau 0) or nearly clean (tau 7/8 of K_max 8), against
copying the previous frame's latents; and one generated frame's pixel MSE against the number of sampling steps.
With --train-steps N, a fresh dynamics is trained on the run's tokenizer instead (--bootstrap-fraction, --lr) and
probed every 100 steps: how the step-size draw changes what it learns (results/dmo_sapo_dreamerv4.md).

    python benchmarks/dynamics_probe.py --run runs/RUN
    python benchmarks/dynamics_probe.py --run runs/RUN --train-steps 500 --bootstrap-fraction 0.25 --lr 1e-3
"""

import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dmo_sapo_dreamerv4 as dv4  # noqa: E402


@dataclasses.dataclass
class Args:
    run: str
    """a run directory with dynamics.pt (unless --train-steps) and tokenizer.pt (or the --tok-checkpoint it started from)"""
    windows: int = 64
    """play windows probed"""
    context: int = 8
    """real frames before the predicted one"""
    train_steps: int = 0
    """train a fresh dynamics for this many steps instead of probing the run's"""
    bootstrap_fraction: float = 0.25
    """with --train-steps: share of frames on bootstrap targets (the script's --dyn-bootstrap-fraction)"""
    lr: float = 3e-4
    """with --train-steps: AdamW learning rate (100-step warm-up)"""
    seed: int = 0
    """seed of the windows, the noise and the fresh dynamics"""


def load(run):
    with open(os.path.join(run, "args.json")) as f:
        saved = json.load(f)
    args = dv4.Args(**{k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    data = dv4.load_play_data(args, torch.device("cpu"), verbose=False)
    tok = dv4.make_tokenizer(args)
    path = os.path.join(run, "tokenizer.pt")
    path = path if os.path.exists(path) else args.tok_checkpoint or path  # a run started from --tok-checkpoint
    tok.load_state_dict(dv4.load_checkpoint(path, "tokenizer", args)["model"])
    return args, data, tok.eval()


@torch.no_grad()
def probe(args, dyn, z, into, frames, L, tok):
    """Teacher-forced latent MSE of the last frame from tau 0 and from tau 7/8-ish, and copying's."""
    K, n = dyn.max_shortcut, len(z)
    tau_ctx = min(round((1 - args.dyn_context_noise) * K), K - 1) / K
    out = {}
    for name, tau_last in (("from_noise", 0.0), ("from_ctx_level", tau_ctx)):
        tau = torch.full((n, L + 1), tau_ctx)
        tau[:, -1] = tau_last
        d = torch.full((n, L + 1), 1 / K)
        noisy = (1 - tau[..., None, None]) * torch.randn_like(z[:, :L + 1]) + tau[..., None, None] * z[:, :L + 1]
        pred, _ = dyn(noisy, tau, d, into[:, :L + 1])
        out[name] = F.mse_loss(pred[:, -1], z[:, L]).item()
    out["copy_last"] = F.mse_loss(z[:, L - 1], z[:, L]).item()
    for steps in (1, 2, 4):
        if steps <= K:
            cache = dv4.KVCache(args.dyn_layers, args.dyn_max_context)
            dv4.observe(dyn, cache, z[:, :L], into[:, :L], args.dyn_context_noise)
            zt, _ = dv4.generate(dyn, cache, into[:, L], steps, args.dyn_context_noise)
            out[f"pixels_{steps}_steps"] = F.mse_loss(tok.decode(zt[:, 0]).clamp(-1, 1), frames[:, L]).item()
    out["pixels_copy_last"] = F.mse_loss(frames[:, L - 1], frames[:, L]).item()
    return out


def main(a):
    torch.set_num_threads(1)
    args, data, tok = load(a.run)
    torch.manual_seed(a.seed)
    L = a.context
    starts = dv4.window_starts(data, L + 1)
    idx = starts[torch.randint(len(starts), (a.windows,))][:, None] + torch.arange(L + 1)
    frames = dv4.to_float(data["obs"][idx])
    with torch.no_grad():
        z = tok.encode(frames)
    into = dv4.actions_into(data["action"][idx])
    header = ("| step | latents from noise | latents from tau_ctx | copy last | pixels 1 / 2 / 4 steps | pixels copy "
              "last |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    row = lambda step, r: (f"| {step} | {r['from_noise']:.4f} | {r['from_ctx_level']:.4f} | {r['copy_last']:.4f} | "
                           f"{r['pixels_1_steps']:.4f} / {r['pixels_2_steps']:.4f} / {r['pixels_4_steps']:.4f} | "
                           f"{r['pixels_copy_last']:.4f} |")
    if a.train_steps == 0:
        dyn = dv4.make_dynamics(args)
        ckpt = dv4.load_checkpoint(os.path.join(a.run, "dynamics.pt"), "dynamics", args)
        dyn.load_state_dict(ckpt["model"])
        print(f"{a.run}: the run's dynamics after {ckpt['step']} steps, {a.windows} windows, {L} frames of context")
        print(header)
        print(row(ckpt["step"], probe(args, dyn.eval(), z, into, frames, L, tok)))
        return
    dyn = dv4.make_dynamics(args)
    opt = torch.optim.AdamW(dyn.parameters(), lr=a.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    T = args.dyn_seq_len
    train_starts = dv4.window_starts(data, T)
    print(f"{a.run}: a fresh dynamics, bootstrap fraction {a.bootstrap_fraction}, lr {a.lr}, {a.train_steps} steps "
          f"of {args.dyn_batch_size} x {T} frames")
    print(header)
    t0 = time.time()
    for step in range(a.train_steps):
        ids = train_starts[torch.randint(len(train_starts), (args.dyn_batch_size,))][:, None] + torch.arange(T)
        with torch.no_grad():
            z1 = tok.encode(dv4.to_float(data["obs"][ids]))
        tau, d = dv4.sample_shortcut(ids.shape, args.dyn_max_shortcut, a.bootstrap_fraction)
        loss, _ = dv4.dynamics_loss(dyn, z1, dv4.actions_into(data["action"][ids]), data["label"][ids],
                                    torch.randn_like(z1), tau, d, args.reward_loss_scale)
        dv4.optimizer_step(dyn, opt, sched, loss)
        if (step + 1) % 100 == 0 or step + 1 == a.train_steps:
            dyn.eval()
            print(row(step + 1, probe(args, dyn, z, into, frames, L, tok)) + f" {time.time() - t0:.0f} s", flush=True)
            dyn.train()


if __name__ == "__main__":
    main(tyro.cli(Args))
