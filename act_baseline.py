"""ACT, the behaviour-cloning baseline of seed 000 ("Coupled Local and Global World Models for Efficient First Order
RL", Table 1, Table 3, Fig. 13): Action Chunking with Transformers (Zhao et al., RSS 2023; tonyzhaozh/act) trained on
the scripted, noisy demonstrations of the ego-centric Push-Cube robot (envs.py) and deployed in the simulator.

    python act_baseline.py --seed 1                           # 50 demonstrations, a CPU-sized ACT (README)
    python act_baseline.py --seed 1 --num-demos 10            # fewer demonstrations
    python act_baseline.py --seed 1 --start near              # the task's last stage (dmo_sapo_dreamerv4.py's default)
    python act_baseline.py --seed 1 --data-path demos.npz     # your own demonstrations (the data format of README)
    python act_baseline.py --resume runs/RUN --eval-controller alt  # the trained policy under the other controller
    python act_baseline.py --seed 1 --preset paper            # the ACT paper's sizes (on a GPU)

What the policy sees: the robot's ego-centric camera frame, and nothing else by default (`--robot-state
last-action` adds the velocity command sent last, which a real robot knows; with these autocorrelated
demonstrations it did worse, results/act_baseline.md); the cube's pose is never an input. The training loop is ACT's: a CVAE whose encoder (a transformer over [CLS, state,
action chunk]) gives a style latent z; a transformer encoder over [z, state, image features] and a decoder with k
learned queries predict the next k actions; loss L1 + kl_weight * KL; z = 0 at test time. ACT's ResNet18 backbone is
ImageNet-pretrained: no pretrained weights can be downloaded here, so a small CNN is trained from scratch.
"""

import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import envs


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    preset: Literal["tiny", "default", "paper"] = "default"
    """sizes and budgets (each preset's values are listed at the top of --help); flags given on the command line
    override the preset"""
    seed: int = 1
    """seed of the experiment (network initialisation, minibatches, the train/validation split)"""
    torch_deterministic: bool = True
    """`torch.backends.cudnn.deterministic = True`"""
    cuda: bool = True
    """use CUDA if available"""
    capture_video: bool = True
    """write videos of evaluation episodes (top-down view beside the robot's camera) to the run directory"""
    runs_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """a run directory: continue its training from act.pt, or, if it finished, evaluate its policy again; only
    --train-steps (train on), --save-every and the evaluation flags (--eval-controller, --eval-episodes,
    --temporal-ensemble, ...) may change"""
    save_every: int = 500
    """training steps between checkpoints (and one at the end); Ctrl-C saves one too"""

    # Demonstrations
    env_id: Literal["EgoPushCube-v0"] = "EgoPushCube-v0"
    """the task (the demonstrator of envs.py exists for the ego-centric Push-Cube robot)"""
    start: Literal["full", "near"] = "full"
    """where the demonstrations and the evaluation episodes start (envs.EgoPushCubeEnv): full = anywhere in the room
    (the paper's task); near = its last stage, the cube before the net (dmo_sapo_dreamerv4.py's `default`)"""
    num_demos: int = 50
    """demonstration episodes to train on: collected into {data_dir}/{env_id}[_near]_demos_{num_demos}.npz when
    missing (reset seeds 0 .. num_demos-1), or the first num_demos of --data-path (0: all of them)"""
    data_dir: str = "data"
    """where collected demonstrations live"""
    data_path: Optional[str] = None
    """any data file of the format in README: its frames marked `is_demo` (all frames if it has no `is_demo`)"""
    val_fraction: float = 0.2
    """demonstrations held out for the validation loss that picks the best checkpoint (ACT: 20 %)"""

    # ACT (ALGORITHMS.md §8; the ACT paper's values in the `paper` preset)
    robot_state: Literal["none", "last-action", "odometry"] = "none"
    """the robot-state input beside the camera: none (a zero vector); last-action (the velocity command sent before
    this frame, which a real robot knows; with these noisy demonstrations it invites copying the last action); or
    odometry (the last action and the robot's pose x, y, cos yaw, sin yaw in the room, read from the data file's
    `state`: a diagnostic, a real robot's odometry drifts)"""
    chunk_size: int = 10
    """k, actions predicted per query (ACT: 100 at 50 Hz = 2 s; 10 at this robot's 5 Hz)"""
    hidden_dim: int = 128
    """transformer width (ACT: 512)"""
    nheads: int = 4
    """attention heads (ACT: 8)"""
    dim_feedforward: int = 512
    """feed-forward width (ACT: 3200)"""
    enc_layers: int = 2
    """layers of the policy's transformer encoder (ACT: 4)"""
    dec_layers: int = 1
    """decoder layers (ACT configures 7 but, through a slice in its code, uses the first one only)"""
    cvae_layers: int = 2
    """layers of the CVAE encoder (ACT: 4)"""
    latent_dim: int = 32
    """size of the style latent z (ACT: 32)"""
    dropout: float = 0.1
    """dropout in the transformers (ACT: 0.1)"""
    kl_weight: float = 10.0
    """beta of L1 + beta * KL (ACT: 10)"""
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    """channels of the stride-2 convolutions of the image backbone (trained from scratch: 64x64 -> 8x8 tokens)"""

    # Optimisation
    train_steps: int = 3000
    """gradient steps"""
    batch_size: int = 32
    """samples per step (ACT: 8)"""
    learning_rate: float = 1e-4
    """AdamW learning rate, backbone included (ACT: 1e-5 for both; larger here for a small model trained briefly)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (ACT: 1e-4)"""

    # Evaluation in the simulator
    temporal_ensemble: bool = False
    """deploy with temporal ensembling (query every step, average the chunks' predictions for this step with weights
    exp(-m i), i = 0 the oldest); off: query every k steps and execute the chunk (ACT's two modes)"""
    ensemble_m: float = 0.01
    """m of the ensembling weights (ACT: 0.01)"""
    eval_both: bool = True
    """also evaluate the other mode (with/without ensembling) and store it under eval.json's `other_mode`"""
    eval_controller: Literal["default", "alt"] = "default"
    """the robot's low-level controller at evaluation (the demonstrations use the default one; `alt` is the slower,
    weaker one of the robustness test, Fig. 12); `alt` writes eval_alt.json"""
    eval_episodes: int = 50
    """final evaluation episodes"""
    eval_every: int = 500
    """training steps between validation losses and quick evaluations in the simulator (0: never; the best
    checkpoint is then the last one)"""
    eval_quick_episodes: int = 10
    """episodes of a quick evaluation"""
    eval_seed: int = 1_000_000
    """first evaluation seed (demonstrations use seeds from 0: the two never meet)"""

    # filled in at runtime
    run_name: str = ""
    """the run directory's name"""


PRESETS = {
    "tiny": dict(num_demos=3, hidden_dim=32, nheads=2, dim_feedforward=64, enc_layers=1, cvae_layers=1,
                 latent_dim=8, cnn_channels=[8, 8, 8], train_steps=20, batch_size=8, eval_episodes=2, eval_every=10,
                 eval_quick_episodes=2, save_every=10),
    "default": dict(),  # the field defaults above: trains and evaluates on a 2-core CPU (README)
    "paper": dict(hidden_dim=512, nheads=8, dim_feedforward=3200, enc_layers=4, dec_layers=1, cvae_layers=4,
                  cnn_channels=[64, 128, 256, 512], train_steps=10_000, batch_size=8, learning_rate=1e-5,
                  eval_every=500),  # ACT's simulated tasks: 2000 epochs of 40 training episodes at batch 8
}

MODEL_FIELDS = ["robot_state", "chunk_size", "hidden_dim", "nheads", "dim_feedforward", "enc_layers", "dec_layers",
                "cvae_layers", "latent_dim", "cnn_channels"]  # what a checkpoint must agree on to be loaded
RESUME_FIELDS = ["train_steps", "save_every", "temporal_ensemble", "ensemble_m", "eval_both", "eval_controller",
                 "eval_episodes", "eval_quick_episodes", "eval_seed", "capture_video"]  # what a resumed run may change


class RunError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


# ----------------------------------------------------------------------------------------------------
# Demonstrations: episodes of (frame, proprioception, action); chunk targets with ACT's padding
# ----------------------------------------------------------------------------------------------------
def load_demonstrations(args):
    """The demonstration episodes of --data-path, or of a collected file. Returns the data dict and the
    [(start, end)] of the episodes used."""
    if args.data_path:
        path = args.data_path
    else:
        start = "" if args.start == "full" else f"_{args.start}"
        path = os.path.join(args.data_dir, f"{args.env_id}{start}_demos_{args.num_demos}.npz")
        if not os.path.exists(path):
            print(f"collecting {args.num_demos} scripted demonstrations into {path}")
            envs.save_dataset(path, envs.collect(args.env_id, 10**12, seed=0, demo_fraction=1.0,
                                                 max_episodes=args.num_demos, start=args.start))
    data = envs.load_dataset(path)  # validates keys, dtypes and shapes (envs.DatasetError: one line)
    if data["action"].shape[1] != 3 or data["obs"].shape[1:] != (64, 64, 3):
        raise RunError(f"{path}: ACT here takes 64x64 frames and 3-d actions (EgoPushCube-v0), the file has "
                       f"{list(data['obs'].shape[1:])} frames and {data['action'].shape[1]}-d actions")
    if args.robot_state == "odometry" and "state" not in data:
        raise RunError(f"{path}: --robot-state odometry reads the robot's pose from the key `state`, which this "
                       f"file lacks")
    is_demo = data.get("is_demo", np.ones(len(data["obs"]), bool))
    episodes = [(s, e) for s, e in envs.episode_bounds(data["is_first"]) if is_demo[s:e].all() and e - s >= 2]
    if not episodes:
        raise RunError(f"{path}: no demonstration episode of at least 2 frames (key `is_demo`)")
    if args.num_demos and args.data_path:
        if len(episodes) < args.num_demos:
            raise RunError(f"{path}: {len(episodes)} demonstration episodes, fewer than --num-demos {args.num_demos} "
                           f"(--num-demos 0 uses all of them)")
        episodes = episodes[: args.num_demos]
    return data, episodes


def proprioception(actions, is_first):
    """The velocity command sent before each frame (zero at an episode's first frame). (N, A) -> (N, A)."""
    state = np.concatenate([np.zeros_like(actions[:1]), actions[:-1]])
    state[is_first] = 0.0
    return state


STATE_DIMS = {"last-action": 3, "none": 3, "odometry": 7}


def robot_state(kind, last_action, pose):
    """The policy's state input (--robot-state) from the last action (N, 3) and the robot's pose (N, 3: x, y, yaw;
    used by `odometry` only)."""
    if kind == "none":
        return np.zeros_like(last_action)
    if kind == "last-action":
        return last_action
    return np.concatenate([last_action, pose[:, :2], np.cos(pose[:, 2:3]), np.sin(pose[:, 2:3])], 1).astype(np.float32)


def chunk_targets(actions, start, end, t, k):
    """ACT's target for the frame at t of the episode [start, end): the actions t .. t+k-1 and a mask of the ones
    past the episode's last action (padding, left out of the loss). The episode's last frame has no action (no
    frame follows it), so its actions are those of frames start .. end-2. -> (k, A) targets, (k,) bool is_pad."""
    idx = np.arange(t, t + k)
    is_pad = idx >= end - 1
    target = np.where(is_pad[:, None], 0.0, actions[np.minimum(idx, end - 2)])
    return target.astype(np.float32), is_pad


class Demonstrations:
    """The training (or validation) episodes as tensors, with ACT's normalisation: states and actions standardised
    by the training episodes' mean and std (std at least 1e-2), frames scaled to [-1, 1]."""

    def __init__(self, data, episodes, k, stats=None, kind="last-action"):
        self.episodes, self.k = episodes, k
        self.obs, self.actions = data["obs"], data["action"]
        self.state = robot_state(kind, proprioception(data["action"], data["is_first"]), data.get("state"))
        rows = np.concatenate([np.arange(s, e - 1) for s, e in episodes])  # frames with an action
        self.stats = stats or {
            "action_mean": self.actions[rows].mean(0), "action_std": np.maximum(self.actions[rows].std(0), 1e-2),
            "state_mean": self.state[rows].mean(0), "state_std": np.maximum(self.state[rows].std(0), 1e-2)}
        self.frames = [(t, s, e) for s, e in episodes for t in range(s, e - 1)]  # (frame, its episode)

    def batch(self, idx, device):
        """Samples `idx` (indices into self.frames) -> frames (B, 3, 64, 64), states (B, A), targets (B, k, A),
        is_pad (B, k), all normalised."""
        rows = [self.frames[i] for i in idx]
        t = np.array([r[0] for r in rows])
        chunks = [chunk_targets(self.actions, s, e, ti, self.k) for ti, s, e in rows]
        st = self.stats
        target = (np.stack([c[0] for c in chunks]) - st["action_mean"]) / st["action_std"]
        is_pad = np.stack([c[1] for c in chunks])
        target[is_pad] = 0.0
        as_tensor = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
        return (frames_to_input(as_tensor(self.obs[t], torch.uint8)),
                as_tensor((self.state[t] - st["state_mean"]) / st["state_std"]),
                as_tensor(target), as_tensor(is_pad, torch.bool))


def frames_to_input(frames):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------
# ACT: DETR-style transformer layers (post-norm, positions added to queries and keys in every layer)
# ----------------------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff, dropout):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x, pos, key_padding_mask=None):
        q = k = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d, heads, ff, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, d))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(self, tgt, memory, query_pos, memory_pos):
        q = k = tgt + query_pos
        tgt = self.norms[0](tgt + self.drops[0](self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.drops[1](attended))
        return self.norms[2](tgt + self.drops[2](self.ff(tgt)))


def sinusoid_table(n, d):
    """The fixed 1-d sine/cosine position table of the CVAE encoder's input (as in "Attention is all you need")."""
    pos, i = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(d)[None]
    angle = pos / 10000 ** (2 * (i // 2) / d)
    return torch.where(i % 2 == 0, angle.sin(), angle.cos())


def sine_2d(h, w, d):
    """DETR's normalised 2-d sine position embedding of an h x w feature map: d/2 channels for y, d/2 for x.
    -> (h*w, d)."""
    n = d // 2
    dim_t = 10000 ** (2 * (torch.arange(n) // 2) / n)
    y = (torch.arange(1, h + 1, dtype=torch.float32) / h * 2 * math.pi)[:, None, None] / dim_t  # (h, 1, n)
    x = (torch.arange(1, w + 1, dtype=torch.float32) / w * 2 * math.pi)[None, :, None] / dim_t  # (1, w, n)
    interleave = lambda a: torch.stack([a[..., 0::2].sin(), a[..., 1::2].cos()], -1).flatten(-2)
    return torch.cat([interleave(y).expand(h, w, n), interleave(x).expand(h, w, n)], -1).flatten(0, 1)


class ACT(nn.Module):
    """The CVAE of ACT. forward(frames, state, actions, is_pad) -> predicted chunk (B, k, A), mu, logvar; without
    actions (test time) z = 0 and mu = logvar = None."""

    def __init__(self, args, action_dim=3, img_size=64):
        state_dim = STATE_DIMS[args.robot_state]
        super().__init__()
        d, self.k, self.latent_dim = args.hidden_dim, args.chunk_size, args.latent_dim
        layer = lambda: EncoderLayer(d, args.nheads, args.dim_feedforward, args.dropout)
        # CVAE encoder: [CLS, state, a_t .. a_t+k-1] -> mu, logvar of z
        self.cls_embed = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.encoder_state_proj = nn.Linear(state_dim, d)
        self.encoder_action_proj = nn.Linear(action_dim, d)
        self.cvae_encoder = nn.ModuleList(layer() for _ in range(args.cvae_layers))
        self.register_buffer("cvae_pos", sinusoid_table(2 + self.k, d)[None], persistent=False)
        self.latent_proj = nn.Linear(d, 2 * args.latent_dim)
        # Policy: image backbone (a CNN from scratch, ResNet18's stand-in) -> tokens with 2-d sine positions
        layers, c = [], 3
        for o in args.cnn_channels:
            layers += [nn.Conv2d(c, o, 3, 2, 1), nn.GroupNorm(min(8, o), o), nn.ReLU()]
            c = o
        self.backbone = nn.Sequential(*layers)
        self.input_proj = nn.Conv2d(c, d, 1)
        side = img_size // 2 ** len(args.cnn_channels)
        self.register_buffer("image_pos", sine_2d(side, side, d)[None], persistent=False)
        self.latent_out_proj = nn.Linear(args.latent_dim, d)
        self.state_proj = nn.Linear(state_dim, d)
        self.extra_pos = nn.Embedding(2, d)  # learned positions of the z and state tokens
        self.encoder = nn.ModuleList(layer() for _ in range(args.enc_layers))
        self.query_embed = nn.Embedding(self.k, d)
        self.decoder = nn.ModuleList(DecoderLayer(d, args.nheads, args.dim_feedforward, args.dropout)
                                     for _ in range(args.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, action_dim)

    def encode(self, state, actions, is_pad):
        """q(z | state, chunk): -> mu, logvar (B, latent_dim). Padded actions are masked out of the attention."""
        B = state.shape[0]
        x = torch.cat([self.cls_embed.expand(B, -1, -1), self.encoder_state_proj(state)[:, None],
                       self.encoder_action_proj(actions)], 1)
        mask = torch.cat([torch.zeros(B, 2, dtype=torch.bool, device=is_pad.device), is_pad], 1)
        for layer in self.cvae_encoder:
            x = layer(x, self.cvae_pos, key_padding_mask=mask)
        mu, logvar = self.latent_proj(x[:, 0]).chunk(2, -1)
        return mu, logvar

    def forward(self, frames, state, actions=None, is_pad=None):
        B = frames.shape[0]
        if actions is not None:
            mu, logvar = self.encode(state, actions, is_pad)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterised sample
        else:
            mu = logvar = None
            z = torch.zeros(B, self.latent_dim, device=frames.device)
        image = self.input_proj(self.backbone(frames)).flatten(2).transpose(1, 2)  # (B, h*w, d)
        src = torch.cat([self.latent_out_proj(z)[:, None], self.state_proj(state)[:, None], image], 1)
        pos = torch.cat([self.extra_pos.weight[None], self.image_pos], 1)
        for layer in self.encoder:
            src = layer(src, pos)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        for layer in self.decoder:
            tgt = layer(tgt, src, query_pos, pos)
        return self.action_head(self.decoder_norm(tgt)), mu, logvar


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent and averaged over the batch (ACT's total_kld)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(1).mean(0)


def act_loss(model, frames, state, target, is_pad, kl_weight):
    """ACT's loss: L1 on the non-padded actions (averaged over all k positions, as ACT does) + beta * KL."""
    pred, mu, logvar = model(frames, state, target, is_pad)
    l1 = (F.l1_loss(pred, target, reduction="none") * ~is_pad[..., None]).mean()
    kl = kl_divergence(mu, logvar)
    return l1 + kl_weight * kl, l1, kl


# ----------------------------------------------------------------------------------------------------
# Deployment: chunks executed open-loop, or temporal ensembling
# ----------------------------------------------------------------------------------------------------
def ensemble_weights(n, m):
    """Weights of the n chunks that predict the current step, oldest first: w_i = exp(-m i), normalised."""
    w = np.exp(-m * np.arange(n))
    return w / w.sum()


class Policy:
    """The deployed ACT policy for a batch of episodes that start together: `act(frames, states, t)` returns the
    actions (B, A) in [-1, 1] for step t. Without ensembling it queries the model every k steps and executes the
    chunk; with ensembling it queries every step and averages the (at most k) predictions made for step t."""

    def __init__(self, model, stats, temporal_ensemble, m, device, kind="last-action"):
        self.model, self.ensemble, self.m, self.device, self.kind = model.eval(), temporal_ensemble, m, device, kind
        self.stats = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in stats.items()}
        self.chunks = []  # (t queried, (B, k, A) actions) of the queries still covering the present

    @torch.no_grad()
    def act(self, frames, states, t, infos=None):
        k = self.model.k
        if self.ensemble or t % k == 0:
            st = self.stats
            poses = np.stack([info["robot_pose"] for info in infos]) if self.kind == "odometry" else None
            state = torch.as_tensor(robot_state(self.kind, states, poses), dtype=torch.float32, device=self.device)
            state = (state - st["state_mean"]) / st["state_std"]
            pred = self.model(frames_to_input(torch.as_tensor(frames, device=self.device)), state)[0]
            self.chunks = [c for c in self.chunks if c[0] > t - k] + [(t, pred * st["action_std"] + st["action_mean"])]
        if not self.ensemble:
            return self.chunks[-1][1][:, t - self.chunks[-1][0]].clamp(-1, 1).cpu().numpy()
        w = torch.as_tensor(ensemble_weights(len(self.chunks), self.m), dtype=torch.float32, device=self.device)
        preds = torch.stack([chunk[:, t - t0] for t0, chunk in self.chunks])  # oldest first
        return (w[:, None, None] * preds).sum(0).clamp(-1, 1).cpu().numpy()


def evaluate(policy, episodes, seed, controller="default", record=0, env_id="EgoPushCube-v0", start="full"):
    """Zero-shot in the simulator: episodes on reset seeds seed, seed+1, ... (from envs' `start` distribution), all
    stepped together;
    `policy.act(frames, states, t, infos)` -> (episodes, 3) actions (infos: the simulator's, for privileged
    reference policies only). Returns Table 1's metrics (over successful episodes) and, for the first `record`
    episodes, video frames."""
    sims = [gym.make(env_id, controller=controller, start=start) for _ in range(episodes)]
    obs, infos = zip(*[sim.reset(seed=seed + i) for i, sim in enumerate(sims)])
    obs, infos = list(obs), list(infos)
    alive, states = np.ones(episodes, bool), np.zeros((episodes, 3), np.float32)
    success, steps = np.zeros(episodes, bool), np.zeros(episodes, int)
    returns, poses = np.zeros(episodes), [[info["robot_pose"]] for info in infos]
    touched = np.zeros(episodes, bool)
    videos = [[video_frame(sims[i], obs[i])] for i in range(min(record, episodes))]
    t = 0
    while alive.any():
        actions = policy.act(np.stack(obs), states, t, infos)  # finished episodes too: the batch stays whole
        for i in np.flatnonzero(alive):
            obs[i], reward, terminated, truncated, infos[i] = sims[i].step(actions[i])
            info = infos[i]
            states[i] = actions[i]
            returns[i] += reward
            steps[i] += 1
            poses[i].append(info["robot_pose"])
            touched[i] |= info["contact"]
            success[i], alive[i] = info["is_success"], not (terminated or truncated)
            if i < len(videos):
                videos[i].append(video_frame(sims[i], obs[i]))
        t += 1
    final_cube = np.array([np.linalg.norm(sim.unwrapped.cube.position - envs.NET_CENTER) for sim in sims])
    table1 = [envs.push_cube_metrics(np.array(poses[i])) for i in np.flatnonzero(success)]
    stat = lambda values, f: float(f(values)) if len(values) else None  # null in eval.json: no successful episode
    metrics = {"episodes": episodes, "successes": int(success.sum()), "success_rate": float(success.mean()),
               "mean_return": float(returns.mean())}
    for name, values in (("steps_to_success", steps[success]),
                         ("straightness", [m["straightness"] for m in table1]),
                         ("curvature", [m["curvature"] for m in table1])):
        metrics[f"{name}_mean"], metrics[f"{name}_std"] = stat(values, np.mean), stat(values, np.std)
    # ACT's failure mode in the paper ("approaches the cube but stops pushing before the goal")
    metrics["mean_final_cube_to_net_m"] = float(final_cube.mean())
    metrics["touched_cube_fraction"] = float(touched.mean())  # episodes in which the robot touched the cube
    return metrics, videos


def video_frame(sim, obs):
    """The top-down view of the room beside the robot's camera frame, enlarged to the same height."""
    top = sim.unwrapped.render()
    ego = cv2.resize(obs, (top.shape[0], top.shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.concatenate([top, ego], 1)


def eval_line(m):
    line = f"success {m['successes']}/{m['episodes']}"
    if m["successes"]:
        line += f", {m['steps_to_success_mean']:.0f} steps, straightness {m['straightness_mean']:.2f}"
    return line + (f", cube {m['mean_final_cube_to_net_m']:.2f} m from the net, touched it in "
                   f"{m['touched_cube_fraction']:.0%}")


# ----------------------------------------------------------------------------------------------------
# Checkpoints, progress, Ctrl-C
# ----------------------------------------------------------------------------------------------------
CLOCK = {"start": time.time(), "before": 0.0}  # this process's start; wall-clock of the run's earlier processes
STOP = {"armed": False, "requested": False, "run_dir": None}


class Interrupted(Exception):
    """Ctrl-C, acted on at the end of a training step after saving."""


def request_stop(signum, frame):  # the SIGINT handler main() installs
    if not STOP["armed"] or STOP["requested"]:
        raise KeyboardInterrupt
    STOP["requested"] = True
    print("\nCtrl-C: stopping at the end of this step, after saving a checkpoint (Ctrl-C again: stop now)", flush=True)


def wall_time():
    return CLOCK["before"] + time.time() - CLOCK["start"]


def save_checkpoint(path, args, **payload):
    """Atomic write (temporary file, then os.replace) of the model, its normaliser and what continues training."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    config = {f: getattr(args, f) for f in MODEL_FIELDS}
    torch.save({"kind": "act", "config": config, "rng": rng, **payload}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    with open(os.path.join(os.path.dirname(path), "wall_time_s.txt"), "w") as f:
        f.write(f"{wall_time():.1f}")


def load_checkpoint(path, args):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "act":
        raise RunError(f"{path}: not an ACT checkpoint")
    for f, v in ckpt["config"].items():
        if v != getattr(args, f):
            raise RunError(f"{path}: checkpoint has {f}={v}, this run has {f}={getattr(args, f)}")
    return ckpt


def progress_line(step, total, t0, first, **metrics):
    rate = (step + 1 - first) / max(time.time() - t0, 1e-9)
    left = (total - step - 1) / max(rate, 1e-9)
    shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    return (f"[act] step {step + 1}/{total} ({100 * (step + 1) / total:.0f}%) {shown} | {rate:.2f} it/s | "
            f"{left / 60:.1f} min left")


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(args, model, val, device, n=256):
    """ACT's validation loss, L1 + beta * KL (dropout off; z still sampled from q(z | chunk)), on up to n held-out
    frames spread over the validation episodes."""
    model.eval()
    idx = np.linspace(0, len(val.frames) - 1, min(n, len(val.frames))).astype(int)
    loss = act_loss(model, *val.batch(idx, device), args.kl_weight)[0].item()
    model.train()
    return loss


def train(args, data, episodes, device, writer, run_dir):
    """ACT's loop: minibatches of (frame, state, chunk) drawn uniformly from the training episodes' frames; the
    checkpoint with the lowest validation loss is kept as act_best.pt. Returns the model to deploy and its stats."""
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(episodes))
    n_val = int(round(args.val_fraction * len(episodes))) if len(episodes) > 1 else 0
    train_eps = [episodes[i] for i in sorted(order[n_val:])]
    val_eps = [episodes[i] for i in sorted(order[:n_val])]
    train_set = Demonstrations(data, train_eps, args.chunk_size, kind=args.robot_state)
    val_set = Demonstrations(data, val_eps, args.chunk_size, train_set.stats, args.robot_state) if val_eps else None
    print(f"{len(episodes)} demonstrations ({len(train_set.frames)} training frames in {len(train_eps)} episodes, "
          f"{len(val_eps)} held out for validation)")

    model = ACT(args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    path, best_path = os.path.join(run_dir, "act.pt"), os.path.join(run_dir, "act_best.pt")
    start, best = 0, {"val_loss": float("inf"), "step": 0}
    if args.resume and os.path.exists(path):
        ckpt = load_checkpoint(path, args)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["step"], ckpt["best"]
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        rng = ckpt["sampler_rng"]
        print(f"ACT: resuming {path} at step {start} of {args.train_steps}"
              + (": training is done, the policy is evaluated again" if start >= args.train_steps else ""))
    print(f"ACT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.train_steps} steps of "
          f"{args.batch_size}")

    def save(step):
        save_checkpoint(path, args, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, best=best,
                        stats=train_set.stats, sampler_rng=rng, run_args=dataclasses.asdict(args))

    model.train()
    t0, last_print = time.time(), 0.0
    for step in range(start, args.train_steps):
        batch = train_set.batch(rng.integers(len(train_set.frames), size=args.batch_size), device)
        loss, l1, kl = act_loss(model, *batch, args.kl_weight)
        if not math.isfinite(loss.item()):
            raise RunError(f"non-finite ACT loss ({loss.item()}) at step {step}; the last good checkpoint is {path}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            for k, v in {"losses/loss": loss.item(), "losses/l1": l1.item(), "losses/kl": kl.item()}.items():
                writer.add_scalar(k, v, step)
        if time.time() - last_print > 10 or step + 1 == args.train_steps:
            last_print = time.time()
            print(progress_line(step, args.train_steps, t0, start, l1=l1.item(), kl=kl.item()), flush=True)
        done = step + 1 == args.train_steps
        if args.eval_every and ((step + 1) % args.eval_every == 0 or done):
            val_loss = validation_loss(args, model, val_set, device) if val_set else loss.item()
            writer.add_scalar("losses/val_loss", val_loss, step + 1)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step + 1}
                save_checkpoint(best_path, args, model=model.state_dict(), stats=train_set.stats, step=step + 1)
            policy = Policy(model, train_set.stats, args.temporal_ensemble, args.ensemble_m, device, args.robot_state)
            metrics, _ = evaluate(policy, args.eval_quick_episodes, args.eval_seed, args.eval_controller,
                                  start=args.start)
            model.train()
            for k, v in metrics.items():
                if v is not None:
                    writer.add_scalar(f"eval/{k}", v, step + 1)
            print(f"[eval] step {step + 1}: validation loss {val_loss:.4f} (best {best['val_loss']:.4f} at step "
                  f"{best['step']}); {eval_line(metrics)}", flush=True)
        if (step + 1) % args.save_every == 0 or done or STOP["requested"]:
            save(step + 1)
            if STOP["requested"]:
                raise Interrupted(f"ACT saved at step {step + 1}")
    # Deploy the checkpoint with the lowest validation loss (ACT's policy_best.ckpt), or the last one
    ckpt = load_checkpoint(best_path if os.path.exists(best_path) else path, args)
    model.load_state_dict(ckpt["model"])
    print(f"deploying {os.path.basename(best_path if os.path.exists(best_path) else path)} (step {ckpt['step']}, "
          f"best validation loss {best['val_loss']:.4f})")
    return model, ckpt["stats"], best


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def presets_help(doc, presets):
    rows = []
    for name, values in presets.items():
        items = [f"{k}={v}" for k, v in values.items()] or ["the defaults of the flags below"]
        rows.append(f"  {name:9}")
        for i, item in enumerate(items):
            if i > 0 and len(rows[-1]) + len(item) > 116:
                rows.append(" " * 11)
            rows[-1] += item + (", " if i + 1 < len(items) else "")
    return f"{doc.rstrip()}\n\nPresets (--preset NAME; flags given on the command line override them):\n" + \
        "\n".join(row.rstrip() for row in rows)


def parse_args(argv=None):
    """Preset values, then the command line on top; with --resume, the run's saved args (only the evaluation flags
    may change)."""
    argv = sys.argv[1:] if argv is None else argv
    flag = lambda name: next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                              if (a == name and i + 1 < len(argv)) or a.startswith(name + "=")), None)
    resume, preset = flag("--resume"), flag("--preset") or "default"
    saved = None
    if resume:
        path = os.path.join(resume, "args.json")
        if not os.path.exists(path):
            raise RunError(f"--resume {resume}: not a run directory of act_baseline.py (no args.json)")
        with open(path) as f:
            saved = json.load(f)
        defaults = Args(**saved)
    elif preset in PRESETS:
        defaults = Args(**{**dataclasses.asdict(Args()), **PRESETS[preset], "preset": preset})
    else:
        defaults = Args()  # tyro reports the invalid choice
    args = tyro.cli(Args, default=defaults, args=argv, description=presets_help(__doc__, PRESETS))
    if saved:
        changed = [k for k, v in saved.items() if k not in RESUME_FIELDS + ["resume", "run_name", "runs_dir"]
                   and v != getattr(args, k)]
        if changed:
            raise RunError(f"--resume continues the run as it was configured; only --train-steps, --save-every and the "
                           f"evaluation flags may change, not {', '.join(changed)}")
    check_args(args)
    return args


def check_args(args):
    """Every numeric flag, before anything is created: a RunError (one line, exit code 1) names the first bad one."""
    for name in ("save_every", "chunk_size", "hidden_dim", "nheads", "dim_feedforward", "enc_layers", "dec_layers",
                 "cvae_layers", "latent_dim", "train_steps", "batch_size", "eval_episodes", "eval_quick_episodes"):
        if getattr(args, name) < 1:
            raise RunError(f"{name} ({getattr(args, name)}) must be at least 1")
    for name in ("seed", "num_demos", "eval_every", "eval_seed", "kl_weight",
                 "weight_decay", "ensemble_m", "dropout"):
        if getattr(args, name) < 0:
            raise RunError(f"{name} ({getattr(args, name)}) must not be negative")
    if not args.learning_rate > 0:
        raise RunError(f"learning_rate ({args.learning_rate}) must be positive")
    if not (0 <= args.val_fraction < 1 and args.dropout < 1):
        raise RunError(f"val_fraction ({args.val_fraction}) and dropout ({args.dropout}) must be in [0, 1)")
    if args.hidden_dim % args.nheads or args.hidden_dim % 4:
        raise RunError(f"hidden_dim ({args.hidden_dim}) must be a multiple of nheads ({args.nheads}) and of 4")
    if not args.cnn_channels or min(args.cnn_channels) < 1 or len(args.cnn_channels) > 6:
        raise RunError(f"cnn_channels ({args.cnn_channels}) must be 1 to 6 sizes of at least 1")
    if not args.data_path and args.num_demos < 1:
        raise RunError("num_demos must be at least 1 when demonstrations are collected (0 means all of --data-path)")
    if args.data_path and not os.path.exists(args.data_path):
        raise RunError(f"--data-path {args.data_path}: no such file")


def run(args):
    if args.resume:
        run_dir = args.resume
        args.run_name = os.path.basename(os.path.normpath(run_dir))
        if os.path.exists(os.path.join(run_dir, "wall_time_s.txt")):
            with open(os.path.join(run_dir, "wall_time_s.txt")) as f:
                CLOCK["before"] = float(f.read())
    else:
        args.run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.runs_dir, args.run_name)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    data, episodes = load_demonstrations(args)  # bad data fails before the run directory exists
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in dataclasses.asdict(args).items() if k != "resume"}, f, indent=1)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    STOP["run_dir"], STOP["armed"] = run_dir, True
    print(f"run directory {run_dir} ({device})")
    model, stats, best = train(args, data, episodes, device, writer, run_dir)
    STOP["armed"] = False

    # Zero-shot deployment in the simulator, in the chosen mode (and the other one)
    suffix = "" if args.eval_controller == "default" else f"_{args.eval_controller}"
    mode = lambda te: "temporal ensembling" if te else f"chunks of {args.chunk_size}"
    print(f"evaluating {args.eval_episodes} episodes in {args.env_id} ({args.eval_controller} controller, "
          f"{mode(args.temporal_ensemble)})")
    policy = lambda te: Policy(model, stats, te, args.ensemble_m, device, args.robot_state)
    metrics, videos = evaluate(policy(args.temporal_ensemble), args.eval_episodes, args.eval_seed,
                               args.eval_controller, record=3 if args.capture_video else 0, start=args.start)
    for i, frames in enumerate(videos):
        envs.write_video(os.path.join(run_dir, f"eval{suffix}_episode_{i}.mp4"), frames, scale=1)
    result = {"env_id": args.env_id, "start": args.start, **metrics, "global_step": 0, "wall_time_s": wall_time(),
              "eval_controller": args.eval_controller, "temporal_ensemble": args.temporal_ensemble,
              "demonstrations": len(episodes), "best_step": best["step"],
              "best_val_loss": best["val_loss"] if best["step"] else None}
    if args.eval_both:
        other, _ = evaluate(policy(not args.temporal_ensemble), args.eval_episodes, args.eval_seed,
                            args.eval_controller, start=args.start)
        result["other_mode"] = {"temporal_ensemble": not args.temporal_ensemble, **other}
        print(f"other mode ({mode(not args.temporal_ensemble)}): {eval_line(other)}")
    for k, v in metrics.items():
        if v is not None:
            writer.add_scalar(f"eval/final_{k}", v, args.train_steps)
    with open(os.path.join(run_dir, f"eval{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    writer.close()
    print(json.dumps(result))
    print(f"done in {wall_time() / 60:.1f} min ({mode(args.temporal_ensemble)}): {eval_line(metrics)}")
    print(f"  results      {os.path.join(run_dir, f'eval{suffix}.json')}")
    if videos:
        print(f"  videos       {os.path.join(run_dir, f'eval{suffix}_episode_0.mp4')} ...")
    print(f"  TensorBoard  tensorboard --logdir {shlex.quote(run_dir)}")
    return result


def main(argv=None):
    STOP.update(armed=False, requested=False, run_dir=None)
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        run(parse_args(argv))
    except (RunError, envs.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        if STOP["run_dir"] is None:
            print("interrupted before the run directory was created: nothing to continue", file=sys.stderr)
        else:
            kept = e if isinstance(e, Interrupted) else "the last saved checkpoint is kept"
            print(f"interrupted ({kept}); continue with: python {os.path.basename(__file__)} --resume "
                  f"{shlex.quote(STOP['run_dir'])}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
