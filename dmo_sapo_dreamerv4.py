"""DMO-SAPO with a DreamerV4 global world model on ego-centric Push-Cube (seed 000: "Coupled Local and Global World
Models for Efficient First Order RL", §3.3, §4.1.2, Algorithm 1 in A.4, CEM-MPC in A.7, hyperparameters in Table 4;
DreamerV4: Hafner, Yan, Lillicrap 2025, as ALGORITHMS.md §5 describes it).

The policy is trained entirely inside learned models and deployed zero-shot in the simulator:
  1. play data of EgoPushCube-v0 (envs.py: a robot pushes a cube into a net; ego-centric 64x64 frames, 5 Hz body
     velocity commands) with the operator's per-frame labels (0 other, 1 pushing the cube towards the net, 2 success);
  2. the tokenizer: a masked-autoencoding transformer that turns each frame into a few tanh-bounded latent tokens;
  3. the dynamics f->: a block-causal transformer over [action; noise level and step size; noisy latents; registers]
     per frame, trained by shortcut forcing (x-prediction, one noise level and step size per frame), sampled in 4
     steps with a KV cache; a reward head on its outputs classifies the labels, its expected reward is r;
  4. the local backward model f<-: the DreamerV3 RSSM of rssm.py, pretrained on the play data and its label rewards;
  5. DMO-SAPO: the dynamics generate the next frame (32 real frames pre-fill the cache, A.4), the RSSM gives the
     gradient (decoupled forward/backward), SAPO updates actor, critic and temperature; the RSSM is fine-tuned on
     the generated trajectories;
  6. zero-shot evaluation in the simulator -> eval.json with Table 1's metrics.
`--mode cem-mpc` plans every action with the same dynamics and reward head instead of a policy (A.7).

    python dmo_sapo_dreamerv4.py --seed 1                    # `default`: sized for a 2-core CPU, the near start
    python dmo_sapo_dreamerv4.py --seed 1 --start full       # the whole task: episodes start anywhere in the room
    python dmo_sapo_dreamerv4.py --seed 1 --preset tiny      # the whole pipeline in about 20 s (the tests)
    python dmo_sapo_dreamerv4.py --seed 1 --preset paper     # Table 4 sizes (GPUs)
    python dmo_sapo_dreamerv4.py --seed 1 --forward-model rssm   # ablation "No Diffusion"
    python dmo_sapo_dreamerv4.py --seed 1 --no-rssm-finetune     # ablation "No RSSM Finetuning"
    python dmo_sapo_dreamerv4.py --mode cem-mpc --resume RUN_DIR # plan with the trained world model (A.7)
    torchrun --nproc_per_node 8 dmo_sapo_dreamerv4.py --stop-after dynamics   # world models on 8 GPUs (DDP)
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

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

import envs
from rssm import RSSM, RSSMConfig

ENV_ID = "EgoPushCube-v0"
ACTION_DIM = 3  # forward, lateral, yaw-rate commands
LABEL_REWARDS = (0.0, 1.0, 10.0)  # the simulator's reward of each label: other, pushing towards the net, success


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    preset: Literal["tiny", "default", "paper"] = "default"
    """sizes and budgets (each preset's values are listed at the top of --help); flags given on the command line
    override the preset"""
    mode: Literal["dmo-sapo", "cem-mpc"] = "dmo-sapo"
    """train a policy with DMO-SAPO, or plan every action online with CEM in the world model (A.7; no policy)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """`torch.backends.cudnn.deterministic = True`"""
    cuda: bool = True
    """use CUDA if available"""
    capture_video: bool = True
    """write videos (imagined vs real rollouts, evaluation episodes) to the run directory"""
    save_model: bool = True
    """write checkpoints to the run directory"""
    runs_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """a run directory to continue: finished stages are loaded, the interrupted one continues from its checkpoint"""
    stop_after: Optional[Literal["tokenizer", "dynamics", "rssm"]] = None
    """stop after this stage (its checkpoint is written); continue later with --resume"""
    save_every: int = 500
    """steps between checkpoints of the tokenizer, dynamics and RSSM; Ctrl-C saves the current stage's too"""

    # Play data
    data_dir: str = "data"
    """play data lives at {data_dir}/EgoPushCube-v0_play_{play_steps}.npz (EgoPushCube-v0_near_play_... with --start
    near), collected from the simulator when missing"""
    data_path: Optional[str] = None
    """any play-data file of the format in README with `reward_label` (e.g. recorded on a real robot)"""
    start: Literal["full", "near"] = "near"
    """where the episodes of the play data and of the evaluation start (envs.EgoPushCubeEnv): full = anywhere in the
    room (the paper's task, the `paper` preset); near = its last stage, the cube before the net and the robot behind
    it (an easier rung, the one a CPU learns: README)"""
    play_steps: int = 30_000
    """frames of play to collect when no file exists (paper: 12 h at 5 Hz = 216k)"""
    play_after_success: int = 0
    """collected play: frames recorded after each success, as an operator's play goes on after the goal (the cube
    in the net labelled success); 0: a play episode ends at its success, as the simulator's episodes do"""
    img_size: int = 32
    """frame resolution of every model (Table 4: 64 for the policy, 128 generated; frames are area-resized)"""

    # Tokenizer (DreamerV4)
    tok_checkpoint: Optional[str] = None
    """a trained tokenizer (tokenizer.pt); skips its training"""
    tok_patch: int = 8
    """patch size in pixels (Table 4: 16 at 128x128)"""
    tok_dim: int = 128
    """model width of encoder and decoder (Table 4: 768)"""
    tok_layers: int = 2
    """layers of the encoder and of the decoder (Table 4: 12 / 12)"""
    tok_heads: int = 4
    """attention heads (Table 4: 12)"""
    tok_latents: int = 8
    """latent tokens per frame (Table 4: 256)"""
    tok_bottleneck: int = 8
    """size of each latent token after the tanh bottleneck (Table 4: 16)"""
    tok_steps: int = 3000
    """training steps"""
    tok_batch_size: int = 32
    """frames per step and process"""
    tok_lr: float = 3e-4
    """AdamW learning rate (100-step warm-up, weight decay 1e-2, grad clip 1)"""
    tok_max_mask: float = 0.9
    """masked autoencoding: each frame drops a share p ~ U(0, tok_max_mask) of its patches"""

    # Dynamics and reward head (DreamerV4)
    dyn_checkpoint: Optional[str] = None
    """a trained dynamics model with its reward head (dynamics.pt); skips its training"""
    dyn_dim: int = 128
    """model width (Table 4: 1536)"""
    dyn_layers: int = 4
    """transformer blocks, each space attention, causal time attention and an MLP (Table 4: 24)"""
    dyn_heads: int = 4
    """attention heads (Table 4: 24)"""
    dyn_registers: int = 2
    """register tokens per frame; the reward head reads them"""
    dyn_max_shortcut: int = 8
    """K_max: the smallest step size is 1 / K_max (flow matching there, bootstrapped shortcuts above)"""
    dyn_bootstrap_fraction: float = 0.25
    """share of the frames trained on bootstrap targets (step sizes above 1 / K_max); the rest regress on the clean
    latents (flow matching). Shortcut models' code gives 1/8 of a batch bootstrap targets; a uniform draw over the
    step sizes (3/4 at K_max 8) left the dynamics worse than copying the last frame after 4000 steps (results/)"""
    dyn_sampling_steps: int = 4
    """denoising steps per generated frame (paper: 4; CEM-MPC: 1)"""
    dyn_context_noise: float = 0.1
    """context frames are written to the cache at noise level tau = 1 - this (slightly corrupted, DreamerV4)"""
    dyn_max_context: int = 96
    """frames the time attention sees, the oldest dropped beyond (Table 4: 96)"""
    dyn_seq_len: int = 16
    """frames per training sequence"""
    dyn_steps: int = 4000
    """training steps"""
    dyn_batch_size: int = 8
    """sequences per step and process"""
    dyn_lr: float = 3e-4
    """AdamW learning rate (100-step warm-up, weight decay 1e-2, grad clip 1)"""
    reward_loss_scale: float = 1.0
    """weight of the reward head's cross-entropy beside the shortcut loss"""
    reward_balance: float = 0.5
    """each label's cross-entropy weighted by (its share of the play frames)^-reward_balance, normalised to a mean
    weight of 1 over the frames: 0 is the plain cross-entropy, 1 weighs the labels equally (play data is ~88 %
    "other": unweighted, the head learns to always say "other")"""

    # Local model f<- (DreamerV3 RSSM)
    rssm_checkpoint: Optional[str] = None
    """a pretrained RSSM (rssm.pt); skips its pretraining"""
    rssm_size: Literal["tiny", "small", "push_t", "push_cube"] = "small"
    """RSSM size (rssm.presets; Table 4 Push Cube = push_cube)"""
    rssm_pretrain_steps: int = 1500
    """offline pretraining steps on the play data"""
    rssm_batch_size: int = 16
    """sequences per batch"""
    rssm_seq_len: int = 32
    """frames per sequence (Table 4: 64)"""
    rssm_lr: float = 3e-4
    """Adam learning rate (DreamerV3: 1e-4)"""
    rssm_recon_scale: float = 8.0
    """weight of the summed-pixel reconstruction loss against the KL (DreamerV3: 1)"""
    rssm_finetune_steps: int = 4
    """fine-tuning steps per epoch on the global model's trajectories"""
    no_rssm_finetune: bool = False
    """ablation "No RSSM Finetuning": keep the pretrained RSSM fixed during RL"""
    replay_size: int = 1_000_000
    """FIFO replay of generated frames for RSSM fine-tuning (Table 4: 1e6)"""

    # DMO-SAPO actor-critic
    forward_model: Literal["dreamerv4", "rssm"] = "dreamerv4"
    """who generates the forward trajectory: the DreamerV4 dynamics, or the RSSM itself (ablation "No Diffusion")"""
    init_context: int = 32
    """real frames that pre-fill the dynamics' cache before each imagined rollout (A.4: L_init = 32)"""
    epochs: int = 150
    """epochs of Algorithm 1 (each: RSSM fine-tuning, one horizon of num_envs rollouts, actor/critic updates)"""
    num_envs: int = 32
    """parallel imagined rollouts (Table 4: 128)"""
    horizon: int = 16
    """steps per actor update (Table 4: 16)"""
    episode_length: int = 32
    """rollouts continue across horizons for this many steps, then restart from new play windows"""
    gamma: float = 0.99
    """discount"""
    lam: float = 0.95
    """TD(lambda) for the critic targets"""
    actor_lr: float = 2e-3
    """actor learning rate (linearly decayed)"""
    critic_lr: float = 5e-4
    """critic learning rate (linearly decayed)"""
    alpha_lr: float = 5e-3
    """learning rate of log(alpha)"""
    init_alpha: float = 0.1
    """initial entropy temperature"""
    target_entropy: float = -6.0
    """target entropy of the learned temperature (Table 4); the bonus is scaled by it as SAPO's authors do"""
    betas: tuple[float, float] = (0.7, 0.95)
    """Adam betas of actor and critic"""
    max_grad_norm: float = 1.0
    """gradient-norm clip of actor and critic"""
    critic_epochs: int = 8
    """critic mini-epochs per epoch"""
    critic_minibatch: int = 256
    """critic minibatch size"""
    hidden: list[int] = field(default_factory=lambda: [256, 128, 64])
    """actor and critic MLP sizes (Table 4)"""

    # CEM-MPC (A.7)
    cem_candidates: int = 64
    """action sequences scored per executed action (paper: 128 parallel rollouts)"""
    cem_horizon: int = 4
    """frames of each candidate, generated jointly in chunk mode"""
    cem_elites: int = 8
    """best candidates whose mean and std are the next action distribution"""
    cem_steps: int = 1
    """denoising steps of the chunk (A.7: 1)"""
    cem_context: int = 16
    """real frames the planner conditions on"""
    cem_std: float = 0.5
    """std of the candidates around the mean plan (the previous plan shifted by one step); with one CEM iteration
    it is never refined"""

    # Evaluation in the simulator
    eval_episodes: int = 50
    """final zero-shot evaluation episodes"""
    eval_max_steps: int = 200
    """steps per evaluation episode (the task's time limit: 200 = 40 s)"""
    eval_every: int = 25
    """epochs between quick evaluations during training (0: never)"""
    eval_quick_episodes: int = 10
    """episodes of a quick evaluation"""
    eval_seed: int = 1_000_000
    """first evaluation seed; play data uses seeds from 0, so evaluation starts are disjoint from training"""
    eval_controller: Literal["default", "alt"] = "default"
    """the low-level controller at evaluation (alt: slower, weaker translation, stronger yaw; Fig. 12)"""

    # filled in at runtime
    run_name: str = ""
    """the run directory's name"""


PRESETS = {
    "tiny": dict(play_steps=600, tok_dim=32, tok_layers=1, tok_heads=2, tok_latents=4, tok_bottleneck=4, tok_steps=20,
                 tok_batch_size=8, dyn_dim=32, dyn_layers=2, dyn_heads=2, dyn_registers=1, dyn_seq_len=6,
                 dyn_steps=20, dyn_batch_size=4, rssm_size="tiny", rssm_pretrain_steps=20, rssm_batch_size=4,
                 rssm_seq_len=8, rssm_finetune_steps=1, init_context=4, epochs=4, num_envs=4, horizon=4,
                 episode_length=8, critic_epochs=2, critic_minibatch=16, hidden=[32, 32], cem_candidates=8,
                 cem_horizon=2, cem_elites=2, cem_context=4, eval_episodes=2, eval_max_steps=10, eval_every=2,
                 eval_quick_episodes=2),
    "default": dict(),  # the field defaults above: sized for a 2-core CPU, see README
    "paper": dict(start="full", play_steps=216_000, img_size=128, tok_patch=16, tok_dim=768, tok_layers=12,
                  tok_heads=12, tok_latents=256, tok_bottleneck=16, tok_steps=200_000, tok_batch_size=24, dyn_dim=1536,
                  dyn_layers=24, dyn_heads=24, dyn_registers=4, dyn_max_shortcut=64, dyn_seq_len=64,
                  dyn_steps=200_000, dyn_batch_size=1, rssm_size="push_cube", rssm_pretrain_steps=50_000,
                  rssm_seq_len=64, rssm_lr=1e-4, rssm_recon_scale=1.0, rssm_finetune_steps=20, epochs=4000,
                  num_envs=128, episode_length=64, cem_candidates=128, eval_episodes=100, eval_every=100),
}


# ----------------------------------------------------------------------------------------------------
# Play data
# ----------------------------------------------------------------------------------------------------
def play_data_path(args):
    start = "" if args.start == "full" else f"_{args.start}"
    after = f"_after{args.play_after_success}" if args.play_after_success else ""
    return args.data_path or os.path.join(args.data_dir, f"{ENV_ID}{start}{after}_play_{args.play_steps}.npz")


def load_play_data(args, device, verbose=True):
    """Frames as uint8 (N, 3, S, S), actions (N, 3) taken after each frame, is_first (N,), episode ids (N,), the
    labels (N,) and the reward of arriving in each frame (N,)."""
    path = play_data_path(args)
    if not os.path.exists(path) and args.data_path is None:
        print(f"collecting {args.play_steps} frames of play data into {path}")
        envs.save_dataset(path, envs.collect(ENV_ID, args.play_steps, seed=0, verbose=verbose, start=args.start,
                                             after_success=args.play_after_success))
    data = envs.load_dataset(path)
    if str(data.get("env_id", ENV_ID)) != ENV_ID:
        raise RunError(f"{path}: play data of {data['env_id']}, but this script's task is {ENV_ID}")
    if data["action"].shape[1] != ACTION_DIM:
        raise envs.DatasetError(f"{path}: key 'action': Push-Cube needs {ACTION_DIM}-d actions, got "
                                f"{data['action'].shape[1]}")
    if "reward_label" not in data:
        raise envs.DatasetError(f"{path}: key 'reward_label': missing; the reward head learns from the operator's "
                                f"labels (0 other, 1 pushing towards the goal, 2 success)")
    labels = np.asarray(data["reward_label"]).astype(np.int64)
    if labels.min() < 0 or labels.max() > 2:
        raise envs.DatasetError(f"{path}: key 'reward_label': labels must be 0, 1 or 2, found {labels.min()} to "
                                f"{labels.max()}")
    if args.data_path is None and len(data["obs"]) != args.play_steps:
        raise RunError(f"{path} holds {len(data['obs'])} frames, not the {args.play_steps} of --play-steps: it was not "
                       f"collected by this script; pass --data-path {path} to train on it as it is")
    obs = np.stack([envs.resize_frame(o, args.img_size) for o in data["obs"]])  # the one rendering path
    is_first = torch.as_tensor(data["is_first"])
    label = torch.as_tensor(labels)
    return {
        "obs": torch.as_tensor(obs).permute(0, 3, 1, 2).contiguous().to(device),
        "action": torch.as_tensor(data["action"]).to(device),
        "is_first": is_first.to(device),
        "episode": (torch.cumsum(is_first.long(), 0) - 1).to(device),
        "label": label.to(device),
        "reward": torch.tensor(LABEL_REWARDS)[label].to(device),
    }


def window_starts(data, length):
    """Indices t such that frames t .. t+length-1 lie in one episode."""
    ep = data["episode"].cpu()
    n = len(ep)
    ok = torch.zeros(n, dtype=torch.bool)
    if n >= length:
        ok[: n - length + 1] = ep[: n - length + 1] == ep[length - 1:]
    return torch.nonzero(ok).squeeze(1)


def to_float(frames):
    """uint8 frames -> float in [-1, 1]."""
    return frames.float() / 127.5 - 1.0


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# Transformer parts shared by tokenizer and dynamics
# ----------------------------------------------------------------------------------------------------
def rope(x, pos):
    """Rotary position embedding of the last dim of x (..., T, hd) at integer positions pos (T,): relative positions
    survive a sliding context window, so the KV cache keeps the keys it wrote."""
    half = x.shape[-1] // 2
    freq = 10_000 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = pos.float()[:, None] * freq  # (T, half)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    """Multi-head self-attention with pre-LayerNorm; q and k normalised per head (QK-norm, as DreamerV4)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.out = nn.Linear(dim, dim)

    def project(self, x):  # (B, T, D) -> q, k, v (B, heads, T, hd)
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, mask=None):
        q, k, v = self.project(x)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))


def feed_forward(dim):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))


class Block(nn.Module):
    """Attention (with an optional boolean mask, True = may attend) and an MLP, both residual."""

    def __init__(self, dim, heads):
        super().__init__()
        self.attn, self.mlp = Attention(dim, heads), feed_forward(dim)

    def forward(self, x, mask=None):
        x = x + self.attn(x, mask)
        return x + self.mlp(x)


# ----------------------------------------------------------------------------------------------------
# Tokenizer: masked autoencoder of each frame into latent tokens (DreamerV4; ALGORITHMS.md §5)
# ----------------------------------------------------------------------------------------------------
class Tokenizer(nn.Module):
    """Encoder: [patch tokens; learned latent tokens] through transformer blocks in which latents attend to all tokens
    and patches only to patches; the latents' outputs go through Linear -> tanh into `bottleneck` numbers each.
    Decoder: [latents projected back; learned patch queries], latents attend to latents, queries to all; the queries'
    outputs are the patches. Per frame: a frame's tokens never see another frame (causal in time trivially; DreamerV4's
    tokenizer also attends to past frames, which this one leaves to the dynamics)."""

    def __init__(self, img_size, patch, dim, layers, heads, latents, bottleneck):
        super().__init__()
        self.img_size, self.patch, self.latents, self.bottleneck = img_size, patch, latents, bottleneck
        self.n_patches = (img_size // patch) ** 2
        pd = 3 * patch * patch
        self.patch_in, self.patch_out = nn.Linear(pd, dim), nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, pd))
        self.patch_pos = nn.Parameter(0.02 * torch.randn(self.n_patches, dim))
        self.latent_tokens = nn.Parameter(0.02 * torch.randn(latents, dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.patch_queries = nn.Parameter(0.02 * torch.randn(self.n_patches, dim))
        self.latent_pos = nn.Parameter(0.02 * torch.randn(latents, dim))
        self.to_bottleneck = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, bottleneck))
        self.from_bottleneck = nn.Linear(bottleneck, dim)
        self.encoder = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.decoder = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        P, L = self.n_patches, latents
        enc = torch.ones(P + L, P + L, dtype=torch.bool)
        enc[:P, P:] = False  # patches do not see the latents
        dec = torch.ones(L + P, L + P, dtype=torch.bool)
        dec[:L, L:] = False  # latents do not see the patch queries
        self.register_buffer("enc_mask", enc, persistent=False)
        self.register_buffer("dec_mask", dec, persistent=False)

    def patchify(self, frames):  # (N, 3, S, S) -> (N, P, 3 p p)
        p = self.patch
        return F.unfold(frames, p, stride=p).transpose(1, 2)

    def unpatchify(self, patches):  # (N, P, 3 p p) -> (N, 3, S, S)
        return F.fold(patches.transpose(1, 2), self.img_size, self.patch, stride=self.patch)

    def encode(self, frames, drop=None):
        """Float frames (..., 3, S, S) in [-1, 1] -> latents (..., L, bottleneck) in (-1, 1). `drop` (N, P) bool:
        patches replaced by the mask token (training)."""
        lead = frames.shape[:-3]
        x = self.patch_in(self.patchify(frames.reshape(-1, *frames.shape[-3:]))) + self.patch_pos
        if drop is not None:
            x = torch.where(drop[..., None], self.mask_token.expand_as(x), x)
        x = torch.cat([x, self.latent_tokens.expand(len(x), -1, -1)], 1)
        for block in self.encoder:
            x = block(x, self.enc_mask)
        return torch.tanh(self.to_bottleneck(x[:, self.n_patches:])).reshape(*lead, self.latents, self.bottleneck)

    def decode(self, z):
        """Latents (..., L, bottleneck) -> float frames (..., 3, S, S)."""
        lead = z.shape[:-2]
        x = self.from_bottleneck(z.reshape(-1, self.latents, self.bottleneck)) + self.latent_pos
        x = torch.cat([x, self.patch_queries.expand(len(x), -1, -1)], 1)
        for block in self.decoder:
            x = block(x, self.dec_mask)
        return self.unpatchify(self.patch_out(x[:, self.latents:])).reshape(*lead, 3, self.img_size, self.img_size)

    def forward(self, frames, drop=None):
        """The reconstruction of frames through the bottleneck (what the training loss compares)."""
        return self.decode(self.encode(frames, drop))


def draw_masks(n, n_patches, max_mask, generator=None, device="cpu"):
    """Per frame a drop probability p ~ U(0, max_mask), then each patch dropped with probability p: (n, P) bool."""
    p = torch.rand(n, 1, generator=generator, device=device) * max_mask
    return torch.rand(n, n_patches, generator=generator, device=device) < p


def tokenizer_loss(tok, frames, drop):
    """MSE of the reconstruction of every pixel from the frame with `drop`ped patches (the paper adds 0.2 LPIPS,
    which needs pretrained weights that cannot be downloaded here)."""
    return F.mse_loss(tok(frames, drop), frames)


# ----------------------------------------------------------------------------------------------------
# Dynamics: block-causal transformer over latent tokens, trained by shortcut forcing (DreamerV4; ALGORITHMS.md §5)
# ----------------------------------------------------------------------------------------------------
class Dynamics(nn.Module):
    """Per frame t the tokens [action a_{t-1} that led into it; noise level tau_t and step size d_t; its noisy latents;
    registers]. Each block: space attention among a frame's tokens, causal time attention of each token slot over
    the frames up to its own (rotary positions, a KV cache at generation), an MLP. Outputs: the clean latents
    (x-prediction) from the latent slots, the label logits (the reward head) from the registers."""

    def __init__(self, latents, bottleneck, dim, layers, heads, registers, max_shortcut, action_dim=ACTION_DIM):
        super().__init__()
        self.latents, self.bottleneck, self.registers, self.max_shortcut = latents, bottleneck, registers, max_shortcut
        self.n_tokens = 2 + latents + registers
        self.action_in = nn.Linear(action_dim, dim)
        self.levels = max_shortcut + 1  # tau in {0, 1/K, ..., 1}
        self.steps = int(math.log2(max_shortcut)) + 1  # d in {1, 1/2, ..., 1/K}
        self.tau_embed, self.d_embed = nn.Embedding(self.levels, dim), nn.Embedding(self.steps, dim)
        self.latent_in = nn.Linear(bottleneck, dim)
        self.register_tokens = nn.Parameter(0.02 * torch.randn(registers, dim))
        self.slot_pos = nn.Parameter(0.02 * torch.randn(self.n_tokens, dim))
        self.space = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.time = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.mlp = nn.ModuleList(feed_forward(dim) for _ in range(layers))
        self.latent_out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, bottleneck))
        self.reward_head = nn.Sequential(nn.LayerNorm(registers * dim), nn.Linear(registers * dim, dim), nn.SiLU(),
                                         nn.Linear(dim, len(LABEL_REWARDS)))

    def tokens(self, z, tau, d, actions):
        """z (B, T, L, C), tau and d (B, T) on their grids, actions (B, T, A) -> tokens (B, T, N, D)."""
        B, T = z.shape[:2]
        tau_i = torch.round(tau * self.max_shortcut).long()
        d_i = torch.round(-torch.log2(d)).long()
        x = torch.cat([self.action_in(actions)[:, :, None], (self.tau_embed(tau_i) + self.d_embed(d_i))[:, :, None],
                       self.latent_in(z), self.register_tokens.expand(B, T, -1, -1)], 2)
        return x + self.slot_pos

    def forward(self, z, tau, d, actions, cache=None, write=True, window=None):
        """Predict the clean latents of the frames (B, T, ...) given the earlier frames. With a `cache` (a KVCache),
        the frames follow the cached ones; `write` appends their keys and values. Without one, `window` limits each
        frame to itself and the `window` frames before it, in every layer: what a cache of `window` frames gives.
        Returns (clean latents (B, T, L, C), label logits (B, T, 3))."""
        x = self.tokens(z, tau, d, actions)
        B, T, N, D = x.shape
        past = cache.frames if cache is not None else 0  # cached frames this pass attends to
        start = cache.length if cache is not None else 0  # the absolute position of this pass' first frame
        pos = torch.arange(start, start + T, device=x.device)
        if cache is not None:
            cache.reserve(T, (B * N, self.space[0].heads, D // self.space[0].heads), x)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if window is not None:
            causal = causal.triu(-window)
        for i, (space, time_attn, mlp) in enumerate(zip(self.space, self.time, self.mlp)):
            x = x + space(x.reshape(B * T, N, D)).reshape(B, T, N, D)
            h = x.transpose(1, 2).reshape(B * N, T, D)  # each token slot over time
            q, k, v = time_attn.project(h)
            q, k = rope(q, pos), rope(k, pos)
            mask = causal
            if cache is not None:  # the cached frames' keys and values, then this pass' (views: no copy of the past)
                k, v = cache.extend(i, k, v)
                mask = torch.cat([torch.ones(T, past, dtype=torch.bool, device=x.device), causal], 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
            x = x + time_attn.out(out).reshape(B, N, T, D).transpose(1, 2)
            x = x + mlp(x)
        if cache is not None and write:
            cache.commit(T)
        latents = x[:, :, 2:2 + self.latents]
        logits = self.reward_head(x[:, :, 2 + self.latents:].flatten(2))
        return self.latent_out(latents), logits


class KVCache:
    """Keys and values of the time attention of the frames generated (or observed) so far, per layer, for B rollouts,
    in buffers (B * N, heads, capacity, hd) whose frames start .. start + frames - 1 are the valid ones. A pass
    writes its frames' keys and values right after them and attends to the whole stretch as one view (the past is
    not copied); `commit` keeps them (a writing pass), otherwise the next pass overwrites them. Beyond `max_frames`
    the oldest frames are dropped (a sliding window; rotary positions are relative, so the kept keys stay valid);
    the valid stretch moves back to the front of the buffer only when it reaches the end, about once every
    max_frames frames."""

    def __init__(self, layers, max_frames):
        self.k, self.v = [None] * layers, [None] * layers
        self.max_frames, self.start, self.frames, self.length = max_frames, 0, 0, 0  # length: absolute position

    def reserve(self, T, shape, like):
        """Room for T more frames after the valid ones in every layer's buffers; shape = (B * N, heads, hd)."""
        end = self.start + self.frames
        if self.k[0] is not None and end + T <= self.k[0].shape[2]:
            return
        capacity = max(2 * self.max_frames, self.frames + T)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                bufs[i] = like.new_zeros(shape[0], shape[1], capacity, shape[2])
                if old is not None:
                    bufs[i][:, :, :self.frames] = old[:, :, self.start:end]
        self.start = 0

    def extend(self, i, k, v):
        """Layer i's valid keys and values followed by k, v (B * N, heads, T, hd) of this pass' frames."""
        end, T = self.start + self.frames, k.shape[2]
        self.k[i][:, :, end:end + T], self.v[i][:, :, end:end + T] = k, v
        return self.k[i][:, :, self.start:end + T], self.v[i][:, :, self.start:end + T]

    def commit(self, T):
        """Keep the T frames of the last pass; beyond max_frames forget the oldest."""
        self.frames, self.length = self.frames + T, self.length + T
        if self.frames > self.max_frames:
            self.start, self.frames = self.start + self.frames - self.max_frames, self.max_frames

    def past(self, i):
        """Layer i's valid keys and values (views)."""
        return self.k[i][:, :, self.start:self.start + self.frames], self.v[i][:, :, self.start:self.start + self.frames]

    def repeat(self, n, slots):
        """A copy in which each of the B rollouts is repeated n times (rollout b -> b n, ..., b n + n - 1), for n
        candidate futures of the same past; `slots` is the number of tokens per frame."""
        out = KVCache(len(self.k), self.max_frames)
        grow = lambda t: t.unflatten(0, (-1, slots)).repeat_interleave(n, 0).flatten(0, 1)
        pasts = [self.past(i) for i in range(len(self.k))]
        out.k, out.v = [grow(k) for k, _ in pasts], [grow(v) for _, v in pasts]
        out.frames, out.length = self.frames, self.length
        return out


def sample_shortcut(shape, max_shortcut, bootstrap_fraction=0.25, generator=None, device="cpu"):
    """Per frame a step size d and a noise level tau on d's grid, tau in {0, d, ..., 1 - d}: each (shape) float
    tensors. A share 1 - bootstrap_fraction of the frames takes the smallest step, d = 1 / K_max (flow matching);
    the others a larger one, d = 1 / 2^j with j uniform in {0, ..., log2 K_max - 1} (bootstrap targets)."""
    rand = lambda: torch.rand(shape, generator=generator, device=device)
    larger = int(math.log2(max_shortcut))  # the step sizes 1, 1/2, ..., 2 / K_max
    j = torch.randint(max(larger, 1), shape, generator=generator, device=device).float()
    boot = (rand() < bootstrap_fraction) & (larger > 0)
    d = torch.where(boot, 0.5**j, torch.full(shape, 1.0 / max_shortcut, device=device))
    tau = torch.floor(rand() / d) * d
    return tau, d


def shortcut_targets(dyn, z_noisy, tau, d, actions):
    """The bootstrap target of shortcut forcing for frames with d > 1/K_max (ALGORITHMS.md §5): two half steps of the
    model, b' = (f(z~, tau, d/2) - z~) / (1 - tau), z' = z~ + b' d/2, b'' = (f(z', tau + d/2, d/2) - z') /
    (1 - tau - d/2); target velocity (b' + b'') / 2, without gradient. The frames of a sequence take their half steps
    together (the context a frame sees moves with it); frames at the smallest step size, which regress on z1 instead,
    stay where they are in both passes (a half of 1/K_max is no step size the model knows)."""
    K = getattr(dyn, "module", dyn).max_shortcut  # through a DistributedDataParallel wrapper too
    with torch.no_grad():
        half = torch.where(d > 1 / K + 1e-9, d / 2, torch.zeros_like(d))  # 0: this frame does not move
        d_pass = torch.where(half > 0, half, d)
        e = lambda x: x[..., None, None]
        f1, _ = dyn(z_noisy, tau, d_pass, actions)
        b1 = (f1 - z_noisy) / e(1 - tau)
        z_mid = z_noisy + b1 * e(half)
        f2, _ = dyn(z_mid, tau + half, d_pass, actions)
        b2 = (f2 - z_mid) / e(1 - tau - half)
        return (b1 + b2) / 2


def dynamics_loss(dyn, z1, actions, labels, noise, tau, d, reward_scale=1.0, class_weights=None):
    """Shortcut forcing on clean latents z1 (B, T, L, C) with Gaussian `noise` of the same shape, per-frame tau and d
    (B, T), the actions that led into each frame (B, T, A) and the frames' labels (B, T). z~ = (1 - tau) noise + tau z1.
    Smallest d: ||z1^ - z1||^2 (flow matching in x-prediction); larger d: (1 - tau)^2 ||(z1^ - z~)/(1 - tau) -
    sg(b' + b'')/2||^2. Each frame weighted 0.9 tau + 0.1. Plus the reward head's cross-entropy on the labels, each
    frame's weighted by its tau and by its label's weight (class_weights (3,), None: 1).
    Returns (loss, parts)."""
    e = lambda x: x[..., None, None]
    z_noisy = (1 - e(tau)) * noise + e(tau) * z1
    pred, logits = dyn(z_noisy, tau, d, actions)
    smallest = d <= 1 / getattr(dyn, "module", dyn).max_shortcut + 1e-9
    flow = ((pred - z1) ** 2).mean((-1, -2))
    loss_frame = flow
    if (~smallest).any():
        target = shortcut_targets(dyn, z_noisy, tau, d, actions)
        velocity = (pred - z_noisy) / e(1 - tau)
        boot = ((1 - tau) ** 2) * ((velocity - target) ** 2).mean((-1, -2))
        loss_frame = torch.where(smallest, flow, boot)
    shortcut = ((0.9 * tau + 0.1) * loss_frame).mean()
    # the reward head classifies what a frame shows, and a frame at noise level tau shows a share tau of itself: its
    # cross-entropy counts tau times (pure noise, tau = 0, not at all); generation reads the head at tau = 1 -
    # context_noise. A plain mean over frames, so that DDP's average over processes is the mean over the global batch
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=class_weights, reduction="none").view_as(tau)
    reward = (tau * ce).mean()
    return shortcut + reward_scale * reward, {"shortcut": shortcut.item(), "flow_mse": flow.mean().item(),
                                              "reward_ce": reward.item()}


def expected_reward(logits):
    """The reward head's expected reward: sum over labels of p(label) x the simulator's reward of that label."""
    return logits.softmax(-1) @ torch.tensor(LABEL_REWARDS, device=logits.device)


@torch.no_grad()
def generate(dyn, cache, action, steps, context_noise, generator=None, chunk_actions=None):
    """Generate the next frame's latents (B, L, C) after the cached frames, for the action that leads into it (B, A):
    from pure noise (tau = 0) in `steps` steps of size d = 1/steps, z <- z + d (z1^ - z) / (1 - tau). Then one pass on
    the result, slightly corrupted to tau = 1 - context_noise, writes its keys and values to the cache and gives the
    label logits. With `chunk_actions` (B, K, A) instead, K frames are denoised jointly (chunk mode, A.7) and written.
    Returns (latents (B, K, L, C), label logits (B, K, 3)); K = 1 for a single frame."""
    actions = action[:, None] if chunk_actions is None else chunk_actions
    B, K = actions.shape[:2]
    shape = (B, K, dyn.latents, dyn.bottleneck)
    z = torch.randn(shape, generator=generator, device=actions.device)
    d = torch.full((B, K), 1.0 / steps, device=actions.device)
    for k in range(steps):
        tau = torch.full((B, K), k / steps, device=actions.device)
        pred, _ = dyn(z, tau, d, actions, cache=cache, write=False)
        z = z + (pred - z) * (1.0 / steps) / (1 - tau[..., None, None])
    logits = observe(dyn, cache, z, actions, context_noise, generator)
    return z, logits


def observe(dyn, cache, z, actions, context_noise, generator=None):
    """Write frames (B, K, L, C) into the cache as context: corrupted to tau = 1 - context_noise (on the tau grid) with
    the smallest step size. Returns their label logits."""
    tau_value = min(round((1 - context_noise) * dyn.max_shortcut), dyn.max_shortcut - 1) / dyn.max_shortcut
    tau = torch.full(z.shape[:2], tau_value, device=z.device)
    noise = torch.randn(z.shape, generator=generator, device=z.device)
    z_ctx = (1 - tau_value) * noise + tau_value * z
    _, logits = dyn(z_ctx, tau, torch.full_like(tau, 1 / dyn.max_shortcut), actions, cache=cache, write=True)
    return logits


# ----------------------------------------------------------------------------------------------------
# SAPO actor-critic (ALGORITHMS.md §2), as in dmo_sapo_diamond.py
# ----------------------------------------------------------------------------------------------------
def layer_mlp(inp, hidden, out):
    layers = []
    for h in hidden:
        layers += [nn.Linear(inp, h), nn.LayerNorm(h), nn.SiLU()]
        inp = h
    return nn.Sequential(*layers, nn.Linear(inp, out))


class Actor(nn.Module):
    """Tanh-squashed Gaussian with state-dependent log-std -5 + 3.5 (tanh(x) + 1), reparameterised."""

    def __init__(self, feat_dim, action_dim, hidden):
        super().__init__()
        self.net = layer_mlp(feat_dim, hidden, 2 * action_dim)

    def forward(self, feat, deterministic=False):
        """-> action in (-1, 1), log pi(action) including the tanh correction."""
        mean, log_std = self.net(feat).chunk(2, -1)
        if deterministic:
            return torch.tanh(mean), None
        log_std = -5 + 3.5 * (torch.tanh(log_std) + 1)
        u = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # log |d tanh(u) / du|
        return torch.tanh(u), log_prob


class Critic(nn.Module):
    """Two value networks; the minimum is used for targets and the actor's bootstrap (as mineral's SAPO)."""

    def __init__(self, feat_dim, hidden):
        super().__init__()
        self.nets = nn.ModuleList([layer_mlp(feat_dim, hidden, 1) for _ in range(2)])

    def forward(self, feat):  # (..., F) -> (2, ...)
        return torch.stack([net(feat).squeeze(-1) for net in self.nets])

    def value(self, feat):
        return self(feat).min(0).values


def lambda_returns(rewards, next_values, gamma, lam):
    """Eq. (3), the TD(lambda) targets of one horizon, in recursive form: G_{H-1} = r_{H-1} + gamma V(s_H),
    G_h = r_h + gamma ((1 - lam) V(s_{h+1}) + lam G_{h+1}). rewards, next_values: (H, B) -> (H, B)."""
    returns = torch.zeros_like(rewards)
    next_return = next_values[-1]
    for h in reversed(range(len(rewards))):
        returns[h] = rewards[h] + gamma * ((1 - lam) * next_values[h] + lam * next_return)
        next_return = returns[h]
    return returns


def scaled_entropy(entropy, target):
    """SAPO's entropy bonus as its authors compute it: (H - target) / (2 |target|), 0 at the target (the temperature's
    loss is multiplied back by |target|; dmo_sapo_diamond.py says why)."""
    return (entropy - target) / (2 * abs(target))


# ----------------------------------------------------------------------------------------------------
# Checkpoints, progress, errors, processes
# ----------------------------------------------------------------------------------------------------
class RunError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


STAGE_FIELDS = {  # the Args fields a stage checkpoint must agree on
    "tokenizer": ["img_size", "tok_patch", "tok_dim", "tok_layers", "tok_heads", "tok_latents", "tok_bottleneck"],
    "dynamics": ["tok_latents", "tok_bottleneck", "dyn_dim", "dyn_layers", "dyn_heads", "dyn_registers",
                 "dyn_max_shortcut"],
    "rssm": ["img_size", "rssm_size"],
    "agent": ["img_size", "rssm_size", "hidden"],
}
STAGE_STEPS = {"tokenizer": "tok_steps", "dynamics": "dyn_steps", "rssm": "rssm_pretrain_steps", "agent": "epochs"}
STAGE_NAMES = {"tokenizer": "the tokenizer", "dynamics": "the dynamics", "rssm": "the RSSM", "agent": "DMO-SAPO"}
CLOCK = {"start": time.time(), "before": 0.0}  # this process's start; wall-clock of a resumed run's earlier processes
DIST = {"rank": 0, "world": 1}  # torchrun's process of this one, and how many train the world models together


def wall_time():
    return CLOCK["before"] + time.time() - CLOCK["start"]


def main_process():
    return DIST["rank"] == 0


def save_checkpoint(path, kind, args, **payload):
    """Atomic write (temporary file, then os.replace) of everything needed to use or continue a stage; the
    STAGE_FIELDS[kind] Args are what a later load must agree on. Only the main process writes."""
    if not main_process():
        return
    config = {f: getattr(args, f) for f in STAGE_FIELDS[kind]}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    tmp = f"{path}.tmp"
    torch.save({"kind": kind, "config": config, "rng": rng, **payload}, tmp)
    os.replace(tmp, path)
    with open(os.path.join(os.path.dirname(path), "wall_time_s.txt"), "w") as f:  # for --resume's eval.json
        f.write(f"{wall_time():.1f}")


def load_checkpoint(path, kind, args=None, restore_rng=False):
    """Load a checkpoint of `kind`; with `args`, refuse one whose config differs."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise RunError(f"{path}: expected a {kind!r} checkpoint, found {found!r}")
    for f, v in ckpt["config"].items() if args is not None else ():
        if list(np.atleast_1d(v)) != list(np.atleast_1d(getattr(args, f))):
            raise RunError(f"{path}: checkpoint has {f}={v}, this run has {f}={getattr(args, f)}")
    if restore_rng:
        random.setstate(ckpt["rng"]["python"])
        np.random.set_state(ckpt["rng"]["numpy"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt


def start_from(path, kind, args, given, steps, modules):
    """Where an offline stage starts: its checkpoint (`given` by a flag, else the run's own at `path`) loaded into
    `modules` {key: module or optimiser}. Returns (step, done): done when a finished checkpoint has `steps` steps."""
    if not os.path.exists(given or path):
        if given:
            raise RunError(f"{given}: no such {kind} checkpoint")
        return 0, False
    ckpt = load_checkpoint(given or path, kind, args, restore_rng=given is None)
    for key, module in modules.items():
        if key in ckpt:
            module.load_state_dict(ckpt[key])
    done = ckpt["done"] and ckpt["step"] >= steps
    print(f"{STAGE_NAMES[kind]}: {'loaded' if done else 'resuming'} {given or path} ({ckpt['step']} of {steps} steps)")
    return ckpt["step"], done


def check_finite(name, value, step, path):
    if not math.isfinite(value):
        raise RunError(f"non-finite {name} ({value}) at step {step}; the last good checkpoint is {path}")


class Progress:
    """Prints `[stage] step k/n (p%) metrics | rate | time left` about every 10 seconds (main process only)."""

    def __init__(self, stage, total, start=0):
        self.stage, self.total, self.start, self.t0, self.last = stage, total, start, time.time(), 0.0

    def __call__(self, step, **metrics):
        now = time.time()
        if not main_process() or (now - self.last < 10 and step + 1 < self.total):
            return
        self.last = now
        rate = (step + 1 - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - step - 1) / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.stage}] step {step + 1}/{self.total} ({100 * (step + 1) / self.total:.0f}%) {shown} | "
              f"{rate:.2f} it/s | {duration(left)} left", flush=True)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


# Ctrl-C: while a training stage runs (armed) the first Ctrl-C stops it at the end of the step, after saving; a second
# one, or one outside the stages, stops at once. main() prints the command that continues the run and exits with 130.
STOP = {"armed": False, "requested": False, "run_dir": None, "writer": None}


class Interrupted(Exception):
    """Ctrl-C, acted on at the end of a training step; the message says what was saved."""


def request_stop(signum, frame):  # the SIGINT handler main() installs
    if not STOP["armed"] or STOP["requested"]:
        raise KeyboardInterrupt
    STOP["requested"] = True
    print("\nCtrl-C: stopping at the end of this step, after saving a checkpoint (Ctrl-C again: stop now)", flush=True)


def stop_if_requested(saved):
    if STOP["requested"]:
        raise Interrupted(saved)


def stop_message(error, script):
    if STOP["writer"] is not None:
        STOP["writer"].close()
    if STOP["run_dir"] is None:
        return "interrupted before the run directory was created: nothing to continue"
    kept = error if isinstance(error, Interrupted) else "the last saved checkpoints are kept"
    return f"interrupted ({kept}); continue with: python {script} --resume {shlex.quote(STOP['run_dir'])}"


def presets_help(doc, presets):
    """The description --help prints: the module docstring and each preset's values."""
    rows = []
    for name, values in presets.items():
        items = [f"{k}={v}" for k, v in values.items()] or ["the defaults of the flags below"]
        rows.append(f"  {name:9}")
        for i, item in enumerate(items):  # wrapped between items, never inside one (a list value has spaces)
            if i > 0 and len(rows[-1]) + len(item) > 116:
                rows.append(" " * 11)
            rows[-1] += item + (", " if i + 1 < len(items) else "")
    return f"{doc.rstrip()}\n\nPresets (--preset NAME; flags given on the command line override them):\n" + \
        "\n".join(row.rstrip() for row in rows)


def init_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs, gloo on CPUs) and return this process'
    device; one process without torchrun. Each process draws its own noise (seed + rank) and its own shard of the
    play data (DistributedSampler); DistributedDataParallel averages the gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and args.cuda
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        DIST.update(rank=rank, world=world)
        if use_cuda:
            torch.cuda.set_device(local)
        return torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return torch.device("cuda" if use_cuda else "cpu")


def optimizer_step(model, opt, sched, loss, clip=1.0):
    """Backward (DDP averages the gradients over processes), clip, step."""
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()


class Shards:
    """Endless batches of indices into `items` for this process: a DistributedSampler (shuffled, one shard per
    process, reshuffled every pass) over them."""

    def __init__(self, items, batch, seed):
        self.items, self.batch, self.epoch = items, batch, 0
        self.sampler = DistributedSampler(range(len(items)), num_replicas=DIST["world"], rank=DIST["rank"],
                                          shuffle=True, seed=seed, drop_last=False)
        self.it = iter(())

    def next(self):
        out = []
        while len(out) < self.batch:
            try:
                out.append(next(self.it))
            except StopIteration:
                self.sampler.set_epoch(self.epoch)
                self.epoch += 1
                self.it = iter(list(self.sampler))
        return self.items[torch.tensor(out)]


# ----------------------------------------------------------------------------------------------------
# Offline training of the global world model f-> (tokenizer, then dynamics with the reward head)
# ----------------------------------------------------------------------------------------------------
def make_tokenizer(args):
    return Tokenizer(args.img_size, args.tok_patch, args.tok_dim, args.tok_layers, args.tok_heads, args.tok_latents,
                     args.tok_bottleneck)


def make_dynamics(args):
    return Dynamics(args.tok_latents, args.tok_bottleneck, args.dyn_dim, args.dyn_layers, args.dyn_heads,
                    args.dyn_registers, args.dyn_max_shortcut)


def train_stage(args, kind, model, steps, lr, next_loss, given, device, writer, run_dir):
    """The offline loop shared by tokenizer and dynamics: AdamW (100-step warm-up, weight decay 1e-2, clip 1),
    DistributedDataParallel under torchrun, checkpoints every save_every steps and on Ctrl-C, resume. `next_loss(m)`
    draws this process's next batch and returns (loss, metrics) of the (wrapped) model m."""
    path = os.path.join(run_dir, f"{kind}.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    step, done = start_from(path, kind, args, given, steps, {"model": model, "optimizer": opt, "scheduler": sched})
    if done:
        return model
    wrapped = DDP(model) if DIST["world"] > 1 else model
    if given:  # never overwrite a checkpoint given to start from
        print(f"{STAGE_NAMES[kind]}: training on to {steps} steps into {path}")
    n_params = sum(p.numel() for p in model.parameters())
    if main_process():
        print(f"{STAGE_NAMES[kind]}: training {n_params / 1e6:.2f}M parameters for {steps} steps on {DIST['world']} "
              f"process{'es' * (DIST['world'] > 1)}")
    progress = Progress(kind, steps, step)
    save = lambda done: save_checkpoint(path, kind, args, model=model.state_dict(), optimizer=opt.state_dict(),
                                        scheduler=sched.state_dict(), step=step, done=done)
    while step < steps:
        loss, metrics = next_loss(wrapped)
        check_finite(f"{kind} loss", loss.item(), step, path)
        optimizer_step(model, opt, sched, loss)
        if main_process():
            for k, v in metrics.items():
                writer.add_scalar(f"world_model/{kind}_{k}", v, step)
        progress(step, loss=loss.item(), **metrics)
        step += 1
        if step % args.save_every == 0 or STOP["requested"]:
            save(False)
            stop_if_requested(f"the {kind} saved at step {step}")
    save(True)
    return model


def train_tokenizer(args, data, device, writer, run_dir):
    tok = make_tokenizer(args).to(device)
    shards = Shards(torch.arange(len(data["obs"])), args.tok_batch_size, args.seed)

    def next_loss(model):
        frames = to_float(data["obs"][shards.next().to(device)])
        drop = draw_masks(len(frames), tok.n_patches, args.tok_max_mask, device=device)
        loss = tokenizer_loss(model, frames, drop)
        return loss, {"mse": loss.item()}

    return train_stage(args, "tokenizer", tok, args.tok_steps, args.tok_lr, next_loss, args.tok_checkpoint, device,
                       writer, run_dir)


def actions_into(actions):
    """Per-frame actions taken after each frame (B, T, A) -> the actions that led into each frame (zero for the first)."""
    return torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)


def label_weights(labels, balance):
    """Per label (3,): share^-balance, normalised so that the mean weight over the frames is 1 (absent labels: 0)."""
    share = torch.bincount(labels, minlength=3).float() / len(labels)
    w = torch.where(share > 0, share.clamp_min(1e-12) ** -balance, torch.zeros_like(share))
    return w / (w * share).sum()


def train_dynamics(args, data, tok, device, writer, run_dir):
    dyn = make_dynamics(args).to(device)
    T = args.dyn_seq_len
    weights = label_weights(data["label"], args.reward_balance)
    if main_process():
        print(f"reward head: label weights {', '.join(f'{w:.2f}' for w in weights.tolist())} (other, pushing, "
              f"success; --reward-balance {args.reward_balance})")
    shards = Shards(window_starts(data, T), args.dyn_batch_size, args.seed)

    def next_loss(model):
        idx = (shards.next()[:, None] + torch.arange(T)).to(device)
        with torch.no_grad():
            z1 = tok.encode(to_float(data["obs"][idx]))
        tau, d = sample_shortcut(idx.shape, args.dyn_max_shortcut, args.dyn_bootstrap_fraction, device=device)
        noise = torch.randn_like(z1)
        loss, parts = dynamics_loss(model, z1, actions_into(data["action"][idx]), data["label"][idx], noise, tau, d,
                                    args.reward_loss_scale, weights)
        return loss, parts

    return train_stage(args, "dynamics", dyn, args.dyn_steps, args.dyn_lr, next_loss, args.dyn_checkpoint, device,
                       writer, run_dir)


@torch.no_grad()
def world_model_report(args, data, tok, dyn, device, n=64, steps=8, n_reward=256):
    """Diagnostics of the trained global model on fixed play windows (training data: no episodes are held out): the
    tokenizer's reconstruction MSE; the open-loop MSE of frames generated for `steps` steps after min(init_context, 8)
    real ones (decoded, [-1, 1]) beside that of repeating the last real frame; and the reward head on the real frames
    of n_reward windows as context: its accuracy beside always predicting the commonest label, and per label its
    recall and its mean expected reward (what DMO-SAPO optimises: it must rank "pushing" above "other")."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        L = min(args.init_context, 8)
        starts = window_starts(data, L + steps)
        first = starts[torch.randint(len(starts), (n,))]
        idx = (first[:, None] + torch.arange(L + steps)).to(device)
        frames = to_float(data["obs"][idx])
        z = tok.encode(frames)
        recon = F.mse_loss(tok.decode(z), frames).item()
        _, dreamed = dream(args, tok, dyn, z[:, :L], actions_into(data["action"][idx]))
        open_loop = F.mse_loss(dreamed, frames[:, L:]).item()
        copy_last = F.mse_loss(frames[:, L - 1:L].expand_as(frames[:, L:]), frames[:, L:]).item()

        T = args.dyn_seq_len
        starts = window_starts(data, T)
        idx = (starts[torch.randint(len(starts), (n_reward,))][:, None] + torch.arange(T)).to(device)
        logits = observe(dyn, KVCache(args.dyn_layers, args.dyn_max_context), tok.encode(to_float(data["obs"][idx])),
                         actions_into(data["action"][idx]), args.dyn_context_noise).flatten(0, 1)
        labels = data["label"][idx].flatten()
        counts = torch.bincount(labels, minlength=3)
        recall = [(logits.argmax(-1)[labels == c] == c).float().mean().item() if counts[c] else float("nan")
                  for c in range(3)]
        mean_reward = [expected_reward(logits[labels == c]).mean().item() if counts[c] else float("nan")
                       for c in range(3)]
    return {"tokenizer_mse": recon, "open_loop_mse": open_loop, "copy_last_mse": copy_last,
            "reward_accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "reward_accuracy_majority": counts.max().item() / len(labels), "reward_recall": recall,
            "reward_mean_by_label": mean_reward, "label_counts": counts.tolist()}


@torch.no_grad()
def dream(args, tok, dyn, z_context, into):
    """Open loop in the dynamics: the context latents (B, L, ...) fill a KV cache, then one frame is generated for
    each action of into[:, L:] (the actions that led into each frame). Returns the context's label logits and the
    generated frames, decoded (B, T - L, 3, S, S)."""
    L = z_context.shape[1]
    cache = KVCache(args.dyn_layers, args.dyn_max_context)
    logits = observe(dyn, cache, z_context, into[:, :L], args.dyn_context_noise)
    generated = [generate(dyn, cache, into[:, t], args.dyn_sampling_steps, args.dyn_context_noise)[0][:, 0]
                 for t in range(L, into.shape[1])]
    return logits, tok.decode(torch.stack(generated, 1)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# Offline pretraining of the local model f<- (RSSM) and its fine-tuning replay
# ----------------------------------------------------------------------------------------------------
def rssm_train_step(rssm, opt, frames, actions, is_first, rewards):
    """One DreamerV3 world-model step on (B, T) float frames in [-1, 1] (the RSSM sees half of them, DreamerV3's
    [-0.5, 0.5]); actions[:, t] led into frame t, rewards[:, t] are those of arriving in frame t."""
    post, prior = rssm.observe(rssm.encode(frames / 2), actions, is_first)
    loss, parts = rssm.loss(post, prior, frames / 2, rewards, torch.ones_like(rewards))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(rssm.parameters(), 1000.0)
    opt.step()
    return {k: v.item() for k, v in parts.items()}


def make_rssm(args):
    cfg = RSSMConfig.preset(args.rssm_size, obs_shape=(3, args.img_size, args.img_size), action_dim=ACTION_DIM,
                            recon_scale=args.rssm_recon_scale)
    return RSSM(cfg)


def pretrain_rssm(args, data, device, writer, run_dir):
    """The RSSM on play windows, its reward head on the rewards of the operator's labels (those the global reward head
    classifies)."""
    rssm = make_rssm(args).to(device)
    opt = torch.optim.Adam(rssm.parameters(), lr=args.rssm_lr, eps=1e-8)
    path = os.path.join(run_dir, "rssm.pt")
    step, done = start_from(path, "rssm", args, args.rssm_checkpoint, args.rssm_pretrain_steps,
                            {"model": rssm, "optimizer": opt})
    if done or args.rssm_checkpoint:
        return rssm, opt
    print(f"the RSSM: pretraining ({args.rssm_size}) on the play data for {args.rssm_pretrain_steps} steps")
    T = args.rssm_seq_len
    starts = window_starts(data, T)
    progress = Progress("rssm", args.rssm_pretrain_steps, step)
    save = lambda done: save_checkpoint(path, "rssm", args, model=rssm.state_dict(), optimizer=opt.state_dict(),
                                        step=step, done=done)
    while step < args.rssm_pretrain_steps:
        idx = (starts[torch.randint(len(starts), (args.rssm_batch_size,))][:, None] + torch.arange(T)).to(device)
        is_first = torch.zeros(idx.shape, dtype=torch.bool, device=device)
        is_first[:, 0] = True
        parts = rssm_train_step(rssm, opt, to_float(data["obs"][idx]), actions_into(data["action"][idx]), is_first,
                                data["reward"][idx])
        check_finite("RSSM loss", parts["loss"], step, path)
        for k, v in parts.items():
            writer.add_scalar(f"rssm/{k}", v, step)
        progress(step, loss=parts["loss"], recon=parts["recon"], reward=parts["reward"])
        step += 1
        if step % args.save_every == 0 or STOP["requested"]:
            save(False)
            stop_if_requested(f"the RSSM saved at step {step}")
    save(True)
    return rssm, opt


class Replay:
    """FIFO of generated trajectories (chunks of horizon + 1 uint8 frames) on which the RSSM is fine-tuned."""

    def __init__(self, frames_capacity, horizon, img_size):
        self.size = max(1, frames_capacity // (horizon + 1))
        self.frames = torch.zeros(self.size, horizon + 1, 3, img_size, img_size, dtype=torch.uint8)
        self.actions = torch.zeros(self.size, horizon + 1, ACTION_DIM)
        self.rewards = torch.zeros(self.size, horizon + 1)
        self.ptr, self.full = 0, False

    def add(self, frames, actions, rewards):  # (B, H + 1, ...) each; actions[:, t] led into frame t
        idx = (self.ptr + torch.arange(len(frames))) % self.size
        self.frames[idx], self.actions[idx], self.rewards[idx] = frames.cpu(), actions.cpu(), rewards.cpu()
        self.full |= self.ptr + len(frames) >= self.size
        self.ptr = int(idx[-1] + 1) % self.size

    def __len__(self):
        return self.size if self.full else self.ptr

    def sample(self, n, device):
        idx = torch.randint(len(self), (n,))
        is_first = torch.zeros(n, self.frames.shape[1], dtype=torch.bool)
        is_first[:, 0] = True
        return (to_float(self.frames[idx].to(device)), self.actions[idx].to(device), is_first.to(device),
                self.rewards[idx].to(device))


# ----------------------------------------------------------------------------------------------------
# Imagined rollouts in the global model
# ----------------------------------------------------------------------------------------------------
class Rollouts:
    """The num_envs rollouts of DMO-SAPO. All start together from `init_context`-frame windows of play data: the
    frames pre-fill the dynamics' KV cache (A.4) and the RSSM filters them (posterior samples, as at evaluation); the
    rollouts continue across horizons and restart together after `episode_length` steps. `forward` generates the next
    frame for an action (4 denoising steps), decodes it, and scores it with the reward head."""

    def __init__(self, args, data, rssm, tok, dyn, device):
        self.args, self.data, self.rssm, self.tok, self.dyn, self.device = args, data, rssm, tok, dyn, device
        self.starts = window_starts(data, args.init_context)
        self.t = args.episode_length  # restart at the first call

    @torch.no_grad()
    def restart(self):
        args, B, L = self.args, self.args.num_envs, self.args.init_context
        first = self.starts[torch.randint(len(self.starts), (B,))]
        idx = (first[:, None] + torch.arange(L)).to(self.device)
        frames, into = to_float(self.data["obs"][idx]), actions_into(self.data["action"][idx])
        is_first = torch.zeros(idx.shape, dtype=torch.bool, device=self.device)
        is_first[:, 0] = True
        post, _ = self.rssm.observe(self.rssm.encode(frames / 2), into, is_first)
        self.state = {k: v[:, -1] for k, v in post.items()}
        self.obs = frames[:, -1]
        self.reward = self.data["reward"][idx[:, -1]]
        if self.dyn is not None:  # pre-fill the cache with the window
            self.cache = KVCache(args.dyn_layers, args.dyn_max_context)
            observe(self.dyn, self.cache, self.tok.encode(frames), into, args.dyn_context_noise)
        self.t = 0

    def restart_finished(self):
        if self.t >= self.args.episode_length:
            self.restart()

    @torch.no_grad()
    def forward(self, action):
        """o_{h+1} = f->(o_h, a_h) and r_h = r(o_{h+1}) for every rollout, without gradient."""
        z, logits = generate(self.dyn, self.cache, action, self.args.dyn_sampling_steps, self.args.dyn_context_noise)
        frame = to_float(to_uint8(self.tok.decode(z[:, 0])))  # a frame as a camera gives it: 256 levels
        return frame, expected_reward(logits[:, 0])


def imagine_horizon(args, actor, critic, rssm, rollouts, alpha):
    """One horizon of Algorithm 1's inner loop for all rollouts. Returns eq. (1)'s three terms per rollout (the
    rewards', the entropy bonus' and the bootstrap's, differentiable w.r.t. the actor through the RSSM only) and
    the detached trajectory for the critic and the replay."""
    B, H = args.num_envs, args.horizon
    state = rollouts.state
    reward_term, entropy_term = 0.0, 0.0
    feats, soft_rewards, rewards, entropies = [], [], [], []
    chunk = ([to_uint8(rollouts.obs)], [torch.zeros(B, ACTION_DIM, device=state["deter"].device)], [rollouts.reward])
    for h in range(H):
        feat = rssm.feat(state)  # l_h
        action, log_prob = actor(feat)  # a_h = pi(l_h)
        if args.forward_model == "rssm":  # "No Diffusion": the RSSM generates the trajectory and its reward too
            next_state = rssm.img_step(state, action)
            with torch.no_grad():
                next_obs = to_float(to_uint8(2 * rssm.decode(rssm.feat(next_state))))
            r = rssm.reward(rssm.feat(next_state)).detach()
        else:
            next_obs, r = rollouts.forward(action.detach())  # o_{h+1} = f->(o_h, a_h), r_h = r(o_{h+1})
            with torch.no_grad():
                embed = rssm.encode(next_obs / 2)
            next_state = rssm.decoupled_step(state, action, embed)  # DMO: value of f->, gradient of f<-
        r_hat = rssm.reward(rssm.feat(next_state))  # R_h = R_phi(l_{h+1})
        reward = r_hat + (r - r_hat).detach()  # total_reward += r_h - R_h: value of r, gradient of R_phi
        entropy = -log_prob
        bonus = alpha * scaled_entropy(entropy, args.target_entropy)
        reward_term = reward_term + args.gamma**h * reward  # eq. (1), split in its terms
        entropy_term = entropy_term + args.gamma**h * bonus
        feats.append(feat.detach())
        soft_rewards.append((r + bonus).detach())
        rewards.append(r)
        entropies.append(entropy.detach())
        for buf, x in zip(chunk, (to_uint8(next_obs), action.detach(), r)):
            buf.append(x)
        rollouts.obs, rollouts.t = next_obs, rollouts.t + 1
        state = next_state
    last_feat = rssm.feat(state)
    bootstrap_term = args.gamma**H * critic.value(last_feat)  # eq. (1): bootstrap gamma^H V(s_H)
    rollouts.state, rollouts.reward = {k: v.detach() for k, v in state.items()}, r  # continue, graph cut
    traj = {"feats": torch.stack(feats), "soft_rewards": torch.stack(soft_rewards), "rewards": torch.stack(rewards),
            "entropies": torch.stack(entropies), "last_feat": last_feat.detach(),
            "chunk": tuple(torch.stack(buf, 1) for buf in chunk)}
    return (reward_term, entropy_term, bootstrap_term), traj


# ----------------------------------------------------------------------------------------------------
# DMO-SAPO (Algorithm 1), as in dmo_sapo_diamond.py
# ----------------------------------------------------------------------------------------------------
def dmo_sapo(args, data, tok, dyn, rssm, rssm_opt, device, writer, run_dir):
    """The `for epoch` loop of Algorithm 1. Returns the actor and the number of world-model samples it used."""
    B, H = args.num_envs, args.horizon
    actor = Actor(rssm.feat_dim, ACTION_DIM, args.hidden).to(device)
    critic = Critic(rssm.feat_dim, args.hidden).to(device)
    log_alpha = torch.tensor(math.log(args.init_alpha), device=device, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, betas=args.betas)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, betas=args.betas)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    decay = lambda epoch: 1.0 - epoch / max(args.epochs, 1)
    actor_sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, decay)
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, decay)
    parts = {"actor": actor, "critic": critic, "rssm": rssm, "actor_opt": actor_opt, "critic_opt": critic_opt,
             "alpha_opt": alpha_opt, "rssm_opt": rssm_opt, "actor_sched": actor_sched, "critic_sched": critic_sched}
    path, start_epoch = os.path.join(run_dir, "agent.pt"), 0
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "agent", args, restore_rng=True)
        for key, module in parts.items():
            module.load_state_dict(ckpt[key])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
        start_epoch = ckpt["epoch"]
        print(f"DMO-SAPO: {'loaded' if start_epoch >= args.epochs else 'resuming'} {path} at epoch {start_epoch} "
              f"(the replay buffer starts empty)")

    def save_agent(epoch):
        save_checkpoint(path, "agent", args, **{k: m.state_dict() for k, m in parts.items()},
                        log_alpha=log_alpha.detach().cpu(), epoch=epoch, global_step=epoch * B * H)

    finetune = not args.no_rssm_finetune and args.forward_model != "rssm"
    replay = Replay(min(args.replay_size, args.epochs * B * (H + 1)), H, args.img_size) if finetune else None
    rollouts = Rollouts(args, data, rssm, tok, dyn, device)
    progress = Progress("dmo_sapo", args.epochs, start_epoch)
    if start_epoch < args.epochs:
        print(f"DMO-SAPO: {args.epochs} epochs of {B} rollouts x {H} steps in the {args.forward_model} forward model")
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        # Backward model learning: fine-tune the RSSM on the global model's trajectories
        if finetune and len(replay) > 0:
            for _ in range(args.rssm_finetune_steps):
                losses = rssm_train_step(rssm, rssm_opt, *replay.sample(args.rssm_batch_size, device))
            check_finite("RSSM fine-tuning loss", losses["loss"], epoch, path)
            for k, v in losses.items():
                writer.add_scalar(f"rssm/finetune_{k}", v, epoch * B * H)
        rollouts.restart_finished()  # new starts are filtered by the RSSM the policy is trained through

        # Actor and critic learning: one horizon in the global model, gradients through the local model
        alpha = log_alpha.exp().detach()
        terms, traj = imagine_horizon(args, actor, critic, rssm, rollouts, alpha)
        actor_loss = -sum(terms).mean() / H  # eq. (1), negated and divided by H
        if epoch == start_epoch or (epoch + 1) % 10 == 0:  # each term's gradient on the actor
            for name, term in zip(("reward", "entropy", "bootstrap"), terms):
                grads = torch.autograd.grad(-term.mean() / H, list(actor.parameters()), retain_graph=True,
                                            allow_unused=True)
                norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None)).item()
                writer.add_scalar(f"losses/actor_grad_{name}", norm, epoch * B * H)
        actor_opt.zero_grad()
        actor_loss.backward(inputs=list(actor.parameters()))
        actor_grad = nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm)
        actor_opt.step()
        check_finite("actor loss", actor_loss.item(), epoch, path)

        # eq. (2)-(3): critic on TD(lambda) targets, critic_epochs mini-epochs of minibatches
        feats = traj["feats"]  # (H, B, F)
        with torch.no_grad():
            next_values = critic.value(torch.cat([feats[1:], traj["last_feat"][None]]))
            targets = lambda_returns(traj["soft_rewards"], next_values, args.gamma, args.lam).flatten()
        feats = feats.flatten(0, 1)
        for _ in range(args.critic_epochs):
            for mb in torch.randperm(len(feats), device=device).split(args.critic_minibatch):
                critic_loss = (critic(feats[mb]) - targets[mb]).pow(2).mean(1).sum()
                critic_opt.zero_grad()
                critic_loss.backward()
                nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_opt.step()
        entropy = traj["entropies"].mean()
        alpha_loss = log_alpha.exp() * abs(args.target_entropy) * (entropy - args.target_entropy)  # SAPO's temperature
        alpha_opt.zero_grad()
        alpha_loss.backward()
        alpha_opt.step()
        actor_sched.step()
        critic_sched.step()
        if finetune:
            replay.add(*traj["chunk"])

        global_step = (epoch + 1) * B * H
        sps = B * H / (time.time() - t_epoch)
        mean_r = traj["rewards"].mean().item()
        for k, v in {"charts/SPS": sps, "imagination/reward": mean_r, "imagination/entropy": entropy.item(),
                     "losses/actor_loss": actor_loss.item(), "losses/critic_loss": critic_loss.item(),
                     "losses/alpha": alpha.item(), "losses/actor_grad_norm": actor_grad.item()}.items():
            writer.add_scalar(k, v, global_step)
        progress(epoch, reward=mean_r, alpha=alpha.item(), entropy=entropy.item(), SPS=sps)
        quick_eval = args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs
        if quick_eval:
            metrics, _ = run_episodes(args, policy_controller(rssm, actor, args.eval_quick_episodes, device),
                                      args.eval_quick_episodes, args.eval_seed, device, args.eval_controller)
            log_eval(writer, metrics, global_step)
            print(f"[eval] epoch {epoch + 1}: {eval_line(metrics)}")
        if args.save_model and (quick_eval or STOP["requested"]):
            save_agent(epoch + 1)
        stop_if_requested(f"DMO-SAPO saved at epoch {epoch + 1}" if args.save_model else
                          f"DMO-SAPO stopped at epoch {epoch + 1}, not saved: --no-save-model")
    if args.save_model and start_epoch < args.epochs:
        save_agent(args.epochs)
    return actor, args.epochs * B * H


# ----------------------------------------------------------------------------------------------------
# Zero-shot deployment in the simulator: the policy, or CEM-MPC in the world model (A.7)
# ----------------------------------------------------------------------------------------------------
def policy_controller(rssm, actor, episodes, device):
    """The deployed policy: the RSSM filters the real frames (sampled latents, as in training), the actor's mean
    action. Returns act(frames (E, 3, S, S) in [-1, 1]) -> actions (E, 3)."""
    state, action = rssm.initial(episodes), torch.zeros(episodes, ACTION_DIM, device=device)
    is_first = torch.ones(episodes, dtype=torch.bool, device=device)

    @torch.no_grad()
    def act(frames):
        nonlocal state, action
        state, _ = rssm.obs_step(state, action, rssm.encode(frames / 2), is_first)
        action, _ = actor(rssm.feat(state), deterministic=True)
        is_first[:] = False
        return action

    act.frames_per_action = 0
    return act


def cem_controller(args, tok, dyn, episodes, device):
    """CEM-MPC with the global model (A.7): each real frame (tokenized) joins a KV cache of the last cem_context ones;
    per action, cem_candidates action chunks of cem_horizon steps around the mean plan (the previous plan shifted) are generated
    jointly in chunk mode with cem_steps denoising steps each; the chunk's discounted expected reward scores them;
    the mean of the cem_elites best is the plan (one CEM iteration), its first action is executed."""
    N, Hc, A = args.cem_candidates, args.cem_horizon, ACTION_DIM
    cache = KVCache(args.dyn_layers, args.cem_context)
    plan = torch.zeros(episodes, Hc, A, device=device)
    last = torch.zeros(episodes, A, device=device)
    discount = args.gamma ** torch.arange(Hc, device=device).float()

    @torch.no_grad()
    def act(frames):
        nonlocal plan, last
        observe(dyn, cache, tok.encode(frames)[:, None], last[:, None], args.dyn_context_noise)
        candidates = plan.repeat_interleave(N, 0) + args.cem_std * torch.randn(episodes * N, Hc, A, device=device)
        candidates = candidates.clamp(-1, 1)
        _, logits = generate(dyn, cache.repeat(N, dyn.n_tokens), None, args.cem_steps, args.dyn_context_noise,
                             chunk_actions=candidates)
        score = (expected_reward(logits) * discount).sum(-1).view(episodes, N)
        elite = score.topk(args.cem_elites, 1).indices  # (E, elites)
        best = candidates.view(episodes, N, Hc, A)[torch.arange(episodes, device=device)[:, None], elite]
        mean = best.mean(1)
        plan = torch.cat([mean[:, 1:], torch.zeros_like(mean[:, :1])], 1)  # warm start of the next action's plan
        last = mean[:, 0]
        return last

    act.frames_per_action = N * Hc
    return act


def run_episodes(args, act, episodes, seed, device, controller="default", record=0):
    """Run `act` (a controller above) for `episodes` episodes of EgoPushCube-v0 on seeds seed, seed+1, ... in
    parallel, each until success or eval_max_steps. Frames are rendered at 64x64 and area-resized to img_size, as
    the play data. Random numbers come from a stream seeded with `seed` (the training's stream is untouched).
    Returns Table 1's metrics and the top-down videos of the first `record` episodes."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        sims = [gym.make(ENV_ID, controller=controller, start=args.start, max_episode_steps=args.eval_max_steps)
                for _ in range(episodes)]
        obs, infos = zip(*(sim.reset(seed=seed + i) for i, sim in enumerate(sims)))
        obs = list(obs)
        poses = [[info["robot_pose"]] for info in infos]
        alive, success = [True] * episodes, np.zeros(episodes, bool)
        returns, length, contact, pushing = (np.zeros(episodes) for _ in range(4))
        final_distance = np.zeros(episodes)
        videos = [[sims[i].unwrapped.render()] for i in range(min(record, episodes))]
        act_time, actions_taken = 0.0, 0
        while any(alive):
            frames = np.stack([envs.resize_frame(o, args.img_size) for o in obs])
            frames = to_float(torch.as_tensor(frames, device=device).permute(0, 3, 1, 2))
            t0 = time.perf_counter()
            action = act(frames).cpu().numpy()
            act_time, actions_taken = act_time + time.perf_counter() - t0, actions_taken + sum(alive)
            for i, sim in enumerate(sims):
                if not alive[i]:
                    continue
                obs[i], reward, terminated, truncated, info = sim.step(action[i])
                returns[i] += reward
                length[i] += 1
                contact[i] += info["contact"]
                pushing[i] += info["label"] == 1
                poses[i].append(info["robot_pose"])
                success[i] = info["is_success"]
                final_distance[i] = np.linalg.norm(info["cube_pose"][:2] - envs.NET_CENTER)
                alive[i] = not (terminated or truncated)
                if i < len(videos):
                    videos[i].append(sim.unwrapped.render())
    metrics = {"episodes": episodes, "successes": int(success.sum()), "success_rate": float(success.mean()),
               "mean_return": float(returns.mean()), "controller": controller,
               "mean_final_cube_to_net_m": float(final_distance.mean()),
               "contact_fraction": float((contact / length).mean()), "pushing_fraction": float((pushing / length).mean())}
    won = [i for i in range(episodes) if success[i]]
    table = {"steps_to_success": [length[i] for i in won]}
    for i in won:
        for k, v in envs.push_cube_metrics(np.stack(poses[i])).items():
            table.setdefault(k, []).append(v)
    for k in ("steps_to_success", "straightness", "curvature"):  # Table 1: mean +- std over successful episodes
        values = table.get(k, [])
        metrics[f"{k}_mean"] = float(np.mean(values)) if values else None
        metrics[f"{k}_std"] = float(np.std(values)) if values else None
    metrics["success_by_episode"] = success.astype(int).tolist()  # seed, seed + 1, ...: for paired comparisons
    metrics["ms_per_action"] = 1000 * act_time / max(actions_taken, 1)  # batched over the parallel episodes
    metrics["frames_generated_per_action"] = act.frames_per_action
    return metrics, videos


def log_eval(writer, metrics, step):
    for k in ("success_rate", "mean_return", "mean_final_cube_to_net_m", "contact_fraction", "pushing_fraction"):
        writer.add_scalar(f"eval/{k}", metrics[k], step)


def eval_line(metrics):
    line = (f"success {metrics['success_rate']:.2f}, cube to net {metrics['mean_final_cube_to_net_m']:.2f} m, "
            f"pushing towards the net {metrics['pushing_fraction']:.2f} of steps")
    if metrics["successes"]:
        line += (f", steps to success {metrics['steps_to_success_mean']:.0f}, straightness "
                 f"{metrics['straightness_mean']:.2f}, curvature {metrics['curvature_mean']:.2f}")
    return line


@torch.no_grad()
def imagined_vs_real(args, data, tok, dyn, rssm, steps=16):
    """Fig. 4: from one real window of init_context frames, the recorded actions followed by the DreamerV4 dynamics
    (4-step sampling, KV cache) and by the RSSM prior. Returns frames (steps, S, 3 S, 3) uint8 [real | DreamerV4 |
    RSSM] and each model's mean squared error."""
    with torch.random.fork_rng(devices=[data["obs"].device] if data["obs"].is_cuda else []):
        torch.manual_seed(0)
        L, device = min(args.init_context, args.dyn_max_context - 1), data["obs"].device
        starts = window_starts(data, L + steps)
        idx = (starts[torch.randint(len(starts), (1,))][:, None] + torch.arange(L + steps)).to(device)
        real, into = to_float(data["obs"][idx]), actions_into(data["action"][idx])
        _, dreamed = dream(args, tok, dyn, tok.encode(real[:, :L]), into)
        is_first = torch.zeros(1, L, dtype=torch.bool, device=device)
        is_first[:, 0] = True
        post, _ = rssm.observe(rssm.encode(real[:, :L] / 2), into[:, :L], is_first)
        state, latent = {k: v[:, -1] for k, v in post.items()}, []
        for t in range(L, L + steps):
            state = rssm.img_step(state, into[:, t], sample=False)
            latent.append((2 * rssm.decode(rssm.feat(state))).clamp(-1, 1))
        latent, target = torch.stack(latent, 1), real[:, L:]
    errors = {"dreamerv4": (dreamed - target).pow(2).mean().item(), "rssm": (latent - target).pow(2).mean().item()}
    video = torch.cat([target, dreamed, latent], -1)[0]  # (steps, 3, S, 3 S)
    return to_uint8(video).permute(0, 2, 3, 1).cpu().numpy(), errors


# ----------------------------------------------------------------------------------------------------
# Command line and the run
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Preset values, then the command line on top; with --resume, the run's saved args instead of a preset."""
    argv = sys.argv[1:] if argv is None else argv
    flag = lambda name: next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                              if (a == name and i + 1 < len(argv)) or a.startswith(name + "=")), None)
    resume, preset = flag("--resume"), flag("--preset") or "default"
    if resume and os.path.isfile(resume):
        raise RunError(f"--resume {resume} is a file; --resume takes a run directory: --resume "
                       f"{os.path.dirname(resume) or '.'}")
    if resume:
        path = os.path.join(resume, "args.json")
        if not os.path.exists(path):
            raise RunError(f"{resume}: not a run directory (no args.json)")
        with open(path) as f:
            saved = json.load(f)
        defaults = Args(**{k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    elif preset in PRESETS:
        defaults = Args(**{**dataclasses.asdict(Args()), **PRESETS[preset], "preset": preset})
    else:
        defaults = Args()  # tyro reports the invalid choice
    args = tyro.cli(Args, default=defaults, args=argv, description=presets_help(__doc__, PRESETS))
    for name in ("save_every", "play_steps", "img_size", "tok_patch", "tok_dim", "tok_layers", "tok_heads",
                 "tok_latents", "tok_bottleneck", "tok_batch_size", "dyn_dim", "dyn_layers", "dyn_heads",
                 "dyn_registers", "dyn_max_shortcut", "dyn_sampling_steps", "dyn_max_context", "dyn_seq_len",
                 "dyn_batch_size", "rssm_batch_size", "rssm_seq_len", "init_context", "epochs", "num_envs", "horizon",
                 "episode_length", "critic_epochs", "critic_minibatch", "cem_candidates", "cem_horizon", "cem_elites",
                 "cem_steps", "cem_context", "eval_episodes", "eval_max_steps", "eval_quick_episodes"):
        if getattr(args, name) < 1:
            raise RunError(f"{name} ({getattr(args, name)}) must be at least 1")
    for name in ("tok_steps", "dyn_steps", "rssm_pretrain_steps", "rssm_finetune_steps", "eval_every", "seed",
                 "eval_seed", "reward_balance", "play_after_success"):
        if getattr(args, name) < 0:
            raise RunError(f"{name} ({getattr(args, name)}) must not be negative")
    for name in ("tok_lr", "dyn_lr", "rssm_lr", "actor_lr", "critic_lr", "alpha_lr", "init_alpha", "cem_std"):
        if not getattr(args, name) > 0:
            raise RunError(f"{name} ({getattr(args, name)}) must be positive")
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0
    if not power_of_two(args.dyn_max_shortcut):
        raise RunError(f"dyn_max_shortcut ({args.dyn_max_shortcut}) must be a power of 2 (step sizes 1, 1/2, ...)")
    for name in ("dyn_sampling_steps", "cem_steps"):
        if not power_of_two(getattr(args, name)) or getattr(args, name) > args.dyn_max_shortcut:
            raise RunError(f"{name} ({getattr(args, name)}) must be a power of 2 of at most dyn_max_shortcut "
                           f"({args.dyn_max_shortcut}): the dynamics learned step sizes 1/2^j down to 1/dyn_max_shortcut")
    if args.img_size % 16 or args.img_size % args.tok_patch:
        raise RunError(f"img_size ({args.img_size}) must be a multiple of 16 (the RSSM's CNN) and of tok_patch "
                       f"({args.tok_patch})")
    for dim, heads in (("tok_dim", "tok_heads"), ("dyn_dim", "dyn_heads")):
        if getattr(args, dim) % (2 * getattr(args, heads)):
            raise RunError(f"{dim} ({getattr(args, dim)}) must be a multiple of 2 x {heads} ({getattr(args, heads)}): "
                           f"each head's size must be even for the rotary embedding")
    if args.episode_length % args.horizon:
        raise RunError(f"episode_length ({args.episode_length}) must be a multiple of horizon ({args.horizon})")
    if not 0 <= args.dyn_context_noise < 1:
        raise RunError(f"dyn_context_noise ({args.dyn_context_noise}) must be in [0, 1)")
    if not 0 <= args.dyn_bootstrap_fraction <= 1:
        raise RunError(f"dyn_bootstrap_fraction ({args.dyn_bootstrap_fraction}) must be in [0, 1]")
    if not 0 <= args.tok_max_mask < 1:
        raise RunError(f"tok_max_mask ({args.tok_max_mask}) must be in [0, 1)")
    if args.dyn_seq_len > args.dyn_max_context + 1:
        raise RunError(f"dyn_seq_len ({args.dyn_seq_len}) must be at most dyn_max_context + 1 "
                       f"({args.dyn_max_context + 1}): generation never shows a frame more past frames than that")
    if args.cem_elites > args.cem_candidates:
        raise RunError(f"cem_elites ({args.cem_elites}) must be at most cem_candidates ({args.cem_candidates})")
    if args.mode == "cem-mpc" and args.forward_model == "rssm":
        raise RunError("--mode cem-mpc plans with the DreamerV4 dynamics: it needs --forward-model dreamerv4")
    return args


STAGES = {"names": [], "current": 0}  # the run's stages in order, and which one runs (1-based)


def start_stage(name):
    STAGES["current"] = STAGES["names"].index(name) + 1
    if main_process():
        print(f"stage {STAGES['current']} of {len(STAGES['names'])}: {name} | {duration(wall_time())} into the run",
              flush=True)


def eval_file(args):
    """eval.json for the policy under the default controller; the other evaluations beside it."""
    return {("dmo-sapo", "default"): "eval.json", ("dmo-sapo", "alt"): "eval_alt_controller.json",
            ("cem-mpc", "default"): "eval_cem_mpc.json",
            ("cem-mpc", "alt"): "eval_cem_mpc_alt_controller.json"}[(args.mode, args.eval_controller)]


def check_checkpoints(args, run_dir=None):
    """Refuse a stage checkpoint of another configuration (given by a flag, or in the run directory of --resume)
    before anything is written, so a refused command loses nothing and the run still resumes as it was."""
    given = {"tokenizer": args.tok_checkpoint, "dynamics": args.dyn_checkpoint, "rssm": args.rssm_checkpoint,
             "agent": None}
    for kind, path in given.items():
        path = path or (run_dir and os.path.join(run_dir, f"{kind}.pt"))
        if path and (given[kind] or os.path.exists(path)):
            load_checkpoint(path, kind, args)


def purge_step(run_dir):
    """Where TensorBoard drops the events of a resumed run: after the furthest step its checkpoints hold (stages log
    against their steps, DMO-SAPO against world-model samples), so what a killed process logged after its last
    checkpoint goes. The stages share x-axes that start at 0 and a purge drops every tag, so it never reaches below
    what a finished stage logged (an unfinished stage's curve may then overlap itself, after a kill; a Ctrl-C saves
    where it stopped logging)."""
    steps = [0]
    for kind in STAGE_FIELDS:
        path = os.path.join(run_dir, f"{kind}.pt")
        if os.path.exists(path):  # memory-mapped: the weights are not read
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            steps.append(1 + (ckpt["global_step"] if kind == "agent" else ckpt["step"]))
    return max(steps)


def run(args):
    check_checkpoints(args, args.resume)
    device = init_distributed(args)
    if args.resume:
        run_dir = STOP["run_dir"] = args.resume
        args.run_name = os.path.basename(os.path.normpath(run_dir))
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        if os.path.exists(os.path.join(run_dir, "wall_time_s.txt")):
            with open(os.path.join(run_dir, "wall_time_s.txt")) as f:
                CLOCK["before"] = float(f.read())
        if main_process():
            print(f"resuming {run_dir}: finished stages are loaded, the interrupted one continues")
    else:
        saved = None
        stamp = [int(time.time())]
        if DIST["world"] > 1:  # every process writes to rank 0's run directory
            dist.broadcast_object_list(stamp, src=0)
        args.run_name = f"{ENV_ID}__{args.exp_name}__{args.seed}__{stamp[0]}"
        run_dir = os.path.join(args.runs_dir, args.run_name)
    world_models = args.mode == "cem-mpc" or args.forward_model == "dreamerv4"
    kinds = (["play data"] + ["tokenizer", "dynamics"] * world_models
             + (["RSSM pretraining", "DMO-SAPO"] if args.mode == "dmo-sapo" else []) + ["evaluation in the simulator"])
    stop = {"tokenizer": "tokenizer", "dynamics": "dynamics", "rssm": "RSSM pretraining"}.get(args.stop_after)
    STAGES["names"] = kinds[: kinds.index(stop) + 1] if stop in kinds else kinds
    random.seed(args.seed + DIST["rank"])
    np.random.seed(args.seed + DIST["rank"])
    torch.manual_seed(args.seed + DIST["rank"])  # each process its own noise; the same initial weights from rank 0
    torch.backends.cudnn.deterministic = args.torch_deterministic

    start_stage("play data")  # data first: a file it refuses leaves no run directory behind
    if DIST["world"] > 1 and not main_process():
        dist.barrier()  # rank 0 collects the play data first
    data = load_play_data(args, device, verbose=main_process())
    if DIST["world"] > 1 and main_process():
        dist.barrier()
    writer = None
    if main_process():
        os.makedirs(run_dir, exist_ok=True)
        keep = {k: saved[k] for k in ("mode", "eval_controller")} if saved else {}  # what the run itself was
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({**{k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "stop_after")},
                       **keep}, f, indent=1)
        writer = STOP["writer"] = SummaryWriter(run_dir, purge_step=purge_step(run_dir) if args.resume else None)
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        print(f"run directory {run_dir} ({device}, {DIST['world']} process{'es' * (DIST['world'] > 1)})")
    STOP["armed"] = True  # Ctrl-C from here on: the stages stop and save (request_stop)

    def stopped_after(stage):
        if writer is not None:
            writer.close()
        if main_process():
            print(f"stopped after {STAGE_NAMES[stage]} (--stop-after {stage}); continue with: python "
                  f"{os.path.basename(__file__)} --resume {shlex.quote(run_dir)}")

    # Offline training of the global world model f->: the tokenizer, then the dynamics with the reward head
    tok = dyn = None
    if world_models:
        start_stage("tokenizer")
        tok = train_tokenizer(args, data, device, writer, run_dir).eval().requires_grad_(False)
        if args.stop_after == "tokenizer":
            return stopped_after("tokenizer")
        start_stage("dynamics")
        dyn = train_dynamics(args, data, tok, device, writer, run_dir).eval().requires_grad_(False)
        if main_process():
            report = world_model_report(args, data, tok, dyn, device)
            per_label = lambda key: " / ".join(f"{v:.3f}" for v in report[key])
            print(f"world model: tokenizer MSE {report['tokenizer_mse']:.4f}, open-loop MSE over 8 generated frames "
                  f"{report['open_loop_mse']:.4f} (copying the last context frame: {report['copy_last_mse']:.4f}; "
                  f"in [-1, 1]); reward head on {sum(report['label_counts'])} real frames (labels other / pushing / "
                  f"success: {' / '.join(map(str, report['label_counts']))}): accuracy {report['reward_accuracy']:.3f} "
                  f"(always the commonest label: {report['reward_accuracy_majority']:.3f}), recall "
                  f"{per_label('reward_recall')}, mean expected reward {per_label('reward_mean_by_label')}")
            for k in ("tokenizer_mse", "open_loop_mse", "copy_last_mse", "reward_accuracy"):  # not the training curves'
                writer.add_scalar(f"world_model/report_{k}", report[k], 0)
            for c, name in enumerate(("other", "pushing", "success")):
                writer.add_scalar(f"world_model/report_reward_recall_{name}", report["reward_recall"][c], 0)
                writer.add_scalar(f"world_model/report_reward_mean_{name}", report["reward_mean_by_label"][c], 0)
        if args.stop_after == "dynamics":
            return stopped_after("dynamics")
    if not main_process():  # the other processes only train the world models
        return None

    if args.mode == "cem-mpc":
        STOP["armed"] = False
        start_stage("evaluation in the simulator")
        act = cem_controller(args, tok, dyn, args.eval_episodes, device)
        global_step, videos_of = 0, "CEM-MPC"
    else:
        # Offline pretraining of the local DreamerV3 world model f<- (its reward head on the label rewards)
        start_stage("RSSM pretraining")
        rssm, rssm_opt = pretrain_rssm(args, data, device, writer, run_dir)
        if args.stop_after == "rssm":
            return stopped_after("rssm")
        if args.capture_video and world_models:
            video, errors = imagined_vs_real(args, data, tok, dyn, rssm)
            envs.write_video(os.path.join(run_dir, "imagined_vs_real.mp4"), video)
            writer.add_image("world_model/imagined_vs_real", np.concatenate(list(video[::2]), 0), 0, dataformats="HWC")
            print(f"open-loop error over 16 steps (MSE in [-1, 1]): DreamerV4 {errors['dreamerv4']:.4f}, "
                  f"RSSM {errors['rssm']:.4f}")
        start_stage("DMO-SAPO")
        actor, global_step = dmo_sapo(args, data, tok, dyn, rssm, rssm_opt, device, writer, run_dir)
        STOP["armed"] = False  # every checkpoint is saved: a Ctrl-C from here on stops at once
        start_stage("evaluation in the simulator")
        act = policy_controller(rssm, actor, args.eval_episodes, device)
        videos_of = "the policy"
    # Zero-shot deployment in the simulator
    print(f"evaluating {videos_of} on {args.eval_episodes} episodes of {ENV_ID} ({args.eval_controller} controller, "
          f"{args.start} start distribution)")
    metrics, videos = run_episodes(args, act, args.eval_episodes, args.eval_seed, device, args.eval_controller,
                                   record=3 if args.capture_video else 0)
    prefix = eval_file(args)[: -len(".json")].replace("eval", "eval_episode", 1)
    for i, video in enumerate(videos):
        envs.write_video(os.path.join(run_dir, f"{prefix}_{i}.mp4"), video, scale=1)
    result = {"env_id": ENV_ID, "mode": args.mode, "start": args.start, **metrics, "global_step": global_step,
              "wall_time_s": wall_time()}
    log_eval(writer, metrics, global_step)
    with open(os.path.join(run_dir, eval_file(args)), "w") as f:
        json.dump(result, f, indent=1)
    writer.close()
    print(json.dumps(result))
    print(f"done in {duration(result['wall_time_s'])}: {result['successes']} of {result['episodes']} evaluation "
          f"episodes succeeded ({eval_line(result)})")
    print(f"  results      {os.path.join(run_dir, eval_file(args))}")
    for i in range(len(videos)):
        print(f"  {'videos' if i == 0 else '':13}{os.path.join(run_dir, f'{prefix}_{i}.mp4')}")
    print(f"  TensorBoard  tensorboard --logdir {shlex.quote(run_dir)}")
    return result


def main(argv=None):
    STOP.update(armed=False, requested=False, run_dir=None, writer=None)
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        run(parse_args(argv))
    except (RunError, envs.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        print(stop_message(e, os.path.basename(__file__)), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
