"""DMO-SAPO with a DIAMOND global world model on the Push-T ladder (seed 000: "Coupled Local and Global World Models for
Efficient First Order RL", Algorithm 1 in appendix A.4, hyperparameters in Table 4).

The policy is trained entirely inside learned models and deployed zero-shot in the simulator:
  1. play data (a rung of the Push-T ladder, envs.py: 5 Hz velocity actions, 64x64 frames);
  2. the global forward model f->: a DIAMOND EDM denoiser conditioned on 4 past frames and actions;
  3. the global reward model r: a contrastive goal-conditioned energy f_psi(s_t | s_start, s_goal) (Rank2Reward);
  4. the local backward model f<-: the DreamerV3 RSSM of rssm.py, pretrained on the play data with rewards from r;
  5. DMO-SAPO: DIAMOND makes the next frame, the RSSM gives the gradient (decoupled forward/backward), SAPO
     updates actor, critic and temperature; DIAMOND's trajectories fine-tune the RSSM every epoch;
  6. zero-shot evaluation in the simulator -> eval.json.

    python dmo_sapo_diamond.py --seed 1                   # `default`: the reach rung on a 2-core CPU, about an hour
    python dmo_sapo_diamond.py --seed 1 --env-id PushT-v0 --rssm-keypoints 0 --reward-keypoints 0  # Push-T on a CPU
    python dmo_sapo_diamond.py --seed 1 --preset tiny     # the whole pipeline in about a minute
    python dmo_sapo_diamond.py --seed 1 --preset paper          # Push-T at Table 4 sizes (on a GPU)
    python dmo_sapo_diamond.py --seed 1 --forward-model rssm    # ablation "No Diffusion"
    python dmo_sapo_diamond.py --seed 1 --no-rssm-finetune      # ablation "No RSSM Finetuning"
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
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

import envs
from rssm import RSSM, RSSMConfig, keypoint_convs, spatial_softmax


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    preset: Literal["tiny", "default", "paper"] = "default"
    """sizes and budgets (each preset's values are listed at the top of --help); flags given on the command line
    override the preset"""
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
    """a run directory to continue: finished stages are loaded, the interrupted one continues from its checkpoint
    (so does the run's finished RSSM when --rssm-pretrain-steps asks for more and no agent.pt was trained on it)"""
    stop_after: Optional[Literal["world_model", "reward_model", "rssm"]] = None
    """stop after this stage (its checkpoint is written); continue later with --resume"""
    save_every: int = 500
    """steps between checkpoints of the world model, reward model and RSSM (DMO-SAPO saves at every quick
    evaluation); Ctrl-C saves the current stage's checkpoint too"""

    # Play data
    env_id: Literal["PushT-v0", "PushTReach-v0", "PushTPuck-v0"] = "PushTReach-v0"
    """the task, a rung of the Push-T ladder (envs.py): PushTReach-v0 (the tool reaches a target; no object; the
    rung the whole pipeline learns on a CPU), PushTPuck-v0 (push a round puck onto a target) or PushT-v0 (the
    paper's; the `paper` preset)"""
    data_dir: str = "data"
    """play data lives at {data_dir}/{env_id}_play_{play_steps}.npz (one file per size: presets never share one),
    collected from the simulator when missing"""
    data_path: Optional[str] = None
    """any play-data file of the format in README (e.g. recorded on a real robot); overrides data_dir"""
    play_steps: int = 30_000
    """frames of play to collect when no file exists (paper: 4 h at 5 Hz = 72k)"""
    img_size: int = 32
    """frame resolution of every model (the paper: 64; frames are area-resized from the data file)"""

    # Global world model f-> (DIAMOND)
    wm_checkpoint: Optional[str] = None
    """a trained world model (world_model.pt); skips its training"""
    wm_channels: list[int] = field(default_factory=lambda: [32, 32, 32])
    """UNet channels per level"""
    wm_depths: list[int] = field(default_factory=lambda: [1, 1, 1])
    """residual blocks per UNet level"""
    wm_cond_channels: int = 128
    """size of the noise-and-action conditioning vector of the adaptive GroupNorms"""
    wm_context: int = 4
    """past frames and actions the denoiser is conditioned on"""
    wm_denoising_steps: int = 3
    """Euler steps of the sampler"""
    wm_steps: int = 2000
    """training steps (too few and the policy learns to exploit DIAMOND's drift: results/); a finished checkpoint of
    fewer steps (--resume, --wm-checkpoint) trains on to this many"""
    wm_batch_size: int = 16
    """training batch size"""
    wm_lr: float = 5e-4
    """AdamW learning rate (100-step linear warm-up, weight decay 1e-2, grad clip 1; DIAMOND: 1e-4. `default` is
    higher: its small denoiser reaches at 2000 steps the training loss 1e-4 reaches at 6000, results/)"""
    wm_ar_steps: int = 1
    """extra training steps conditioned on the model's own prediction (as the DIAMOND code does)"""

    # Global reward model r (Rank2Reward)
    reward_checkpoint: Optional[str] = None
    """a trained reward model (reward_model.pt); skips its training"""
    reward_steps: int = 1500
    """training steps; a finished checkpoint of fewer steps (--resume, --reward-checkpoint) trains on to this many.
    At 1000 the reach r's peak moved 60-90 px off the target for some start frames and the policy stopped short
    (results/)"""
    reward_batch_size: int = 64
    """pairs per training step"""
    reward_lr: float = 3e-4
    """Adam learning rate"""
    reward_max_segment: int = 64
    """longest play segment (frames) whose first/last frames serve as s_start/s_goal in training"""
    reward_goal_videos: int = 150
    """64-frame videos that end with the T on its target (envs.pusht_goal_videos: play from the goal, reversed),
    whose segments r learns to rank so that "closer to the goal image" means the T's pose; 0: play only"""
    reward_video_fraction: float = 1.0
    """share of each batch's ranking pairs drawn from the goal videos, the rest from play segments. Play's own
    clock disagrees with the goal's (play drifts the T away from the centre), and the goal image does not
    undo that: mixed by frames (about 1 pair in 5 from the videos), r rewarded the T far from its target (README)"""
    reward_video_path: Optional[str] = None
    """a file of such videos (the data format, each episode ending at the goal); default
    {env_id}_goal_videos_{reward_goal_videos}.npz beside the play data, collected when missing"""
    reward_keypoints: int = 16
    """spatial-softmax keypoints added to r's CNN embedding (as --rssm-keypoints; 0: the plain CNN, which ranks the
    reach rung's 2-pixel tool poorly: results/)"""

    # Local model f<- (DreamerV3 RSSM)
    rssm_checkpoint: Optional[str] = None
    """a pretrained RSSM (rssm.pt); skips its pretraining"""
    local_obs: Literal["frames", "state"] = "frames"
    """what the local model (and so the policy) observes: camera frames (the Coupled paper), or the simulator's
    state (the original DMO paper's setting; needs --forward-model sim): the optimiser without the image
    representation, which at 32x32 does not learn the 2-pixel tool in a CPU budget (README)"""
    rssm_size: Literal["tiny", "small", "push_t", "push_cube"] = "small"
    """RSSM size (rssm.presets; Table 4 Push-T = push_t)"""
    rssm_keypoints: int = 16
    """spatial-softmax keypoints appended to the RSSM's image embedding (rssm.RSSMConfig.keypoints; DreamerV3 and
    the `paper` preset: 0; without them the 32x32 RSSM never learns the 2-pixel tool on a CPU budget: README)"""
    rssm_pretrain_steps: int = 700
    """offline pretraining steps on the play data (`default`: the reach gate passes from ~600, results/)"""
    rssm_batch_size: int = 16
    """sequences per batch"""
    rssm_seq_len: int = 32
    """frames per sequence (Table 4: 64)"""
    rssm_lr: float = 6e-4
    """Adam learning rate (DreamerV3: 1e-4; `default` is higher to learn in its few steps)"""
    rssm_recon_scale: float = 64.0
    """weight of the summed-pixel reconstruction loss against the KL (DreamerV3: 1). At 32x32 the tool and
    the T cover a few pixels, and at weight 1 to 16 the RSSM often leaves them out of its latent (README)"""
    rssm_fg_weight: float = 10.0
    """weight of the reconstruction error on the pixels that differ from the play data's median frame (the tool
    and the T), the others weigh 1 (DreamerV3: 1 everywhere). Without it the `default` RSSM often stays at the
    background solution and the policy does not see what it must move (README)"""
    rssm_finetune_steps: int = 4
    """fine-tuning steps per epoch on the global model's trajectories"""
    no_rssm_finetune: bool = False
    """ablation "No RSSM Finetuning": keep the pretrained RSSM fixed during RL"""
    replay_size: int = 1_000_000
    """FIFO replay of global-model frames for RSSM fine-tuning (Table 4: 1e6)"""

    # DMO-SAPO actor-critic
    forward_model: Literal["diamond", "rssm", "sim"] = "diamond"
    """who generates the forward trajectory: DIAMOND, the RSSM itself (ablation "No Diffusion"), or the simulator
    reset to the state recorded with each play window (the oracle: the original DMO paper's setting)"""
    reward_source: Literal["model", "true"] = "model"
    """the value of each imagined reward: the global reward model r, or the simulator's task reward (the oracle;
    needs --forward-model sim and play data with states). Its gradient always comes from the RSSM's reward head,
    which is trained on the same kind of reward"""
    epochs: int = 40
    """epochs of Algorithm 1 (each: RSSM fine-tuning, one horizon of num_envs rollouts, actor/critic updates;
    reach reaches 10/10 by epoch 10-20 at `default`)"""
    num_envs: int = 32
    """parallel imagined rollouts (Table 4: 128)"""
    horizon: int = 16
    """steps per actor update (Table 4: 16)"""
    episode_length: int = 16
    """rollouts continue across horizons for this many steps, then restart from play data. The `default` DIAMOND
    drifts over long closed-loop rollouts and a policy trained on 64 learned that drift, not the simulator (README:
    What the policy learns); `paper`: 128"""
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
    """initial entropy temperature (mineral's SAPO: 1.0; at 1.0 the entropy's gradient on the actor was as large as
    the reward's here, at 0.1 it is a tenth of it: losses/actor_grad_*)"""
    target_entropy: float = -6.0
    """target entropy of the learned temperature (Table 4); the bonus is scaled by it as SAPO's authors do
    (`scaled_entropy`)"""
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

    # Exploit patching (seed 000 §3): the policy runs on the robot, DIAMOND is fine-tuned on what it saw
    patch_every: int = 0
    """every this many DMO epochs (0: never), run the policy in the simulator and fine-tune DIAMOND on its frames"""
    patch_episodes: int = 64
    """simulator episodes per patch, with sampled actions (seeds from 2,000,000: disjoint from play and evaluation)"""
    patch_steps: int = 64
    """steps of each patch episode"""
    patch_wm_steps: int = 1000
    """DIAMOND fine-tuning steps per patch; half of each batch from the patch frames, half from the play data"""

    # Evaluation in the simulator
    eval_episodes: int = 50
    """final zero-shot evaluation episodes"""
    eval_every: int = 10
    """epochs between quick evaluations during training (0: never)"""
    eval_quick_episodes: int = 10
    """episodes of a quick evaluation"""
    eval_seed: int = 1_000_000
    """first evaluation seed; play data uses seeds from 0, so evaluation starts are disjoint from training"""
    exploit_check_episodes: int = 5
    """after the final evaluation, replay the first steps of this many evaluation episodes' actions open loop in
    DIAMOND and compare r on real and dreamed frames (eval.json `world_model_check`; 0: skip)"""
    exploit_check_steps: int = 32
    """policy steps of that check; DIAMOND dreams all but the first wm_context of them"""

    # filled in at runtime
    run_name: str = ""
    """the run directory's name"""


PRESETS = {
    "tiny": dict(play_steps=1200, wm_channels=[8, 8], wm_depths=[1, 1], wm_cond_channels=16, wm_steps=30,
                 wm_batch_size=8, reward_steps=30, reward_batch_size=16, reward_goal_videos=4, rssm_size="tiny",
                 rssm_pretrain_steps=20, rssm_batch_size=4, rssm_seq_len=16, rssm_finetune_steps=1, epochs=4,
                 num_envs=8, horizon=8, episode_length=16, critic_epochs=2, critic_minibatch=32, hidden=[32, 32],
                 eval_episodes=2, eval_every=2, eval_quick_episodes=2),
    "default": dict(),  # the field defaults above: sized for a 2-core CPU, see README
    "paper": dict(env_id="PushT-v0", reward_keypoints=0, rssm_keypoints=0, play_steps=72_000, img_size=64, wm_channels=[64, 64, 64, 64], wm_depths=[4, 4, 4, 4],
                  wm_cond_channels=256, wm_steps=200_000, wm_lr=1e-4, wm_batch_size=8, reward_steps=50_000,
                  reward_goal_videos=500, rssm_size="push_t", rssm_pretrain_steps=50_000, rssm_seq_len=64,
                  rssm_lr=1e-4, rssm_recon_scale=1.0, rssm_fg_weight=1.0, rssm_finetune_steps=20, epochs=4000,
                  num_envs=128, episode_length=128, eval_episodes=100, eval_every=100),
}


# ----------------------------------------------------------------------------------------------------
# Play data
# ----------------------------------------------------------------------------------------------------
def play_data_path(args):
    return args.data_path or os.path.join(args.data_dir, f"{args.env_id}_play_{args.play_steps}.npz")


def load_play_data(args, device):
    """Frames as uint8 (N, 3, S, S), actions (N, A) taken after each frame, is_first (N,), episode ids (N,)."""
    path = play_data_path(args)
    if not os.path.exists(path) and args.data_path is None:
        print(f"collecting {args.play_steps} frames of play data into {path}")
        envs.save_dataset(path, envs.collect(args.env_id, args.play_steps, seed=0))
    data = envs.load_dataset(path)
    if str(data.get("env_id", args.env_id)) != args.env_id:
        raise RunError(f"{path}: play data of {data['env_id']}, but this run's task is {args.env_id} (--env-id)")
    if args.data_path is None and len(data["obs"]) != args.play_steps:  # collected earlier, e.g. by another preset
        raise RunError(f"{path} holds {len(data['obs'])} frames, not the {args.play_steps} of --play-steps: it was not "
                       f"collected by this script; pass --data-path {path} to train on it as it is")
    return frames_to_tensors(data, path, args.img_size, device)


def load_goal_videos(args, device):
    """Videos that end at the goal, for the reward model only (their actions are not transitions)."""
    play_dir = os.path.dirname(play_data_path(args))
    path = args.reward_video_path or os.path.join(play_dir, f"{args.env_id}_goal_videos_{args.reward_goal_videos}.npz")
    if not os.path.exists(path) and args.reward_video_path is None:
        print(f"collecting {args.reward_goal_videos} goal videos into {path}")
        envs.save_dataset(path, envs.pusht_goal_videos(args.reward_goal_videos, seed=1, env_id=args.env_id))
    videos = envs.load_dataset(path)
    if args.reward_video_path is None and videos["is_first"].sum() != args.reward_goal_videos:
        raise RunError(f"{path} holds {videos['is_first'].sum()} goal videos, not the {args.reward_goal_videos} of "
                       f"--reward-goal-videos: it was not collected by this script; pass --reward-video-path {path}")
    return frames_to_tensors(videos, path, args.img_size, device)


def frames_to_tensors(data, path, img_size, device):
    if data["action"].shape[1] != 2:
        raise envs.DatasetError(f"{path}: key 'action': Push-T needs 2-d actions, got {data['action'].shape[1]}")
    obs = np.stack([envs.resize_frame(o, img_size) for o in data["obs"]])  # the simulator's one rendering path
    is_first = torch.as_tensor(data["is_first"])
    return {
        "obs": torch.as_tensor(obs).permute(0, 3, 1, 2).contiguous().to(device),
        "action": torch.as_tensor(data["action"]).to(device),
        "is_first": is_first.to(device),
        "episode": (torch.cumsum(is_first.long(), 0) - 1).to(device),
        "state": data.get("state"),
    }


def window_starts(data, length, episodes=None):
    """Indices t such that frames t .. t+length-1 lie in one episode (optionally one of `episodes`)."""
    ep = data["episode"].cpu()
    n = len(ep)
    ok = torch.zeros(n, dtype=torch.bool)
    if n >= length:
        ok[: n - length + 1] = ep[: n - length + 1] == ep[length - 1:]
    if episodes is not None:
        ok &= torch.isin(ep, torch.as_tensor(episodes))
    return torch.nonzero(ok).squeeze(1)


def concat_data(a, b):
    """Two sets of play-data tensors as one (b's episodes after a's)."""
    out = {k: torch.cat([a[k], b[k]]) for k in ("obs", "action", "is_first")}
    out["episode"] = torch.cumsum(out["is_first"].long(), 0) - 1
    out["state"] = None
    return out


def sample_windows(data, starts, n, length):
    """n random windows of `length` frames from `starts`: float frames (n, length, 3, S, S), actions (n, length, A)."""
    idx = starts[torch.randint(len(starts), (n,))][:, None] + torch.arange(length)
    idx = idx.to(data["obs"].device)
    return to_float(data["obs"][idx]), data["action"][idx]


def to_float(frames):
    """uint8 frames -> float in [-1, 1] (DIAMOND's space; the RSSM sees half of it, DreamerV3's [-0.5, 0.5])."""
    return frames.float() / 127.5 - 1.0


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantize(x):
    """Clamp to [-1, 1] and round to the 256 levels of a uint8 frame."""
    return to_float(to_uint8(x))


# ----------------------------------------------------------------------------------------------------
# Global world model f-> : DIAMOND (EDM denoiser with a UNet, ALGORITHMS.md §3)
# ----------------------------------------------------------------------------------------------------
class FourierFeatures(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("weight", torch.randn(1, dim // 2))

    def forward(self, x):  # (B,) -> (B, dim)
        f = 2 * math.pi * x[:, None] @ self.weight
        return torch.cat([f.cos(), f.sin()], -1)


class AdaGroupNorm(nn.Module):
    """GroupNorm (32 channels a group) whose scale and shift come from the conditioning vector."""

    def __init__(self, channels, cond):
        super().__init__()
        self.groups, self.linear = max(1, channels // 32), nn.Linear(cond, 2 * channels)

    def forward(self, x, cond):
        scale, shift = self.linear(cond)[:, :, None, None].chunk(2, 1)
        return F.group_norm(x, self.groups) * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, cin, cout, cond, attn=False):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.norm1, self.conv1 = AdaGroupNorm(cin, cond), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = AdaGroupNorm(cout, cond), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        self.attn = attn
        if attn:  # self-attention over the positions (DIAMOND's middle blocks)
            self.norm_attn, self.heads = nn.GroupNorm(max(1, cout // 32), cout), max(1, cout // 8)
            self.qkv, self.out = nn.Conv2d(cout, 3 * cout, 1), nn.Conv2d(cout, cout, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x, cond):
        h = self.conv1(F.silu(self.norm1(x, cond)))
        x = self.proj(x) + self.conv2(F.silu(self.norm2(h, cond)))
        if self.attn:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm_attn(x)).view(b, 3 * self.heads, c // self.heads, hh * ww).transpose(2, 3).chunk(3, 1)
            y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
            x = x + self.out(y)
        return x


class UNet(nn.Module):
    """DIAMOND's UNet: per level `depth` residual blocks, stride-2 conv down, nearest-neighbour up, skip
    connections from every block (and each level's input), two middle blocks with self-attention."""

    def __init__(self, cond, depths, channels):
        super().__init__()
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for i, (n, c) in enumerate(zip(depths, channels)):
            prev = channels[max(0, i - 1)]
            self.down.append(nn.ModuleList([ResBlock(prev if j == 0 else c, c, cond) for j in range(n)]))
            self.up.insert(0, nn.ModuleList([ResBlock(2 * c, c, cond) for _ in range(n)] + [ResBlock(c + prev, prev, cond)]))
        self.mid = nn.ModuleList([ResBlock(channels[-1], channels[-1], cond, attn=True) for _ in range(2)])
        self.downsample = nn.ModuleList([nn.Conv2d(c, c, 3, 2, 1) for c in channels[:-1]])
        self.upsample = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for c in reversed(channels[:-1])])

    def forward(self, x, cond):
        skips = []
        for i, blocks in enumerate(self.down):
            if i > 0:
                x = self.downsample[i - 1](x)
            skips.append(x)
            for block in blocks:
                x = block(x, cond)
                skips.append(x)
        for block in self.mid:
            x = block(x, cond)
        for i, blocks in enumerate(self.up):
            if i > 0:
                x = self.upsample[i - 1](F.interpolate(x, scale_factor=2.0, mode="nearest"))
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], 1), cond)
        return x


class Denoiser(nn.Module):
    """EDM denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise | past frames, past actions), offset noise."""

    sigma_data, sigma_offset = 0.5, 0.3
    train_sigma = dict(loc=-0.4, scale=1.2, min=2e-3, max=20.0)  # ln sigma ~ N(-0.4, 1.2) (Table 4), clipped
    sample_sigma = dict(min=2e-3, max=5.0, rho=7)  # Karras schedule of the sampler

    def __init__(self, action_dim, context, channels, depths, cond):
        super().__init__()
        self.context = context
        self.noise_emb = FourierFeatures(cond)
        self.act_emb = nn.Linear(context * action_dim, cond)  # continuous actions: Linear, not nn.Embedding
        self.cond_proj = nn.Sequential(nn.Linear(cond, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.conv_in = nn.Conv2d((context + 1) * 3, channels[0], 3, padding=1)  # past frames ⊕ noisy frame
        self.unet = UNet(cond, depths, channels)
        self.norm_out = nn.GroupNorm(max(1, channels[0] // 32), channels[0])
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def conditioners(self, sigma):
        """EDM pre-conditioning with offset noise: sigma' = sqrt(sigma^2 + sigma_offset^2)."""
        sigma = (sigma**2 + self.sigma_offset**2).sqrt()
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_noise = sigma.log() / 4
        return c_in, c_out, c_skip, c_noise

    def model_output(self, noisy, sigma, past_frames, past_actions):
        """F: noisy (B, 3, H, W), sigma (B,), past_frames (B, context, 3, H, W), past_actions (B, context, A)."""
        c_in, _, _, c_noise = self.conditioners(sigma)
        cond = self.cond_proj(self.noise_emb(c_noise) + self.act_emb(past_actions.flatten(1)))
        x = torch.cat([past_frames.flatten(1, 2) / self.sigma_data, c_in[:, None, None, None] * noisy], 1)
        x = self.unet(self.conv_in(x), cond)
        return self.conv_out(F.silu(self.norm_out(x)))

    def denoise(self, noisy, sigma, past_frames, past_actions):
        """D(x; sigma), clamped to [-1, 1] and quantised to 8 bits as DIAMOND does."""
        _, c_out, c_skip, _ = (c[:, None, None, None] for c in self.conditioners(sigma))
        return quantize(c_skip * noisy + c_out * self.model_output(noisy, sigma, past_frames, past_actions))

    def loss(self, frames, actions):
        """frames (B, context + 1 + ar_steps, 3, H, W) in [-1, 1], actions (B, same T, A) taken after each frame.
        Each later target is conditioned on the model's own (detached) one-step prediction of the previous one."""
        n, frames, total = self.context, frames.clone(), 0.0
        for i in range(frames.shape[1] - n):
            target = frames[:, n + i]
            b = len(target)
            s = self.train_sigma
            sigma = (torch.randn(b, device=target.device) * s["scale"] + s["loc"]).exp().clamp(s["min"], s["max"])
            offset = self.sigma_offset * torch.randn(b, 3, 1, 1, device=target.device)
            noisy = target + offset + sigma[:, None, None, None] * torch.randn_like(target)
            _, c_out, c_skip, _ = (c[:, None, None, None] for c in self.conditioners(sigma))
            out = self.model_output(noisy, sigma, frames[:, i:n + i], actions[:, i:n + i])
            total = total + F.mse_loss(out, (target - c_skip * noisy) / c_out)
            frames[:, n + i] = quantize(c_skip * noisy + c_out * out.detach())
        return total / (frames.shape[1] - n)

    def sigmas(self, steps, device=None):
        """Karras et al. schedule: steps noise levels from sigma_max down to sigma_min, then 0."""
        s = self.sample_sigma
        ramp = torch.linspace(0, 1, steps, device=device)
        inv = s["max"] ** (1 / s["rho"]) + ramp * (s["min"] ** (1 / s["rho"]) - s["max"] ** (1 / s["rho"]))
        return torch.cat([inv ** s["rho"], torch.zeros(1, device=device)])

    @torch.no_grad()
    def sample(self, past_frames, past_actions, steps, generator=None):
        """Next frame (B, 3, H, W) by deterministic Euler steps on the Karras schedule (no churn)."""
        b, _, c, h, w = past_frames.shape
        x = torch.randn(b, c, h, w, device=past_frames.device, generator=generator)  # unit noise, as DIAMOND
        sigmas = self.sigmas(steps, past_frames.device)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            denoised = self.denoise(x, sigma.expand(b), past_frames, past_actions)
            x = x + (x - denoised) / sigma * (next_sigma - sigma)  # Euler step of dx/dsigma = (x - D) / sigma
        return denoised  # = x: the last step (to sigma = 0) lands on D, a quantised frame


# ----------------------------------------------------------------------------------------------------
# Global reward model r: contrastive goal-conditioned energy (Rank2Reward, ALGORITHMS.md §4)
# ----------------------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """f_psi(s_t | s_start, s_goal): a shared CNN embeds the three frames, an MLP scores progress toward the goal.
    Trained so that later frames of a play segment score higher than earlier ones (Bradley-Terry loss)."""

    def __init__(self, img_size, width=32, embed=256, keypoints=0):
        super().__init__()
        chans, layers = [3, width, 2 * width, 4 * width, 8 * width], []
        for i, o in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(i, o, 4, 2, 1), nn.GroupNorm(1, o), nn.SiLU()]
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * width * (img_size // 16) ** 2, embed))
        self.keypoints = None
        if keypoints:  # as the RSSM's (rssm.ConvEncoder): where small objects are, which the strided CNN misses
            self.keypoints = keypoint_convs(3, keypoints)
            self.keypoint_proj = nn.Linear(2 * keypoints, embed)
        self.head = nn.Sequential(nn.Linear(4 * embed, 256), nn.SiLU(), nn.Linear(256, 1))
        self.img_size, self.embed_dim = img_size, embed
        self.register_buffer("mean", torch.zeros(()))  # statistics of the raw energy on play data, for rewards
        self.register_buffer("std", torch.ones(()))

    def embed(self, frames):  # float frames (..., 3, H, W) -> (..., E)
        flat = frames.flatten(0, -4)
        x = self.encoder(flat)
        if self.keypoints is not None:
            x = x + self.keypoint_proj(spatial_softmax(self.keypoints(flat)))
        return x.unflatten(0, frames.shape[:-3])

    def energy(self, e_t, e_start, e_goal):
        return self.head(torch.cat([e_t, e_start, e_goal, e_t - e_goal], -1)).squeeze(-1)

    def reward(self, e_t, e_start, e_goal):
        """The RL reward: the energy standardised with its play-data statistics."""
        return (self.energy(e_t, e_start, e_goal) - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------
# SAPO actor-critic (ALGORITHMS.md §2)
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


# ----------------------------------------------------------------------------------------------------
# Checkpoints, progress, errors
# ----------------------------------------------------------------------------------------------------
class RunError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


STAGE_FIELDS = {  # the Args fields a stage checkpoint must agree on
    "world_model": ["img_size", "wm_channels", "wm_depths", "wm_cond_channels", "wm_context"],
    "reward_model": ["img_size", "reward_keypoints"],
    "rssm": ["img_size", "rssm_size", "local_obs", "rssm_keypoints"],
    "agent": ["img_size", "rssm_size", "local_obs", "rssm_keypoints", "hidden"],
}


CLOCK = {"start": time.time(), "before": 0.0}  # this process's start; wall-clock of a resumed run's earlier processes


def wall_time():
    return CLOCK["before"] + time.time() - CLOCK["start"]


def save_checkpoint(path, kind, args, fields=None, **payload):
    """Atomic write (temporary file, then os.replace) of everything needed to use or continue a stage; `fields`
    (default STAGE_FIELDS[kind]) are the Args a later load must agree on."""
    config = {f: getattr(args, f) for f in (fields or STAGE_FIELDS[kind])}
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    tmp = f"{path}.tmp"
    torch.save({"kind": kind, "config": config, "rng": rng, **payload}, tmp)
    os.replace(tmp, path)
    with open(os.path.join(os.path.dirname(path), "wall_time_s.txt"), "w") as f:  # for --resume's eval.json
        f.write(f"{wall_time():.1f}")


def load_checkpoint(path, kind, args=None, restore_rng=False):
    """Load a checkpoint of `kind`; with `args`, refuse one whose config differs (without: adopt its config)."""
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


def check_finite(name, value, step, path):
    if not math.isfinite(value):
        raise RunError(f"non-finite {name} ({value}) at step {step}; the last good checkpoint is {path}")


class Progress:
    """Prints `[stage] step k/n (p%) metrics | rate | time left` about every 10 seconds."""

    def __init__(self, stage, total, start=0):
        self.stage, self.total, self.start, self.t0, self.last = stage, total, start, time.time(), 0.0

    def __call__(self, step, **metrics):
        now = time.time()
        if now - self.last < 10 and step + 1 < self.total:
            return
        self.last = now
        rate = (step + 1 - self.start) / max(now - self.t0, 1e-9)
        left = (self.total - step - 1) / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        later = len(STAGES["names"]) - STAGES["current"]  # the run's time left: this stage's is a lower bound
        run = f" (run: >= {duration(left)} + {later} stage{'s' * (later > 1)} not timed yet)" if later > 0 else ""
        print(f"[{self.stage}] step {step + 1}/{self.total} ({100 * (step + 1) / self.total:.0f}%) {shown} | "
              f"{rate:.2f} it/s | {duration(left)} left{run}", flush=True)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


STAGES = {"names": [], "current": 0}  # the run's stages in order, and which one runs (1-based)


def start_stage(name):
    """Print `stage k of n: NAME` and the run's wall-clock so far."""
    STAGES["current"] = STAGES["names"].index(name) + 1
    print(f"stage {STAGES['current']} of {len(STAGES['names'])}: {name} | {duration(wall_time())} into the run",
          flush=True)


# Ctrl-C. While the training stages run (armed), the first Ctrl-C asks them to stop at the end of the current step,
# where they save their checkpoint; a second Ctrl-C, or one outside them, stops at once. main() then prints the
# command that continues the run and exits with 130.
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
    """Flush TensorBoard and say, in one line, what a Ctrl-C kept and the command that continues the run."""
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


# ----------------------------------------------------------------------------------------------------
# Offline training of the global world model f-> and the global reward model r
# ----------------------------------------------------------------------------------------------------
def train_world_model(args, data, device, writer, run_dir):
    denoiser = Denoiser(2, args.wm_context, args.wm_channels, args.wm_depths, args.wm_cond_channels).to(device)
    path = args.wm_checkpoint or os.path.join(run_dir, "world_model.pt")
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.wm_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))  # 100-step warm-up
    step = 0
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "world_model", args, restore_rng=args.wm_checkpoint is None)
        denoiser.load_state_dict(ckpt["model"])
        if ckpt["done"] and ckpt["step"] >= args.wm_steps:
            print(f"world model: loaded {path} ({ckpt['step']} steps)")
            return denoiser
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step = ckpt["step"]
        print(f"world model: resuming {path} at step {step} of {args.wm_steps}")
        path = os.path.join(run_dir, "world_model.pt")  # never overwrite a --wm-checkpoint given to start from
    elif args.wm_checkpoint:
        raise RunError(f"{path}: no such world-model checkpoint")
    n = sum(p.numel() for p in denoiser.parameters())
    print(f"world model: training a {n / 1e6:.2f}M-parameter DIAMOND denoiser for {args.wm_steps} steps")
    length = args.wm_context + 1 + args.wm_ar_steps
    starts = window_starts(data, length)
    progress = Progress("world_model", args.wm_steps, step)
    save = lambda done: save_checkpoint(path, "world_model", args, model=denoiser.state_dict(), done=done,
                                        optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step)
    while step < args.wm_steps:
        loss = denoiser.loss(*sample_windows(data, starts, args.wm_batch_size, length))
        check_finite("world-model loss", loss.item(), step, path)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        sched.step()
        writer.add_scalar("world_model/loss", loss.item(), step)
        progress(step, loss=loss.item())
        step += 1
        if step % args.save_every == 0 or STOP["requested"]:
            save(False)
            stop_if_requested(f"the world model saved at step {step}")
    save(True)
    return denoiser


def train_reward_model(args, data, goal, device, writer, run_dir, videos=None):
    model = RewardModel(args.img_size, keypoints=args.reward_keypoints).to(device)
    path = args.reward_checkpoint or os.path.join(run_dir, "reward_model.pt")
    opt = torch.optim.Adam(model.parameters(), lr=args.reward_lr)
    step = 0
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "reward_model", args, restore_rng=args.reward_checkpoint is None)
        model.load_state_dict(ckpt["model"])
        if ckpt["done"] and ckpt["step"] >= args.reward_steps:
            print(f"reward model: loaded {path} ({ckpt['step']} steps)")
            return model
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        print(f"reward model: resuming {path} at step {step} of {args.reward_steps}")
        path = os.path.join(run_dir, "reward_model.pt")  # never overwrite a --reward-checkpoint given to start from
    elif args.reward_checkpoint:
        raise RunError(f"{path}: no such reward-model checkpoint")
    episodes = torch.unique(data["episode"]).cpu()
    held_out = held_out_episodes(data)
    train_eps = episodes[: len(episodes) - len(held_out)] if len(episodes) > 1 else episodes
    pool = {"obs": data["obs"], "episode": data["episode"]}  # what the ranking pairs are drawn from
    video_eps = torch.zeros(0, dtype=episodes.dtype)
    if videos is not None:  # goal videos become extra episodes, numbered after the play episodes
        pool = {"obs": torch.cat([data["obs"], videos["obs"]]),
                "episode": torch.cat([data["episode"], videos["episode"] + len(episodes)])}
        video_eps = torch.unique(videos["episode"]).cpu() + len(episodes)
    n_video = round(args.reward_video_fraction * args.reward_batch_size) if len(video_eps) else 0

    def batch(size, eps):
        """Pairs (earlier, later) from segments of the episodes `eps`, with the segments' first and last frames."""
        length = int(torch.randint(3, args.reward_max_segment + 1, ()))
        starts = window_starts(pool, length, eps)
        while len(starts) == 0:
            length //= 2
            starts = window_starts(pool, length, eps)
        s = starts[torch.randint(len(starts), (size,))]
        i, j = torch.randint(length, (2, size))
        j = torch.where(i == j, (j + 1) % length, j)
        lo, hi = torch.minimum(i, j), torch.maximum(i, j)
        idx = torch.stack([s, s + length - 1, s + lo, s + hi], 1).to(device)  # start, goal, earlier, later
        return to_float(pool["obs"][idx])

    def bradley_terry(frames):
        e = model.embed(frames)
        margin = model.energy(e[:, 3], e[:, 0], e[:, 1]) - model.energy(e[:, 2], e[:, 0], e[:, 1])
        return F.softplus(-margin).mean(), (margin > 0).float().mean()  # -log sigmoid(f(later) - f(earlier))

    def train_batch():  # play pairs, then goal-video pairs (the play data's own clock and the goal's disagree:
        # play drifts the T away from the centre over time, goal videos bring it to the target)
        frames = batch(args.reward_batch_size - n_video, train_eps)
        return torch.cat([frames, batch(n_video, video_eps)]) if n_video else frames

    print(f"reward model: training for {args.reward_steps} steps; pairs per batch: "
          f"{args.reward_batch_size - n_video} from {len(train_eps)} play episodes, {n_video} from "
          f"{len(video_eps)} goal videos ({len(held_out)} play episodes held out)")
    progress = Progress("reward_model", args.reward_steps, step)
    save = lambda done: save_checkpoint(path, "reward_model", args, model=model.state_dict(), done=done,
                                        optimizer=opt.state_dict(), step=step)
    while step < args.reward_steps:
        loss, acc = bradley_terry(train_batch())
        check_finite("reward-model loss", loss.item(), step, path)
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("reward_model/loss", loss.item(), step)
        writer.add_scalar("reward_model/train_accuracy", acc.item(), step)
        progress(step, loss=loss.item(), accuracy=acc.item())
        step += 1
        if step % args.save_every == 0 or STOP["requested"]:
            save(False)
            stop_if_requested(f"the reward model saved at step {step}")
    model.eval()
    with torch.no_grad():
        _, acc = bradley_terry(batch(1024, held_out))
        # standardise the energy on play frames, measured from a start up to 32 frames earlier
        starts = window_starts(data, 32, train_eps)
        s = starts[torch.randint(len(starts), (2048,))]
        t = s + torch.randint(32, (2048,))
        goal_e = model.embed(goal[None])
        e_t, e_s = (model.embed(to_float(data["obs"][i.to(device)])) for i in (t, s))
        energy = model.energy(e_t, e_s, goal_e.expand_as(e_t))
        model.mean.copy_(energy.mean())
        model.std.copy_(energy.std().clamp(min=1e-6))
    print(f"reward model: held-out ranking accuracy {acc.item():.3f}")
    if acc.item() < 0.6:
        print("reward model: warning: it ranks held-out play hardly better than chance (0.5); a policy trained on "
              "it is unlikely to learn (more --reward-steps, or another --seed)")
    writer.add_scalar("reward_model/heldout_accuracy", acc.item(), step)
    if data["state"] is not None:
        corr = task_reward_correlation(model, data, goal, held_out, device, args.env_id)
        print(f"reward model: correlation of the goal-image reward with the task's true reward on held-out play {corr:.3f}")
        writer.add_scalar("reward_model/task_reward_correlation", corr, step)
    save(True)
    return model


def load_reward_model(path, device="cpu"):
    """A trained r from its checkpoint, built with the image size and keypoints it was trained with."""
    ckpt = load_checkpoint(path, "reward_model")
    model = RewardModel(ckpt["config"]["img_size"], keypoints=ckpt["config"].get("reward_keypoints", 0))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False)


def held_out_episodes(data):
    """The last 10 % of play episodes: the reward model's held-out test, never trained on."""
    episodes = torch.unique(data["episode"]).cpu()
    return episodes[-max(1, len(episodes) // 10):]


@torch.no_grad()
def goal_rewards(model, data, goal, episodes, device):
    """r(s_t | s_0, goal image) on every frame of the given play episodes (s_0: the episode's first frame), and
    the simulator states of those frames."""
    first = data["is_first"].cpu().numpy()
    idx = np.flatnonzero(torch.isin(data["episode"].cpu(), episodes).numpy())
    starts = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))[idx]
    e_t = model.embed(to_float(data["obs"][torch.as_tensor(idx, device=device)]))
    e_s = model.embed(to_float(data["obs"][torch.as_tensor(starts, device=device)]))
    return model.reward(e_t, e_s, model.embed(goal[None]).expand_as(e_t)).cpu().numpy(), data["state"][idx]


def task_reward_correlation(model, data, goal, episodes, device, env_id):
    """Pearson correlation of r(s_t | s_0, goal image) with the simulator's task reward (Push-T: coverage / 0.95,
    reach: -distance / 100) over the given episodes."""
    rewards, states = goal_rewards(model, data, goal, episodes, device)
    true = envs.task_rewards(env_id, states)
    return float(np.corrcoef(rewards, true)[0, 1]) if true.std() > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------
# Offline pretraining of the local model f<- (RSSM) and its fine-tuning replay
# ----------------------------------------------------------------------------------------------------
def median_frame(data):
    """The play data's median frame: Push-T's background under its fixed camera (float, [-1, 1])."""
    return to_float(data["obs"][:2000]).median(0).values


def foreground_mask(frames, background):
    """(..., 1, H, W) True where a frame differs from the background: the tool and the T."""
    return (frames - background).abs().sum(-3, keepdim=True) > 0.3


def rssm_input(rssm, obs):
    """What the RSSM encodes and reconstructs: half of a float frame in [-1, 1] (DreamerV3's [-0.5, 0.5]), or a
    state vector as it is."""
    return obs / 2 if rssm.image else obs


def rssm_train_step(rssm, opt, obs, actions, is_first, rewards, background=None, fg_weight=1.0):
    """One DreamerV3 world-model step on (B, T) observations (float frames in [-1, 1], or states); actions[:, t]
    led into frame t. With fg_weight > 1 the reconstruction error on the pixels that differ from `background`
    counts fg_weight times (results/dmo_sapo_diamond.md: Why the RSSM's reconstruction is weighted)."""
    post, prior = rssm.observe(rssm.encode(rssm_input(rssm, obs)), actions, is_first)
    weight = None
    if fg_weight != 1.0 and rssm.image:
        weight = 1.0 + (fg_weight - 1.0) * foreground_mask(obs, background).float()
    loss, parts = rssm.loss(post, prior, rssm_input(rssm, obs), rewards, torch.ones_like(rewards), pixel_weight=weight)
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(rssm.parameters(), 1000.0)
    opt.step()
    return {k: v.item() for k, v in parts.items()}


def local_obs(data, idx):
    """The local model's observations of play frames `idx`: float frames in [-1, 1], or (--local-obs state) the
    recorded states as envs.state_observation."""
    return to_float(data["obs"][idx]) if data.get("local") is None else data["local"][idx]


def rssm_sequences(data, idx):
    """Play windows (B, T) of frame indices -> the RSSM's observations, the actions that led into them, is_first."""
    frames = local_obs(data, idx)
    actions = torch.cat([torch.zeros_like(data["action"][idx[:, :1]]), data["action"][idx[:, :-1]]], 1)
    is_first = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    is_first[:, 0] = True
    return frames, actions, is_first


@torch.no_grad()
def foreground_error(rssm, data, idx, background):
    """Reconstruction MSE of the RSSM's posterior on the pixels of fixed play windows that differ from the
    play data's median frame `background` (the tool and the T under Push-T's fixed camera), and the median
    frame's own error there. While the two are close, the policy's features hold little of the objects (README)."""
    frames, actions, is_first = rssm_sequences(data, idx)
    post, _ = rssm.observe(rssm.encode(rssm_input(rssm, frames)), actions, is_first)
    recon = rssm.decode(rssm.feat(post)) * 2
    fg = foreground_mask(frames, background).expand_as(frames)
    return ((recon - frames) ** 2)[fg].mean().item(), ((background - frames) ** 2)[fg].mean().item()


def make_rssm(args, data):
    """The local model: an RSSM of frames (img_size), or of the recorded states (--local-obs state)."""
    shape = (3, args.img_size, args.img_size) if args.local_obs == "frames" else (data["local"].shape[1],)
    cfg = RSSMConfig.preset(args.rssm_size, obs_shape=shape, action_dim=2, keypoints=args.rssm_keypoints,
                            recon_scale=args.rssm_recon_scale if args.local_obs == "frames" else 1.0)
    return RSSM(cfg)


def pretrain_rssm(args, data, reward_model, goal_e, device, writer, run_dir):
    rssm = make_rssm(args, data).to(device)
    opt = torch.optim.Adam(rssm.parameters(), lr=args.rssm_lr, eps=1e-8)
    path = args.rssm_checkpoint or os.path.join(run_dir, "rssm.pt")
    step = 0
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "rssm", args, restore_rng=args.rssm_checkpoint is None)
        rssm.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt["done"] and (args.rssm_checkpoint or ckpt["step"] >= args.rssm_pretrain_steps):
            print(f"RSSM: loaded {path}")
            return rssm, opt
        step = ckpt["step"]  # interrupted, or this run's own asked to train longer (--rssm-pretrain-steps)
    elif args.rssm_checkpoint:
        raise RunError(f"{path}: no such RSSM checkpoint")
    print(f"RSSM: pretraining ({args.rssm_size}) on the play data for {args.rssm_pretrain_steps} steps")
    T = args.rssm_seq_len
    starts = window_starts(data, T)
    progress = Progress("rssm", args.rssm_pretrain_steps, step)
    save = lambda done: save_checkpoint(path, "rssm", args, model=rssm.state_dict(), optimizer=opt.state_dict(),
                                        step=step, done=done)
    probe = starts[torch.randperm(len(starts), generator=torch.Generator().manual_seed(0))[:32]]
    probe = (probe[:, None] + torch.arange(T)).to(device)
    background = median_frame(data)
    if reward_model is not None:  # r embeds each frame on its own: embed the play data once, not every step
        with torch.no_grad():
            play_e = torch.cat([reward_model.embed(to_float(chunk)) for chunk in data["obs"].split(1024)])

    def log_foreground():  # forked RNG: the diagnostic leaves the run's random stream as it was
        if not rssm.image:
            return 0.0, 1.0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            fg, bg = foreground_error(rssm, data, probe, background)
        writer.add_scalar("rssm/foreground_mse", fg, step)
        print(f"RSSM: step {step}, reconstruction MSE on the tool and the T {fg:.3f} (the background alone: {bg:.3f})")
        return fg, bg

    while step < args.rssm_pretrain_steps:
        if step % 500 == 0:
            log_foreground()
        idx = (starts[torch.randint(len(starts), (args.rssm_batch_size,))][:, None] + torch.arange(T)).to(device)
        frames, actions, is_first = rssm_sequences(data, idx)
        if reward_model is None:  # the oracle: the task reward of each frame's recorded state
            rewards = data["reward"][idx]
        else:
            with torch.no_grad():  # rewards from the global reward model, s_start = the sequence's first frame
                e = play_e[idx]
                rewards = reward_model.reward(e, e[:, :1].expand_as(e), goal_e.expand_as(e))
        parts = rssm_train_step(rssm, opt, frames, actions, is_first, rewards, background, args.rssm_fg_weight)
        check_finite("RSSM loss", parts["loss"], step, path)
        for k, v in parts.items():
            writer.add_scalar(f"rssm/{k}", v, step)
        progress(step, loss=parts["loss"], recon=parts["recon"], reward=parts["reward"])
        step += 1
        if step % args.save_every == 0 or STOP["requested"]:
            save(False)
            stop_if_requested(f"the RSSM saved at step {step}")
    save(True)
    if data["state"] is not None:  # the gate needs the simulator states of the play data
        print_gate(action_gradient_gate(args, data, rssm), writer, step)
    fg, bg = log_foreground()
    if fg > 0.8 * bg:
        print("RSSM: warning: its reconstruction of the tool and the T is hardly better than the background's; "
              "the policy will not see them (results/dmo_sapo_diamond.md: Why the RSSM's reconstruction is weighted)")
    return rssm, opt


GATE_COSINE = 0.5  # the local model's action gradient is worth following when its mean cosine with the true one is above


def action_gradient_gate(args, data, rssm, n=256, eps=0.05, seed=0):
    """DMO's premise, measured (ALGORITHMS.md §1): from n play states (the RSSM filters the window before each),
    with random actions a, the local model's gradient g = d R_phi(l') / d a through `decoupled_step` (the value l'
    from the simulator's next frame, reset to the recorded state) against the true gradient of the task reward
    d r(s') / d a by central differences of the simulator. Returns the mean cosine, the share of states where g has
    a positive projection on the true gradient, the median size ratio |g| / |g_true|, the cosine by quartile of the
    distance to the target, and how many states had a true gradient (Push-T's is zero until the tool meets the T)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        starts = window_starts(data, args.wm_context)
        first = starts[torch.randint(len(starts), (n,))]
        actions = (torch.rand(n, 2) * 1.6 - 0.8).to(data["obs"].device)
        _, _, state = play_context(data, rssm, first.to(data["obs"].device), args.wm_context)
        sim = gym.make(args.env_id, obs_size=args.img_size).unwrapped
        frames, true_grad, distance = [], [], []
        for t, a in zip((first + args.wm_context - 1).tolist(), actions.cpu().numpy().astype(np.float64)):
            distance.append(sim.reset(options={"state": data["state"][t]})[1]["distance"])
            frame = sim.step(a)[0]
            frames.append(frame if rssm.image else envs.state_observation(sim.state))
            true_grad.append([(reward_after(sim, data["state"][t], a + e) - reward_after(sim, data["state"][t], a - e))
                              / (2 * eps) for e in np.eye(2) * eps])
        obs = torch.as_tensor(np.stack(frames), device=actions.device)
        obs = to_float(obs.permute(0, 3, 1, 2)) if rssm.image else obs
        actions.requires_grad_(True)
        with torch.no_grad():
            embed = rssm.encode(rssm_input(rssm, obs))
        next_state = rssm.decoupled_step(state, actions, embed)
        g = torch.autograd.grad(rssm.reward(rssm.feat(next_state)).sum(), actions)[0].cpu()
    true_grad, distance = torch.tensor(true_grad, dtype=torch.float32), torch.tensor(distance)
    ok = true_grad.norm(dim=1) > 1e-6
    g, true_grad, distance = g[ok], true_grad[ok], distance[ok]
    cos = F.cosine_similarity(g, true_grad, dim=1, eps=1e-12)
    quartiles = distance.quantile(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
    by_distance = [(lo, hi, cos[(distance >= lo) & (distance <= hi)].mean().item())
                   for lo, hi in zip(quartiles[:-1], quartiles[1:])]
    return {"cosine": cos.mean().item(), "positive": (cos > 0).float().mean().item(),
            "size_ratio": (g.norm(dim=1) / true_grad.norm(dim=1)).median().item(), "by_distance": by_distance,
            "states": int(ok.sum())}


def reward_after(sim, state, action):
    """The simulator's reward for one step from `state`."""
    sim.reset(options={"state": state})
    return sim.step(action)[1]


def print_gate(gate, writer=None, step=0, label="RSSM"):
    if gate["states"] < 16:
        print(f"{label}: action-gradient gate: the true reward has a gradient at only {gate['states']} of the states")
        return
    verdict = "passes" if gate["cosine"] >= GATE_COSINE else f"FAILS (needs a mean cosine of {GATE_COSINE})"
    bins = ", ".join(f"{lo:.0f}-{hi:.0f} px: {c:+.2f}" for lo, hi, c in gate["by_distance"])
    print(f"{label}: action-gradient gate {verdict}: cosine with the true reward gradient {gate['cosine']:+.3f} "
          f"(positive at {gate['positive']:.0%} of {gate['states']} states; by distance to the target {bins}), "
          f"size {gate['size_ratio']:.2f}x the true one")
    if writer is not None:
        for k in ("cosine", "positive", "size_ratio"):
            writer.add_scalar(f"rssm/gate_{k}", gate[k], step)


class Replay:
    """FIFO of global-model trajectories (chunks of horizon + 1 observations: uint8 frames, or float states) on which
    the RSSM is fine-tuned."""

    def __init__(self, frames_capacity, horizon, obs_shape, dtype=torch.uint8):
        self.size = max(1, frames_capacity // (horizon + 1))
        self.frames = torch.zeros(self.size, horizon + 1, *obs_shape, dtype=dtype)
        self.actions = torch.zeros(self.size, horizon + 1, 2)
        self.rewards = torch.zeros(self.size, horizon + 1)
        self.ptr, self.full = 0, False

    def add(self, frames, actions, rewards):  # (B, H + 1, ...) each
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
        obs = self.frames[idx].to(device)
        return (to_float(obs) if obs.dtype == torch.uint8 else obs, self.actions[idx].to(device), is_first.to(device),
                self.rewards[idx].to(device))


# ----------------------------------------------------------------------------------------------------
# Imagined rollouts in the global model
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def play_context(data, rssm, first, n, sample=True):
    """The n-frame play windows that start at indices `first` (B,): float frames (B, n, 3, S, S), the n - 1 actions
    between them, and the RSSM state filtered over them (the posterior at the last frame)."""
    idx = first[:, None] + torch.arange(n, device=first.device)
    frames, actions = to_float(data["obs"][idx]), data["action"][idx]
    is_first = torch.zeros(idx.shape, dtype=torch.bool, device=first.device)
    is_first[:, 0] = True
    into = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)
    post, _ = rssm.observe(rssm.encode(rssm_input(rssm, local_obs(data, idx))), into, is_first, sample=sample)
    return frames, actions[:, :-1], {k: v[:, -1] for k, v in post.items()}


class Rollouts:
    """The num_envs rollouts of DMO-SAPO. Each starts from a `context`-frame window of play data (the RSSM
    filters the window), continues across horizons, and restarts after `episode_length` steps. `forward` is the
    global model f-> (DIAMOND, or the simulator reset to the window's recorded state) with the reward r."""

    def __init__(self, args, data, rssm, reward_model, goal_e, device, denoiser=None):
        self.args, self.data, self.rssm, self.reward_model, self.goal_e = args, data, rssm, reward_model, goal_e
        self.denoiser = denoiser
        self.starts = window_starts(data, args.wm_context)
        B, n, S = args.num_envs, args.wm_context, args.img_size
        self.sims = [gym.make(args.env_id, obs_size=S).unwrapped for _ in range(B)] if args.forward_model == "sim" else None
        self.frames = torch.zeros(B, n, 3, S, S, device=device)  # the denoiser's past frames
        self.obs = torch.zeros(B, *rssm.cfg.obs_shape, device=device)  # what the local model sees of the last one
        self.actions = torch.zeros(B, n - 1, 2, device=device)  # and the actions taken after all but the last
        self.state = {k: v.detach().clone() for k, v in rssm.initial(B).items()}
        self.start_e = torch.zeros(B, reward_model.embed_dim if reward_model else 1, device=device)
        self.reward = torch.zeros(B, device=device)  # r of the current frame
        self.t = torch.zeros(B, dtype=torch.long, device=device)
        self.reset(torch.ones(B, dtype=torch.bool, device=device))

    @torch.no_grad()
    def reset(self, mask):
        first = self.starts[torch.randint(len(self.starts), (int(mask.sum()),))].to(mask.device)
        frames, actions, state = play_context(self.data, self.rssm, first, self.args.wm_context)
        for k in self.state:
            self.state[k][mask] = state[k]
        self.frames[mask], self.actions[mask] = frames, actions
        last = first + self.args.wm_context - 1
        self.obs[mask] = local_obs(self.data, last)
        if self.sims is not None:  # the oracle: the simulator in the state recorded with the window's last frame
            for i, t in zip(torch.nonzero(mask).squeeze(1).tolist(), last.tolist()):
                self.sims[i].reset(options={"state": self.data["state"][t]})
        if self.reward_model is None:
            self.reward[mask] = self.data["reward"][last]
        else:
            e = self.reward_model.embed(frames[:, -1])
            self.start_e[mask] = e
            self.reward[mask] = self.reward_model.reward(e, e, self.goal_e.expand_as(e))
        self.t[mask] = 0

    def restart_finished(self):
        done = self.t >= self.args.episode_length
        if done.any():
            self.reset(done)

    @torch.no_grad()
    def forward(self, action):
        """o_{h+1} = f->(o_h, a_h) for every rollout and r_h = r(o_{h+1}), both without gradient. Returns the frame,
        what the local model observes of it (the frame, or with --local-obs state the simulator's state) and r."""
        if self.sims is not None:
            steps = [sim.step(a) for sim, a in zip(self.sims, action.cpu().numpy())]
            frame = to_float(torch.as_tensor(np.stack([o for o, *_ in steps]), device=action.device).permute(0, 3, 1, 2))
            true_r = torch.tensor([r for _, r, *_ in steps], dtype=torch.float32, device=action.device)
        else:
            past_actions = torch.cat([self.actions, action[:, None]], 1)
            frame = self.denoiser.sample(self.frames, past_actions, self.args.wm_denoising_steps)
        obs = frame
        if self.args.local_obs == "state":
            obs = torch.as_tensor(envs.state_observation(np.stack([sim.state for sim in self.sims])), device=frame.device)
        return frame, obs, (true_r if self.reward_model is None else self.score(frame))

    def score(self, frame):
        """The global reward model's r(o | s_start, s_goal) of frames (B, 3, S, S)."""
        return self.reward_model.reward(self.reward_model.embed(frame), self.start_e, self.goal_e.expand_as(self.start_e))

    def push(self, frame, obs, action):  # slide the context window by one generated frame
        self.obs = obs
        self.frames = torch.cat([self.frames[:, 1:], frame[:, None]], 1)
        self.actions = torch.cat([self.actions[:, 1:], action[:, None]], 1)
        self.t += 1


# ----------------------------------------------------------------------------------------------------
# Zero-shot deployment in the simulator
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(args, rssm, actor, episodes, seed, device, record=0, keep=0, steps=None, sample=False):
    """Run the policy (RSSM filter on real frames with sampled latents as in training, mean action; sampled actions
    with `sample`) for `episodes` episodes on seeds seed, seed+1, ..., each until it ends or for at most `steps`
    steps. Its random numbers come from its own stream seeded with `seed`: the training's stream is untouched.
    Returns metrics, the top-down frames of the first `record` episodes, and the first `keep` model-size frames
    (episodes, keep, 3, S, S) and actions of every episode (actions[:, t] is taken after frames[:, t]) with a mask
    of the steps before the episode ended (an episode that succeeds ends; its later kept frames repeat its last)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return run_episodes(args, rssm, actor, episodes, seed, device, record, keep, steps, sample)


def log_eval(writer, metrics, step):
    for k in ("success_rate", "mean_coverage", "mean_return", "mean_final_distance", "contact_fraction"):
        if k in metrics:
            writer.add_scalar(f"eval/{k}", metrics[k], step)


def eval_line(metrics):
    """success, the object's (reach: the tool's) final distance to its target, Push-T's coverage and tool contact."""
    line = f"success {metrics['success_rate']:.2f}, final distance {metrics['mean_final_distance']:.0f} px"
    if "mean_coverage" in metrics:
        line += f", coverage {metrics['mean_coverage']:.3f}, tool on the object {metrics['contact_fraction']:.2f}"
    return line


def run_episodes(args, rssm, actor, episodes, seed, device, record, keep, steps, sample):
    sims = [gym.make(args.env_id, obs_size=args.img_size) for _ in range(episodes)]
    obs = [sim.reset(seed=seed + i)[0] for i, sim in enumerate(sims)]
    state, action = rssm.initial(episodes), torch.zeros(episodes, 2, device=device)
    is_first = torch.ones(episodes, dtype=torch.bool, device=device)
    alive, returns = [True] * episodes, np.zeros(episodes)
    coverage, success = np.zeros(episodes), np.zeros(episodes, bool)
    distance, contact_steps, length = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes)
    videos = [[sims[i].unwrapped.render()] for i in range(min(record, episodes))]
    kept_frames, kept_actions, kept_alive = [], [], []
    while any(alive):
        frames = to_float(torch.as_tensor(np.stack(obs), device=device).permute(0, 3, 1, 2))
        seen = frames if rssm.image else torch.as_tensor(  # --local-obs state: the simulator's state
            envs.state_observation(np.stack([sim.unwrapped.state for sim in sims])), device=device)
        state, _ = rssm.obs_step(state, action, rssm.encode(rssm_input(rssm, seen)), is_first)
        action, _ = actor(rssm.feat(state), deterministic=not sample)
        is_first[:] = False
        if len(kept_frames) < keep:
            kept_frames.append(frames)
            kept_actions.append(action)
            kept_alive.append(torch.tensor(alive))
        for i, sim in enumerate(sims):
            if not alive[i]:
                continue
            obs[i], reward, terminated, truncated, info = sim.step(action[i].cpu().numpy())
            returns[i] += reward
            coverage[i], success[i] = info.get("coverage", 0.0), info["is_success"]
            distance[i] = info["distance"]
            contact_steps[i] += info["contact"]
            length[i] += 1
            alive[i] = not (terminated or truncated or length[i] == steps)
            if i < len(videos):
                videos[i].append(sim.unwrapped.render())
    metrics = {"episodes": episodes, "successes": int(success.sum()), "success_rate": float(success.mean()),
               "mean_return": float(returns.mean()), "mean_final_distance": float(distance.mean()),
               "contact_fraction": float((contact_steps / length).mean())}
    if args.env_id != "PushTReach-v0":
        metrics["mean_coverage"] = float(coverage.mean())
    trajectory = (torch.stack(kept_frames, 1), torch.stack(kept_actions, 1), torch.stack(kept_alive, 1)) if keep else None
    return metrics, videos, trajectory


@torch.no_grad()
def exploitation_check(args, denoiser, reward_model, goal_e, frames, actions):
    """Does the policy exploit the global world model? Replay the actions it took in the simulator open loop in
    DIAMOND from the same first wm_context frames and score the real and the dreamed frames with r (s_start =
    the last context frame, s_goal = the goal image, as in imagination). A policy that learned the task raises
    r on both; one that learned a flaw of DIAMOND raises it on the dreamed frames only.
    Returns r (episodes, T - wm_context) on the real and on the dreamed frames, and the dreamed frames."""
    n = args.wm_context
    past, past_actions, dreamed = frames[:, :n], actions[:, :n], []
    for t in range(n, frames.shape[1]):
        frame = denoiser.sample(past, past_actions, args.wm_denoising_steps)
        dreamed.append(frame)
        past = torch.cat([past[:, 1:], frame[:, None]], 1)
        past_actions = torch.cat([past_actions[:, 1:], actions[:, t, None]], 1)
    dreamed = torch.stack(dreamed, 1)
    e_start = reward_model.embed(frames[:, n - 1])

    def reward(x):  # (E, T, 3, S, S) -> (E, T)
        e = reward_model.embed(x)
        return reward_model.reward(e, e_start[:, None].expand_as(e), goal_e.expand_as(e))

    return reward(frames[:, n:]), reward(dreamed), dreamed


def first_last(r):
    """Per episode, the mean r of the first and of the last 4 steps of an exploitation check."""
    return r[:, :4].mean(1), r[:, -4:].mean(1)


def real_vs_dreamed_image(frames, dreamed, context):
    """(3, H, W): for each episode a row of real frames above a row of dreamed ones, every 4th step."""
    pairs = [torch.cat([torch.cat(list(real[context::4]), -1), torch.cat(list(dream[::4]), -1)], -2)
             for real, dream in zip(frames, dreamed)]
    return torch.cat(pairs, -2)


@torch.no_grad()
def imagined_vs_real(args, data, denoiser, rssm, steps=16, windows=32):
    """Fig. 6a: from real context windows, follow the recorded actions with DIAMOND and with the RSSM prior.
    Returns the first window's frames (steps, S, 3 S, 3) uint8 [real | DIAMOND | RSSM] and the per-model mean
    squared errors over all windows (one window alone is a noisy estimate)."""
    n, device = args.wm_context, data["obs"].device
    starts = window_starts(data, n + steps)
    idx = (starts[torch.randint(len(starts), (windows,))][:, None] + torch.arange(n + steps)).to(device)
    real, actions = to_float(data["obs"][idx]), data["action"][idx]
    past, past_actions, dreamed = real[:, :n], actions[:, :n], []
    for t in range(steps):
        frame = denoiser.sample(past, past_actions, args.wm_denoising_steps)
        dreamed.append(frame)
        past = torch.cat([past[:, 1:], frame[:, None]], 1)
        past_actions = torch.cat([past_actions[:, 1:], actions[:, n + t, None]], 1)
    dreamed = torch.stack(dreamed, 1)
    into = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)
    is_first = torch.zeros(idx.shape, dtype=torch.bool, device=device)
    is_first[:, 0] = True
    post, _ = rssm.observe(rssm.encode(real[:, :n] / 2), into[:, :n], is_first[:, :n])
    state, latent = {k: v[:, -1] for k, v in post.items()}, []
    for t in range(steps):
        state = rssm.img_step(state, into[:, n + t], sample=False)
        latent.append((2 * rssm.decode(rssm.feat(state))).clamp(-1, 1))
    latent = torch.stack(latent, 1)
    target = real[:, n:]
    errors = {"diamond": (dreamed - target).pow(2).mean().item(), "rssm": (latent - target).pow(2).mean().item()}
    video = torch.cat([target, dreamed, latent], -1)[0]  # (steps, 3, S, 3 S)
    return to_uint8(video).permute(0, 2, 3, 1).cpu().numpy(), errors


# ----------------------------------------------------------------------------------------------------
# Exploit patching (seed 000 §3): deploy the exploiting policy, fine-tune the global model on its data
# ----------------------------------------------------------------------------------------------------
PATCH_SEED = 2_000_000  # first simulator seed of the patch episodes


def episodes_to_data(frames, actions, alive):
    """Kept episodes of `evaluate` (E, T, 3, S, S) in [-1, 1] -> play-data tensors of their frames before each ended."""
    is_first = torch.zeros_like(alive)
    is_first[:, 0] = True
    keep = alive.flatten().to(frames.device)
    data = {"obs": to_uint8(frames.flatten(0, 1)[keep]), "action": actions.flatten(0, 1)[keep],
            "is_first": is_first.flatten().to(frames.device)[keep]}
    data["episode"], data["state"] = torch.cumsum(data["is_first"].long(), 0) - 1, None
    return data


@torch.no_grad()
def probe_loss(denoiser, data, starts, length, n=256, seed=0):
    """DIAMOND's training loss on the first n windows of `starts`, with fixed noise: comparable before and after."""
    idx = starts[:n].to(data["obs"].device)[:, None] + torch.arange(length, device=data["obs"].device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return denoiser.loss(to_float(data["obs"][idx]), data["action"][idx]).item()


def patch_world_model(args, denoiser, data, patch, rssm, actor, patches, device, writer, global_step, run_dir):
    """Patch number `patches`: run the policy in the simulator (the robot) with sampled actions, as in imagination,
    for patch_episodes x patch_steps steps, add the frames to the patch data, and fine-tune DIAMOND on them and the
    play data. A policy that learned a flaw of DIAMOND steers into it, so its own frames are where DIAMOND is wrong.
    Returns the patch data so far; saves it (patch_data.npz) and the patched model (world_model_patched.pt)."""
    seed = PATCH_SEED + (patches - 1) * args.patch_episodes
    metrics, _, (frames, actions, alive) = evaluate(args, rssm, actor, args.patch_episodes, seed, device,
                                                    keep=args.patch_steps, steps=args.patch_steps, sample=True)
    new = episodes_to_data(frames, actions, alive)
    patch = new if patch is None else concat_data(patch, new)
    length = args.wm_context + 1 + args.wm_ar_steps
    play_starts, patch_starts = window_starts(data, length), window_starts(patch, length)
    new_starts = patch_starts[patch_starts >= len(patch["obs"]) - len(new["obs"])]
    before = probe_loss(denoiser, patch, new_starts, length), probe_loss(denoiser, data, play_starts, length)

    denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.wm_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    half = args.wm_batch_size // 2
    progress = Progress(f"patch {patches}", args.patch_wm_steps)
    for step in range(args.patch_wm_steps):
        (f1, a1), (f2, a2) = (sample_windows(d, st, n, length) for d, st, n in
                              [(patch, patch_starts, half), (data, play_starts, args.wm_batch_size - half)])
        loss = denoiser.loss(torch.cat([f1, f2]), torch.cat([a1, a2]))
        check_finite("world-model patch loss", loss.item(), step, os.path.join(run_dir, "agent.pt"))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        sched.step()
        progress(step, loss=loss.item())
    denoiser.eval().requires_grad_(False)

    after = probe_loss(denoiser, patch, new_starts, length), probe_loss(denoiser, data, play_starts, length)
    for k, v in {"final_distance": metrics["mean_final_distance"], "contact_fraction": metrics["contact_fraction"],
                 "frames": len(patch["obs"]), "wm_loss_before": before[0], "wm_loss_after": after[0],
                 "play_loss_before": before[1], "play_loss_after": after[1]}.items():
        writer.add_scalar(f"patch/{k}", v, global_step)
    print(f"[patch {patches}] {len(new['obs'])} simulator frames of the policy ({eval_line(metrics)}); DIAMOND's loss on them {before[0]:.4f} -> {after[0]:.4f}, "
          f"on play data {before[1]:.4f} -> {after[1]:.4f}")
    envs.save_dataset(os.path.join(run_dir, "patch_data.npz"), {
        "obs": patch["obs"].permute(0, 2, 3, 1).cpu().numpy(), "action": patch["action"].cpu().numpy(),
        "is_first": patch["is_first"].cpu().numpy(), "env_id": np.array(args.env_id),
        "control_hz": np.array(envs.CONTROL_HZ), "format_version": np.array(envs.FORMAT_VERSION)})
    save_checkpoint(os.path.join(run_dir, "world_model_patched.pt"), "world_model", args, model=denoiser.state_dict(),
                    done=True, patches=patches)
    return patch


# ----------------------------------------------------------------------------------------------------
# Algorithm 1: DMO-SAPO with global and local world models
# ----------------------------------------------------------------------------------------------------
def scaled_entropy(entropy, target):
    """The entropy bonus of SAPO as its authors compute it (mineral's `offset_by_target_entropy` and
    `scale_by_target_entropy`): (H - target) / (2 |target|), 0 at the target. Scaling by the target keeps the bonus
    of a target like Table 4's -6 from swamping the reward (unscaled, at epoch 0 its gradient on the actor was 150x
    the reward path's, and the deployed policy a constant); the temperature's loss is multiplied back by |target|."""
    return (entropy - target) / (2 * abs(target))


def imagine_horizon(args, actor, critic, rssm, rollouts, alpha):
    """One horizon of Algorithm 1's inner loop for all rollouts. Returns eq. (1)'s three terms per rollout (the
    rewards', the entropy bonus' and the bootstrap's, differentiable w.r.t. the actor through the RSSM only) and
    the detached trajectory for the critic and the replay."""
    B, H = args.num_envs, args.horizon
    state = rollouts.state
    reward_term, entropy_term = 0.0, 0.0
    feats, soft_rewards, rewards, entropies = [], [], [], []
    store = to_uint8 if rssm.image else (lambda obs: obs)  # the replay holds uint8 frames, or states
    chunk = ([store(rollouts.obs)], [torch.zeros(B, 2, device=state["deter"].device)], [rollouts.reward])
    for h in range(H):
        feat = rssm.feat(state)  # l_h
        action, log_prob = actor(feat)  # a_h = pi(l_h)
        if args.forward_model == "rssm":  # "No Diffusion": the RSSM generates the trajectory too (backprop through it)
            next_state = rssm.img_step(state, action)
            with torch.no_grad():
                next_frame = next_obs = quantize(2 * rssm.decode(rssm.feat(next_state)))
                r = rollouts.score(next_frame)
        else:
            next_frame, next_obs, r = rollouts.forward(action.detach())  # o_{h+1} = f->(o_h, a_h), r_h = r(o_{h+1})
            with torch.no_grad():
                embed = rssm.encode(rssm_input(rssm, next_obs))
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
        for buf, x in zip(chunk, (store(next_obs), action.detach(), r)):
            buf.append(x)
        rollouts.push(next_frame, next_obs, action.detach())
        state = next_state
    last_feat = rssm.feat(state)
    bootstrap_term = args.gamma**H * critic.value(last_feat)  # eq. (1): bootstrap gamma^H V(s_H)
    # rollouts continue from here at the next epoch, with the graph cut
    rollouts.state, rollouts.reward = {k: v.detach() for k, v in state.items()}, r
    traj = {"feats": torch.stack(feats), "soft_rewards": torch.stack(soft_rewards), "rewards": torch.stack(rewards),
            "entropies": torch.stack(entropies), "last_feat": last_feat.detach(),
            "chunk": tuple(torch.stack(buf, 1) for buf in chunk)}
    return (reward_term, entropy_term, bootstrap_term), traj


def dmo_sapo(args, data, denoiser, reward_model, goal_e, rssm, rssm_opt, device, writer, run_dir):
    """The `for epoch` loop of Algorithm 1. Returns the actor and the number of world-model samples it used."""
    B, H = args.num_envs, args.horizon
    actor = Actor(rssm.feat_dim, 2, args.hidden).to(device)
    critic = Critic(rssm.feat_dim, args.hidden).to(device)
    log_alpha = torch.tensor(math.log(args.init_alpha), device=device, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr, betas=args.betas)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, betas=args.betas)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr)
    decay = lambda epoch: 1.0 - epoch / max(args.epochs, 1)
    actor_sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, decay)
    critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, decay)
    path, start_epoch = os.path.join(run_dir, "agent.pt"), 0
    if os.path.exists(path):
        ckpt = load_checkpoint(path, "agent", args, restore_rng=True)
        for module, key in [(actor, "actor"), (critic, "critic"), (rssm, "rssm"), (actor_opt, "actor_opt"),
                            (critic_opt, "critic_opt"), (alpha_opt, "alpha_opt"), (rssm_opt, "rssm_opt"),
                            (actor_sched, "actor_sched"), (critic_sched, "critic_sched")]:
            module.load_state_dict(ckpt[key])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
        start_epoch = ckpt["epoch"]
        print(f"DMO-SAPO: resuming {path} at epoch {start_epoch} (the replay buffer starts empty)")
    patch, patches, patched_path = None, 0, os.path.join(run_dir, "world_model_patched.pt")
    if os.path.exists(patched_path):  # a resumed run that patched DIAMOND: go on with the patched model and data
        ckpt = load_checkpoint(patched_path, "world_model", args)
        denoiser.load_state_dict(ckpt["model"])
        patches = ckpt["patches"]
        patch_path = os.path.join(run_dir, "patch_data.npz")
        patch = frames_to_tensors(envs.load_dataset(patch_path), patch_path, args.img_size, device)
        print(f"DMO-SAPO: DIAMOND as patched {patches} times, {len(patch['obs'])} patch frames ({patched_path})")

    def save_agent(epoch):
        save_checkpoint(path, "agent", args, actor=actor.state_dict(), critic=critic.state_dict(),
                        rssm=rssm.state_dict(), log_alpha=log_alpha.detach().cpu(), actor_opt=actor_opt.state_dict(),
                        critic_opt=critic_opt.state_dict(), alpha_opt=alpha_opt.state_dict(),
                        rssm_opt=rssm_opt.state_dict(), actor_sched=actor_sched.state_dict(),
                        critic_sched=critic_sched.state_dict(), epoch=epoch, global_step=epoch * B * H)

    finetune = not args.no_rssm_finetune and args.forward_model != "rssm"
    background = median_frame(data) if finetune else None  # for the fine-tuning's foreground weight
    obs_shape, dtype = (rssm.cfg.obs_shape, torch.uint8) if rssm.image else (rssm.cfg.obs_shape, torch.float32)
    replay = Replay(min(args.replay_size, args.epochs * B * (H + 1)), H, obs_shape, dtype) if finetune else None
    rollouts = Rollouts(args, data, rssm, reward_model, goal_e, device, denoiser)
    progress = Progress("dmo_sapo", args.epochs, start_epoch)
    print(f"DMO-SAPO: {args.epochs} epochs of {B} rollouts x {H} steps in the {args.forward_model} forward model")
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        # Backward model learning: fine-tune the RSSM on the global model's trajectories
        if finetune and len(replay) > 0:
            for _ in range(args.rssm_finetune_steps):
                parts = rssm_train_step(rssm, rssm_opt, *replay.sample(args.rssm_batch_size, device),
                                        background, args.rssm_fg_weight)
            check_finite("RSSM fine-tuning loss", parts["loss"], epoch, path)
            for k, v in parts.items():
                writer.add_scalar(f"rssm/finetune_{k}", v, epoch * B * H)
        rollouts.restart_finished()  # new starts are filtered by the RSSM the policy is trained through

        # Actor and critic learning: one horizon in the global model, gradients through the local model
        alpha = log_alpha.exp().detach()
        terms, traj = imagine_horizon(args, actor, critic, rssm, rollouts, alpha)
        actor_loss = -sum(terms).mean() / H  # eq. (1), negated and divided by H
        log_now = epoch == start_epoch or (epoch + 1) % 10 == 0
        if log_now:  # the size of each term's gradient on the actor (reward path, entropy, bootstrap)
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
            metrics, _, _ = evaluate(args, rssm, actor, args.eval_quick_episodes, args.eval_seed, device)
            log_eval(writer, metrics, global_step)
            print(f"[eval] epoch {epoch + 1}: {eval_line(metrics)}")
        # Exploit patching: the policy on the robot, DIAMOND fine-tuned on what it saw. The epoch's checkpoint comes
        # after it, so a run killed while patching patches again when resumed; one that patched skips it.
        patch_now = args.patch_every and (epoch + 1) % args.patch_every == 0 and epoch + 1 < args.epochs \
            and (epoch + 1) // args.patch_every > patches
        if patch_now:
            patches += 1
            patch = patch_world_model(args, denoiser, data, patch, rssm, actor, patches, device, writer, global_step,
                                      run_dir)
        if args.save_model and (quick_eval or patch_now or STOP["requested"]):
            save_agent(epoch + 1)
        stop_if_requested(f"DMO-SAPO saved at epoch {epoch + 1}" if args.save_model else
                          f"DMO-SAPO stopped at epoch {epoch + 1}, not saved: --no-save-model")
    if args.save_model:
        save_agent(args.epochs)
    return actor, args.epochs * B * H, 0 if patch is None else len(patch["obs"])


def parse_args(argv=None):
    """Preset values, then the command line on top; with --resume, the run's saved args instead of a preset."""
    argv = sys.argv[1:] if argv is None else argv
    flag = lambda name: next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                              if a == name or a.startswith(name + "=")), None)
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
        saved.setdefault("reward_keypoints", 0)  # a run from before the flag: its r has no keypoints
        defaults = Args(**{k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    elif preset in PRESETS:
        defaults = Args(**{**dataclasses.asdict(Args()), **PRESETS[preset], "preset": preset})
    else:
        defaults = Args()  # tyro reports the invalid choice
    args = tyro.cli(Args, default=defaults, args=argv, description=presets_help(__doc__, PRESETS))
    for name in ("save_every", "play_steps", "img_size", "wm_context", "wm_denoising_steps", "wm_batch_size",
                 "reward_batch_size", "reward_max_segment", "rssm_batch_size", "rssm_seq_len", "epochs", "num_envs",
                 "horizon", "episode_length", "critic_epochs", "critic_minibatch", "eval_episodes", "eval_quick_episodes"):
        if getattr(args, name) < 1:
            raise RunError(f"{name} ({getattr(args, name)}) must be at least 1")
    for name in ("wm_steps", "reward_steps", "rssm_pretrain_steps", "rssm_finetune_steps", "eval_every", "patch_every",
                 "exploit_check_episodes", "reward_goal_videos", "wm_ar_steps", "seed", "eval_seed"):
        if getattr(args, name) < 0:
            raise RunError(f"{name} ({getattr(args, name)}) must not be negative")
    for name in ("wm_lr", "reward_lr", "rssm_lr", "actor_lr", "critic_lr", "alpha_lr", "init_alpha"):
        if not getattr(args, name) > 0:
            raise RunError(f"{name} ({getattr(args, name)}) must be positive")
    if args.horizon < 1 or args.episode_length % args.horizon:
        raise RunError(f"episode_length ({args.episode_length}) must be a multiple of horizon ({args.horizon})")
    if args.img_size % 16:
        raise RunError(f"img_size ({args.img_size}) must be a multiple of 16")
    if not 0 <= args.reward_video_fraction <= 1:
        raise RunError(f"reward_video_fraction ({args.reward_video_fraction}) must be in [0, 1]")
    if args.exploit_check_episodes > 0 and args.exploit_check_steps < args.wm_context + 4:
        raise RunError(f"exploit_check_steps ({args.exploit_check_steps}) must be at least wm_context + 4 "
                       f"({args.wm_context + 4})")
    if args.local_obs == "state" and args.forward_model != "sim":
        raise RunError("--local-obs state reads the simulator's state: it needs --forward-model sim")
    if args.reward_source == "true" and args.forward_model != "sim":
        raise RunError("--reward-source true scores the simulator's states: it needs --forward-model sim")
    if args.patch_every and args.forward_model != "diamond":
        raise RunError("--patch-every patches DIAMOND: it needs --forward-model diamond")
    if args.patch_every and args.patch_steps < args.wm_context + 1 + args.wm_ar_steps:
        raise RunError(f"patch_steps ({args.patch_steps}) must be at least wm_context + 1 + wm_ar_steps "
                       f"({args.wm_context + 1 + args.wm_ar_steps}): DIAMOND trains on windows of that length")
    return args


STAGE_STEPS = {"world_model": "wm_steps", "reward_model": "reward_steps", "rssm": "rssm_pretrain_steps",
               "agent": "epochs"}  # the stages that train, and the flag of their length
STAGE_NAMES = {"world_model": "the world model", "reward_model": "the reward model", "rssm": "the RSSM",
               "agent": "DMO-SAPO"}


def training_stages(args):
    """The stages this run trains (the oracle's simulator and true reward stand in for DIAMOND and r)."""
    return [k for k in STAGE_STEPS if (k != "world_model" or args.forward_model != "sim")
            and (k != "reward_model" or args.reward_source == "model")]


def stage_checkpoints(args, run_dir=None):
    """Load the stage checkpoints a run starts from (given by a flag, or in the run directory of --resume) and refuse
    one of another configuration before anything is written. Returns {kind: (step, finished)} of those found (the
    agent's step is its epoch)."""
    found = {}
    given = {"world_model": args.wm_checkpoint, "reward_model": args.reward_checkpoint,
             "rssm": args.rssm_checkpoint, "agent": None}
    for kind, checkpoint in given.items():
        path = checkpoint or (run_dir and os.path.join(run_dir, f"{kind}.pt"))
        if checkpoint or (path and os.path.exists(path)):
            ckpt = load_checkpoint(path, kind, args)
            step = ckpt["epoch"] if kind == "agent" else ckpt["step"]
            target = getattr(args, STAGE_STEPS[kind])
            found[kind] = (step, ckpt.get("done", True) and (step >= target or (kind == "rssm" and bool(checkpoint))))
    return found


def resume_point(args, run_dir, found):
    """Where a resumed run continues, as a line to print, and the TensorBoard purge step: the events the interrupted
    process logged from there on are dropped. The stages share x-axes that start at 0 and a purge drops every tag, so
    it never reaches below what a finished stage logged (an unfinished stage's curve may then overlap itself, after
    a kill; a Ctrl-C saves where it stopped logging)."""
    kinds = training_stages(args)
    finished = [k for k in kinds if found.get(k, (0, False))[1]]
    todo = next((k for k in kinds if k not in finished), None)
    samples = args.num_envs * args.horizon  # DMO-SAPO logs against world-model samples
    logged = [found[k][0] * (samples if k == "agent" else 1) + 1 for k in finished]
    if not found:
        return f"resuming {run_dir}: no checkpoint yet, nothing to continue: the run starts from its first stage", 0
    if todo is None:
        return (f"resuming {run_dir}: every stage is finished, nothing to continue: the agent is evaluated again",
                max(logged))
    step = found.get(todo, (0, False))[0]
    line = (f"resuming {run_dir}: {', '.join(STAGE_NAMES[k] for k in finished) or 'no stage'} finished; continues "
            f"{STAGE_NAMES[todo]} at {'epoch' if todo == 'agent' else 'step'} {step} of "
            f"{getattr(args, STAGE_STEPS[todo])}")
    return line, max([step * samples + 1 if todo == "agent" else step] + logged)


def run(args):
    found = stage_checkpoints(args, args.resume)  # a flag the checkpoints refuse fails before anything is written
    if args.resume:
        run_dir = STOP["run_dir"] = args.resume
        args.run_name = os.path.basename(os.path.normpath(run_dir))
        with open(os.path.join(run_dir, "args.json")) as f:
            trained_steps = json.load(f)["rssm_pretrain_steps"]
        if args.rssm_pretrain_steps > trained_steps and os.path.exists(os.path.join(run_dir, "agent.pt")):
            raise RunError(f"{run_dir}/agent.pt was trained on the RSSM of {trained_steps} steps: to train the RSSM "
                           f"longer, resume a copy of the run without agent.pt")
        if os.path.exists(os.path.join(run_dir, "world_model_patched.pt")):
            load_checkpoint(os.path.join(run_dir, "world_model_patched.pt"), "world_model", args)
        if os.path.exists(os.path.join(run_dir, "wall_time_s.txt")):
            with open(os.path.join(run_dir, "wall_time_s.txt")) as f:
                CLOCK["before"] = float(f.read())
        line, purge_step = resume_point(args, run_dir, found)
        print(line)
    else:
        args.run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir, purge_step = os.path.join(args.runs_dir, args.run_name), 0
    stages = {"data": "play data", "world_model": "world model (DIAMOND)", "reward_model": "reward model r",
              "rssm": "RSSM pretraining", "agent": "DMO-SAPO", "eval": "evaluation in the simulator"}
    kinds = ["data", *training_stages(args), "eval"]
    STAGES["names"] = [stages[k] for k in kinds[: kinds.index(args.stop_after) + 1 if args.stop_after else None]]
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    start_stage(stages["data"])  # data first: a file it refuses leaves no run directory behind
    data = load_play_data(args, device)
    if args.forward_model == "sim" or args.reward_source == "true":
        if data["state"] is None:
            raise RunError(f"{play_data_path(args)}: the oracle (--forward-model sim, --reward-source true) needs the "
                           f"simulator states of the play data (key 'state'), and this file has none")
        # the task reward of arriving in each frame, for the RSSM's reward head
        data["reward"] = torch.as_tensor(envs.task_rewards(args.env_id, data["state"])).to(device)
    if args.local_obs == "state":
        data["local"] = torch.as_tensor(envs.state_observation(data["state"]), device=device)
    goal = to_float(torch.as_tensor(envs.goal_image(args.env_id, args.img_size), device=device).permute(2, 0, 1))
    goal_videos = None
    if args.reward_source == "model" and args.stop_after != "world_model" and (args.reward_goal_videos > 0
                                                                             or args.reward_video_path):
        goal_videos = load_goal_videos(args, device)

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "stop_after")}, f, indent=1)
    writer = STOP["writer"] = SummaryWriter(run_dir, purge_step=purge_step)
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    STOP["run_dir"], STOP["armed"] = run_dir, True  # Ctrl-C from here on: the stages stop and save (request_stop)
    print(f"run directory {run_dir} ({device})")

    def stopped_after(stage):
        writer.close()
        print(f"stopped after {STAGE_NAMES[stage]} (--stop-after {stage}); continue with: python "
              f"{os.path.basename(__file__)} --resume {shlex.quote(run_dir)}")

    # Offline training of the diamond diffusion world model f-> and global reward world model r (the oracle's
    # simulator and true reward stand in for them)
    denoiser = None
    if args.forward_model != "sim":
        start_stage(stages["world_model"])
        denoiser = train_world_model(args, data, device, writer, run_dir).eval().requires_grad_(False)
    if args.stop_after == "world_model":
        return stopped_after("world_model")
    reward_model, goal_e = None, None
    if args.reward_source == "model":
        start_stage(stages["reward_model"])
        reward_model = train_reward_model(args, data, goal, device, writer, run_dir, goal_videos)
        reward_model = reward_model.eval().requires_grad_(False)
        goal_e = reward_model.embed(goal[None])
    if args.stop_after == "reward_model":
        return stopped_after("reward_model")

    # Offline pretraining of the local dreamerV3 world model f<- (including its reward head R_phi)
    start_stage(stages["rssm"])
    rssm, rssm_opt = pretrain_rssm(args, data, reward_model, goal_e, device, writer, run_dir)
    if args.stop_after == "rssm":
        return stopped_after("rssm")
    if args.capture_video and denoiser is not None:
        video, errors = imagined_vs_real(args, data, denoiser, rssm)
        envs.write_video(os.path.join(run_dir, "imagined_vs_real_pretrained.mp4"), video)
        writer.add_image("world_model/imagined_vs_real", np.concatenate(list(video[::2]), 0), 0, dataformats="HWC")
        print(f"open-loop error over 16 steps (MSE in [-1, 1]): DIAMOND {errors['diamond']:.4f}, RSSM {errors['rssm']:.4f}")
        writer.add_scalar("world_model/open_loop_mse", errors["diamond"], 0)
        writer.add_scalar("rssm/open_loop_mse", errors["rssm"], 0)

    start_stage(stages["agent"])
    actor, global_step, patch_frames = dmo_sapo(args, data, denoiser, reward_model, goal_e, rssm, rssm_opt, device,
                                                writer, run_dir)

    # Zero-shot deployment in the simulator
    STOP["armed"] = False  # every checkpoint is saved: a Ctrl-C from here on stops at once
    start_stage(stages["eval"])
    print(f"evaluating {args.eval_episodes} episodes in {args.env_id}")
    keep = args.exploit_check_steps if args.exploit_check_episodes > 0 and denoiser and reward_model else 0
    metrics, videos, trajectory = evaluate(args, rssm, actor, args.eval_episodes, args.eval_seed, device,
                                           record=3 if args.capture_video else 0, keep=keep)
    for i, video in enumerate(videos):
        envs.write_video(os.path.join(run_dir, f"eval_episode_{i}.mp4"), video, scale=1)
    if trajectory is not None:
        (frames, actions, _), k = trajectory, args.exploit_check_episodes
        r_real, r_dream, dreamed = exploitation_check(args, denoiser, reward_model, goal_e, frames[:k], actions[:k])
        (a, b), (c, d) = ([x.mean().item() for x in first_last(r)] for r in (r_real, r_dream))
        metrics["world_model_check"] = {"episodes": len(r_real), "steps": frames.shape[1],
                                        "real_reward_first_last": [a, b], "dreamed_reward_first_last": [c, d]}
        print(f"the policy's actions replayed in DIAMOND: r on real frames {a:.2f} -> {b:.2f}, on dreamed frames "
              f"{c:.2f} -> {d:.2f} (first -> last 4 of {frames.shape[1] - args.wm_context} steps, {len(r_real)} episodes)")
        if d - b > 0.2:
            print("warning: the dreamed frames score higher than the real ones: the policy may exploit DIAMOND's "
                  "errors (results/dmo_sapo_diamond.md: The policy exploits the global world model)")
        if args.capture_video:
            image = real_vs_dreamed_image(frames[:k], dreamed, args.wm_context)
            writer.add_image("eval/real_vs_dreamed", to_uint8(image).cpu().numpy(), global_step)
    if args.capture_video and denoiser is not None:
        video, errors = imagined_vs_real(args, data, denoiser, rssm)
        envs.write_video(os.path.join(run_dir, "imagined_vs_real_final.mp4"), video)
        writer.add_scalar("rssm/open_loop_mse", errors["rssm"], global_step)
    result = {"env_id": args.env_id, **metrics, "global_step": global_step, "wall_time_s": wall_time()}
    if args.patch_every:
        result["patch_frames"] = patch_frames  # simulator frames of the patches, on top of the play data
    log_eval(writer, metrics, global_step)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    writer.close()
    print(json.dumps(result))
    print_summary(result, run_dir, [f"eval_episode_{i}.mp4" for i in range(len(videos))]
                  + ["imagined_vs_real_final.mp4"] * (args.capture_video and denoiser is not None))
    return result


def print_summary(result, run_dir, videos):
    """After eval.json's line: the result in words and where the run's outputs are."""
    print(f"done in {duration(result['wall_time_s'])}: {result['successes']} of {result['episodes']} evaluation "
          f"episodes succeeded ({eval_line(result)})")
    print_outputs(run_dir, videos)


def print_outputs(run_dir, videos):
    print(f"  results      {os.path.join(run_dir, 'eval.json')}")
    for i, video in enumerate(videos):
        print(f"  {'videos' if i == 0 else '':13}{os.path.join(run_dir, video)}")
    print(f"  TensorBoard  tensorboard --logdir {shlex.quote(run_dir)}")


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
