"""PPO on images, the zeroth-order baseline of seed 000 ("Coupled Local and Global World Models for Efficient First
Order RL", §4.2, Table 1, Table 4, Fig. 5 and 8): CleanRL-style PPO with a CNN + MLP actor-critic on a stack of 4
frames, trained either inside the same global world model and reward as DMO or directly in the simulator with the
true reward, then evaluated zero-shot like DMO. Two global world models plug in:
  - Push-T (DIAMOND and the reward model r, the checkpoints dmo_sapo_diamond.py saves), evaluated in PushT-v0;
  - Push-Cube (DreamerV4's tokenizer and dynamics, whose reward head gives r; dmo_sapo_dreamerv4.py's checkpoints),
    evaluated in EgoPushCube-v0 with Table 1's metrics.

    python dmo_sapo_diamond.py --seed 1 --stop-after reward_model       # the global world model and reward model
    python ppo_baseline.py --seed 1 --env world-model \\
        --wm-checkpoint runs/RUN/world_model.pt --reward-checkpoint runs/RUN/reward_model.pt
    python ppo_baseline.py --seed 1 --env sim                            # model-free reference with the true reward
    python dmo_sapo_dreamerv4.py --seed 1 --stop-after dynamics          # DreamerV4 on Push-Cube (its near start)
    python ppo_baseline.py --seed 1 --env-id EgoPushCube-v0 --wm-checkpoint runs/RUN/dynamics.pt \\
        --tok-checkpoint runs/RUN/tokenizer.pt --episode-length 32 --num-steps 32 --total-timesteps 76800
    python ppo_baseline.py --seed 1 --preset paper ...                   # Table 4 sizes (on a GPU)
"""

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

import dmo_sapo_diamond as dmo  # the global world model, reward model, play-data windows and checkpoint helpers
import dmo_sapo_dreamerv4 as dv4  # the Push-Cube world model (tokenizer, dynamics, reward head) and evaluation
import envs


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
    """write videos of evaluation episodes to the run directory"""
    save_model: bool = True
    """write the agent checkpoint to the run directory"""
    runs_dir: str = "runs"
    """where run directories are created"""
    resume: Optional[str] = None
    """a run directory to continue from its agent.pt (its environments start new episodes)"""
    save_every: int = 50
    """iterations between checkpoints (and one at the end); Ctrl-C saves one too"""

    # Environment
    env: Literal["world-model", "sim"] = "world-model"
    """where PPO collects experience: inside the global world model, or in the simulator (true reward)"""
    env_id: Literal["PushT-v0", "PushTReach-v0", "PushTPuck-v0", "EgoPushCube-v0"] = "PushTReach-v0"
    """the task (a rung of the Push-T ladder, or Push-Cube, envs.py): the simulator of --env sim and of the evaluation;
    the world model of --env world-model must be of the same task (dmo_sapo_diamond.py's default is also the reach
    rung); EgoPushCube-v0 trains in dmo_sapo_dreamerv4.py's world model only"""
    start: Literal["full", "near"] = "near"
    """EgoPushCube-v0: where its play data and evaluation episodes start (as dmo_sapo_dreamerv4.py --start)"""
    img_size: int = 32
    """frame resolution in --env sim (--env world-model uses its checkpoint's; the paper: 64)"""
    frame_stack: int = 4
    """frames the policy sees"""
    wm_checkpoint: Optional[str] = None
    """--env world-model: the world model (world_model.pt of dmo_sapo_diamond.py; for EgoPushCube-v0 the dynamics
    with its reward head, dynamics.pt of dmo_sapo_dreamerv4.py)"""
    reward_checkpoint: Optional[str] = None
    """--env world-model: the reward model (reward_model.pt of dmo_sapo_diamond.py; not for EgoPushCube-v0)"""
    tok_checkpoint: Optional[str] = None
    """--env world-model, EgoPushCube-v0: the tokenizer (tokenizer.pt of dmo_sapo_dreamerv4.py)"""
    wm_denoising_steps: Optional[int] = None
    """denoising steps per generated frame (default: the paper's, 3 for DIAMOND's Euler sampler, 4 for DreamerV4)"""
    init_context: int = 32
    """EgoPushCube-v0: real frames that pre-fill DreamerV4's cache before each imagined episode (A.4: 32)"""
    data_dir: str = "data"
    """--env world-model: episodes start from play data at {data_dir}/{env_id}_play_{play_steps}.npz (collected when
    missing)"""
    data_path: Optional[str] = None
    """--env world-model: any play-data file of the format in README; overrides data_dir"""
    play_steps: int = 30_000
    """frames of play to collect when no file exists"""
    episode_length: int = 64
    """--env world-model: imagined episodes are truncated after this many steps (as DMO's rollouts)"""

    # PPO (Table 4)
    total_timesteps: int = 384_000
    """environment (or world-model) steps of experience"""
    num_envs: int = 32
    """parallel actors (Table 4: 256)"""
    num_steps: int = 64
    """steps per actor per rollout, the horizon (Table 4: 64; 128 for Push-Cube)"""
    minibatch_size: int = 512
    """samples per gradient step (Table 4: 4096)"""
    update_epochs: int = 4
    """epochs over each rollout batch (Table 4: 4)"""
    learning_rate: float = 5e-4
    """Adam learning rate, linearly decayed to 0 (Table 4: 5e-4)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """ratio clip of the surrogate objective, also the value clip"""
    ent_coef: float = 0.01
    """entropy bonus (Table 4: 0.01)"""
    vf_coef: float = 0.5
    """value-loss weight"""
    max_grad_norm: float = 0.5
    """gradient-norm clip (Table 4: 0.5)"""

    # Actor-critic
    cnn_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """channels of the stride-2 convolutions"""
    hidden: list[int] = field(default_factory=lambda: [256])
    """MLP sizes after the CNN"""

    # Evaluation in the simulator
    eval_episodes: int = 50
    """final zero-shot evaluation episodes"""
    eval_every: int = 25
    """iterations between quick evaluations in the simulator during training, logged as eval/* against samples as
    dmo_sapo_diamond.py logs its own (0: never)"""
    eval_quick_episodes: int = 10
    """episodes of a quick evaluation"""
    eval_seed: int = 1_000_000
    """first evaluation seed (as dmo_sapo_diamond.py)"""
    eval_max_steps: int = 200
    """EgoPushCube-v0: an evaluation episode ends after this many steps (as dmo_sapo_dreamerv4.py)"""

    # filled in at runtime
    run_name: str = ""
    """the run directory's name"""


PRESETS = {
    "tiny": dict(total_timesteps=64, num_envs=4, num_steps=8, minibatch_size=16, update_epochs=2, episode_length=8,
                 play_steps=1200, cnn_channels=[8, 8], hidden=[32], eval_episodes=2, eval_every=1,
                 eval_quick_episodes=2),
    "default": dict(),  # the field defaults above: 5x DMO's default budget (76,800 samples) on a 2-core CPU
    "paper": dict(env_id="PushT-v0", img_size=64, total_timesteps=40_000_000, num_envs=256, num_steps=64, minibatch_size=4096,
                  episode_length=128, eval_episodes=100, eval_every=100),
}

AGENT_FIELDS = ["env", "env_id", "img_size", "frame_stack", "cnn_channels", "hidden"]  # what a resumed checkpoint must match


# ----------------------------------------------------------------------------------------------------
# Environments: the global world model, or the simulator. Both batched; obs are uint8 (B, frame_stack, 3, S, S)
# ----------------------------------------------------------------------------------------------------
class DiamondWorld:
    """The adapter boundary: what PPO needs from a global world model, here read from dmo_sapo_diamond.py's
    checkpoints. Another world model (DreamerV4) plugs in by providing the same img_size, context, next_frame
    and reward."""

    def __init__(self, args, device):
        wm = dmo.load_checkpoint(args.wm_checkpoint, "world_model")  # adopt its image size and architecture
        c = wm["config"]
        self.img_size, self.context, self.steps = c["img_size"], c["wm_context"], args.wm_denoising_steps or 3
        self.denoiser = dmo.Denoiser(2, c["wm_context"], c["wm_channels"], c["wm_depths"], c["wm_cond_channels"])
        self.denoiser.load_state_dict(wm["model"])
        self.reward_model = dmo.load_reward_model(args.reward_checkpoint, device)
        if self.reward_model.img_size != self.img_size:
            raise dmo.RunError(f"{args.reward_checkpoint}: r was trained on {self.reward_model.img_size}x"
                               f"{self.reward_model.img_size} frames, the world model on {self.img_size}")
        self.denoiser.to(device).eval().requires_grad_(False)
        goal = torch.as_tensor(envs.goal_image(args.env_id, self.img_size), device=device).permute(2, 0, 1)
        self.goal_e = self.reward_model.embed(dmo.to_float(goal)[None])  # s_goal

    @torch.no_grad()
    def next_frame(self, frames, actions):
        """frames (B, context, 3, S, S) in [-1, 1], actions (B, context, A) taken after each -> (B, 3, S, S)."""
        return self.denoiser.sample(frames, actions, self.steps)

    @torch.no_grad()
    def reward(self, frames, start_frames):
        """r(s_t | s_start, s_goal), standardised on play data: (B, 3, S, S) each -> (B,)."""
        e_t, e_s = self.reward_model.embed(frames), self.reward_model.embed(start_frames)
        return self.reward_model.reward(e_t, e_s, self.goal_e.expand_as(e_t))


class WorldModelEnv:
    """num_envs imagined episodes. Each starts from a `context`-frame window of play data (s_start = its last
    frame, as DMO's rollouts), is rewarded by the reward model for every generated frame, and is truncated after
    episode_length steps."""

    action_dim = 2

    def __init__(self, args, world, data, device):
        self.args, self.world, self.data = args, world, data
        self.starts = dmo.window_starts(data, world.context)
        B, n, S = args.num_envs, world.context, world.img_size
        self.frames = torch.zeros(B, n, 3, S, S, device=device)  # the world model's past frames
        self.actions = torch.zeros(B, n - 1, 2, device=device)  # and the actions taken after all but the last
        self.start = torch.zeros(B, 3, S, S, device=device)
        self.t = torch.zeros(B, dtype=torch.long, device=device)
        self.episode_return = torch.zeros(B, device=device)
        self.finished = []  # returns of finished episodes, for logging
        self.reset(torch.ones(B, dtype=torch.bool, device=device))

    def reset(self, mask):
        n = self.world.context
        idx = (self.starts[torch.randint(len(self.starts), (int(mask.sum()),))][:, None] + torch.arange(n)).to(mask.device)
        frames = dmo.to_float(self.data["obs"][idx])
        self.frames[mask], self.actions[mask] = frames, self.data["action"][idx][:, :-1]
        self.start[mask], self.t[mask], self.episode_return[mask] = frames[:, -1], 0, 0.0

    @property
    def obs(self):
        return dmo.to_uint8(self.frames[:, -self.args.frame_stack:])

    def step(self, action):
        """-> next obs (reset where an episode ended), reward, terminated, truncated, last obs of ended episodes."""
        next_frame = self.world.next_frame(self.frames, torch.cat([self.actions, action[:, None]], 1))
        reward = self.world.reward(next_frame, self.start)
        self.frames = torch.cat([self.frames[:, 1:], next_frame[:, None]], 1)
        self.actions = torch.cat([self.actions[:, 1:], action[:, None]], 1)
        self.t += 1
        self.episode_return += reward
        final_obs, truncated = self.obs, self.t >= self.args.episode_length
        if truncated.any():
            self.finished += [{"return": r} for r in self.episode_return[truncated].tolist()]
            self.reset(truncated)
        return self.obs, reward, torch.zeros_like(truncated), truncated, final_obs


class DreamerV4World:
    """The same boundary for Push-Cube, read from dmo_sapo_dreamerv4.py's checkpoints: the tokenizer, and the dynamics
    whose reward head's expected reward is r. Its time attention keeps a KV cache, so its episodes start together."""

    def __init__(self, args, device):
        tok, dyn = dv4.load_checkpoint(args.tok_checkpoint, "tokenizer"), dv4.load_checkpoint(args.wm_checkpoint, "dynamics")
        for f in ("tok_latents", "tok_bottleneck"):
            if tok["config"][f] != dyn["config"][f]:
                raise dmo.RunError(f"{args.wm_checkpoint}: the dynamics has {f}={dyn['config'][f]}, the tokenizer "
                                   f"{args.tok_checkpoint} {f}={tok['config'][f]}: not one run's world model")
        # the architecture from the checkpoints, sampling as dmo_sapo_dreamerv4.py's defaults (4 steps, A.4's cache)
        self.cfg = dv4.Args(**tok["config"], **{f: v for f, v in dyn["config"].items() if f not in tok["config"]})
        self.cfg.dyn_sampling_steps = args.wm_denoising_steps or self.cfg.dyn_sampling_steps
        if self.cfg.dyn_sampling_steps & (self.cfg.dyn_sampling_steps - 1):  # step sizes live on a grid of 1/2^k
            raise dmo.RunError(f"wm_denoising_steps ({self.cfg.dyn_sampling_steps}) must be a power of 2 for DreamerV4")
        self.img_size, self.context = self.cfg.img_size, args.init_context
        if args.init_context + args.episode_length > self.cfg.dyn_max_context:
            raise dmo.RunError(f"init_context + episode_length ({args.init_context} + {args.episode_length}) exceeds "
                               f"the frames the dynamics attends to ({self.cfg.dyn_max_context})")
        self.tok, self.dyn = dv4.make_tokenizer(self.cfg).to(device), dv4.make_dynamics(self.cfg).to(device)
        self.tok.load_state_dict(tok["model"])
        self.dyn.load_state_dict(dyn["model"])
        self.tok.eval().requires_grad_(False)
        self.dyn.eval().requires_grad_(False)

    @torch.no_grad()
    def start(self, frames, actions):
        """A new cache holding frames (B, L, 3, S, S) and the actions (B, L, A) taken after each."""
        self.cache = dv4.KVCache(self.cfg.dyn_layers, self.cfg.dyn_max_context)
        dv4.observe(self.dyn, self.cache, self.tok.encode(frames), dv4.actions_into(actions), self.cfg.dyn_context_noise)

    @torch.no_grad()
    def next_frame_and_reward(self, action):
        """The frame after the cached ones for the action taken after the last (B, A): a frame as a camera gives it
        (256 levels), and the reward head's expected reward of arriving there (B,). The frame joins the cache."""
        z, logits = dv4.generate(self.dyn, self.cache, action, self.cfg.dyn_sampling_steps, self.cfg.dyn_context_noise)
        return dv4.to_float(dv4.to_uint8(self.tok.decode(z[:, 0]))), dv4.expected_reward(logits[:, 0])


class DreamerV4Env:
    """num_envs imagined Push-Cube episodes, as DMO-SAPO's rollouts in dmo_sapo_dreamerv4.py: they start together from
    init_context-frame windows of play data, which fill the dynamics' cache (A.4); every generated frame is rewarded
    by the reward head, and all are truncated together after episode_length steps."""

    action_dim = dv4.ACTION_DIM

    def __init__(self, args, world, data, device):
        self.args, self.world, self.data, self.device = args, world, data, device
        self.starts = dv4.window_starts(data, world.context)
        self.episode_return = torch.zeros(args.num_envs, device=device)
        self.finished = []
        self.reset()

    def reset(self):
        idx = self.starts[torch.randint(len(self.starts), (self.args.num_envs,))][:, None] + torch.arange(self.world.context)
        idx = idx.to(self.device)
        frames = dv4.to_float(self.data["obs"][idx])
        self.world.start(frames, self.data["action"][idx])
        self.frames, self.t = frames[:, -self.args.frame_stack:], 0
        self.episode_return.zero_()

    @property
    def obs(self):
        return dv4.to_uint8(self.frames)

    def step(self, action):
        """-> next obs (reset where an episode ended), reward, terminated, truncated, last obs of ended episodes."""
        next_frame, reward = self.world.next_frame_and_reward(action)
        self.frames = torch.cat([self.frames[:, 1:], next_frame[:, None]], 1)
        self.t += 1
        self.episode_return += reward
        final_obs, truncated = self.obs, torch.full_like(reward, self.t >= self.args.episode_length, dtype=torch.bool)
        if truncated.all():
            self.finished += [{"return": r} for r in self.episode_return.tolist()]
            self.reset()
        return self.obs, reward, torch.zeros_like(truncated), truncated, final_obs


class Simulator:
    """n PushT-v0 simulators (true reward, gym's 200-step limit) with a frame stack, each reset when its episode ends;
    the first episodes start from seeds seed, seed + 1, ... A new episode's stack repeats its first frame."""

    action_dim = 2

    def __init__(self, args, n, seed, device):
        self.sims = [gym.make(args.env_id, obs_size=args.img_size) for _ in range(n)]
        self.k, self.device = args.frame_stack, device
        self.obs = torch.stack([self.first(sim.reset(seed=seed + i)[0]) for i, sim in enumerate(self.sims)]).to(device)
        self.episode_return = np.zeros(n)
        self.finished, self.infos = [], [None] * n

    def first(self, frame):
        return torch.as_tensor(frame).permute(2, 0, 1)[None].repeat(self.k, 1, 1, 1)

    def step(self, action):
        """-> next obs (reset where an episode ended), reward, terminated, truncated, last obs of ended episodes."""
        n, action = len(self.sims), action.cpu().numpy()
        reward, terminated, truncated = np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool)
        final_obs = torch.cat([self.obs[:, 1:], torch.zeros_like(self.obs[:, :1])], 1)
        for i, sim in enumerate(self.sims):
            frame, reward[i], terminated[i], truncated[i], self.infos[i] = sim.step(action[i])
            final_obs[i, -1] = torch.as_tensor(frame).permute(2, 0, 1)
            self.episode_return[i] += reward[i]
            if terminated[i] or truncated[i]:
                self.finished.append({"return": self.episode_return[i], "final_distance": self.infos[i]["distance"]})
                self.episode_return[i] = 0.0
                self.obs[i] = self.first(sim.reset()[0])
            else:
                self.obs[i] = final_obs[i]
        as_tensor = lambda x: torch.as_tensor(x, device=self.device)
        return self.obs.clone(), as_tensor(reward), as_tensor(terminated), as_tensor(truncated), final_obs


# ----------------------------------------------------------------------------------------------------
# Actor-critic
# ----------------------------------------------------------------------------------------------------
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """A shared CNN + MLP trunk (ReLU) over the stacked frames; a value head, and a clipped Gaussian policy with a
    state-independent log-std (CleanRL's): the sample is clipped to [-1, 1] before it reaches the environment, while
    the ratio and the entropy bonus (Table 4: 0.01) use the Gaussian's exact log-probability and closed-form
    entropy, which a tanh-Gaussian lacks (its entropy needs a sample estimate, its log-prob is fragile near +-1)."""

    def __init__(self, img_size, frame_stack, channels, hidden, action_dim=2):
        super().__init__()
        layers, c = [], 3 * frame_stack
        for o in channels:
            layers += [layer_init(nn.Conv2d(c, o, 4, 2, 1)), nn.ReLU()]
            c = o
        layers.append(nn.Flatten())
        inp = c * (img_size // 2 ** len(channels)) ** 2
        for h in hidden:
            layers += [layer_init(nn.Linear(inp, h)), nn.ReLU()]
            inp = h
        self.network = nn.Sequential(*layers)
        self.actor_mean = layer_init(nn.Linear(inp, action_dim), std=0.01)
        self.actor_logstd = nn.Parameter(torch.zeros(action_dim))
        self.critic = layer_init(nn.Linear(inp, 1), std=1.0)

    def trunk(self, obs):  # uint8 (B, k, 3, S, S) -> (B, hidden)
        return self.network(obs.flatten(1, 2).float() / 255.0)

    def get_value(self, obs):
        return self.critic(self.trunk(obs)).squeeze(-1)

    def get_action_and_value(self, obs, action=None):
        hidden = self.trunk(obs)
        mean = self.actor_mean(hidden)
        dist = torch.distributions.Normal(mean, self.actor_logstd.exp().expand_as(mean))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.critic(hidden).squeeze(-1)

    def act(self, obs):
        """The deployed policy: the Gaussian's mean, clipped."""
        return self.actor_mean(self.trunk(obs)).clamp(-1, 1)


def gae(rewards, values, dones, next_value, gamma, lam):
    """GAE(lambda) over one rollout (T, B): dones[t] ends the episode after step t (no bootstrap across it; a
    truncated episode's bootstrap gamma V(s_T) is already in its last reward). Returns advantages and returns."""
    advantages, last = torch.zeros_like(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_values = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * nonterminal * next_values - values[t]
        advantages[t] = last = delta + gamma * lam * nonterminal * last
    return advantages, advantages + values


# ----------------------------------------------------------------------------------------------------
# Zero-shot deployment in the simulator (the protocol of dmo_sapo_diamond.evaluate)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(args, agent, episodes, seed, device, record=0):
    """One episode on each of seeds seed, seed+1, ... with the mean action; final coverage (Push-Cube: Table 1's
    metrics). Returns metrics and, for the first `record` episodes, their top-down frames."""
    if args.env_id == dv4.ENV_ID:
        return dv4.run_episodes(push_cube_settings(args), stacked_policy(agent, args.frame_stack), episodes, seed,
                                device, record=record)
    sim = Simulator(args, episodes, seed, device)
    alive, returns = np.ones(episodes, bool), np.zeros(episodes)
    coverage, success = np.zeros(episodes), np.zeros(episodes, bool)
    distance, contact_steps, steps = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes)
    videos = [[sim.sims[i].unwrapped.render()] for i in range(min(record, episodes))]
    obs = sim.obs
    while alive.any():
        obs, reward, terminated, truncated, _ = sim.step(agent.act(obs))
        for i in np.flatnonzero(alive):  # ended episodes restart in Simulator; only the first counts
            returns[i] += reward[i].item()
            coverage[i], success[i] = sim.infos[i].get("coverage", 0.0), sim.infos[i]["is_success"]
            distance[i] = sim.infos[i]["distance"]
            contact_steps[i] += sim.infos[i]["contact"]
            steps[i] += 1
            alive[i] = not (terminated[i] or truncated[i])
            if i < len(videos) and alive[i]:
                videos[i].append(sim.sims[i].unwrapped.render())
    metrics = {"episodes": episodes, "successes": int(success.sum()), "success_rate": float(success.mean()),
               "mean_return": float(returns.mean()), "mean_final_distance": float(distance.mean()),
               "contact_fraction": float((contact_steps / steps).mean())}
    if args.env_id != "PushTReach-v0":
        metrics["mean_coverage"] = float(coverage.mean())
    return metrics, videos




def stacked_policy(agent, k):
    """The agent as a controller of dmo_sapo_dreamerv4.run_episodes: act(frames (E, 3, S, S) in [-1, 1]) keeps the
    last k frames (an episode's first frame repeated, as Simulator does) and returns the mean actions."""
    stack = None

    def act(frames):
        nonlocal stack
        frame = dv4.to_uint8(frames)[:, None]
        stack = frame.repeat(1, k, 1, 1, 1) if stack is None else torch.cat([stack[:, 1:], frame], 1)
        return agent.act(stack)

    act.frames_per_action = 0
    return act


def push_cube_settings(args):
    """The settings of dmo_sapo_dreamerv4.py that its play data and evaluation read, from this run's flags."""
    return dv4.Args(img_size=args.img_size, start=args.start, play_steps=args.play_steps, data_dir=args.data_dir,
                    data_path=args.data_path, eval_max_steps=args.eval_max_steps)


def task(args):
    """The script whose evaluation logging fits the task: Push-Cube's Table 1 metrics, or Push-T's distances."""
    return dv4 if args.env_id == dv4.ENV_ID else dmo


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """Preset values, then the command line on top; with --resume, the run's saved args instead of a preset."""
    argv = sys.argv[1:] if argv is None else argv
    flag = lambda name: next((a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
                              if (a == name and i + 1 < len(argv)) or a.startswith(name + "=")), None)
    resume, preset = flag("--resume"), flag("--preset") or "default"
    if resume and os.path.isfile(resume):
        raise dmo.RunError(f"--resume {resume} is a file; --resume takes a run directory: --resume "
                           f"{os.path.dirname(resume) or '.'}")
    if resume:
        path = os.path.join(resume, "args.json")
        if not os.path.exists(path):
            raise dmo.RunError(f"{resume}: not a run directory (no args.json)")
        with open(path) as f:
            defaults = Args(**json.load(f))
    elif preset in PRESETS:
        defaults = Args(**{**dataclasses.asdict(Args()), **PRESETS[preset], "preset": preset})
    else:
        defaults = Args()  # tyro reports the invalid choice
    args = tyro.cli(Args, default=defaults, args=argv, description=dmo.presets_help(__doc__, PRESETS))
    check_args(args)
    return args


def check_args(args):
    """Every numeric flag, before anything is created: a RunError (one line, exit code 1) names the first bad one."""
    for name in ("save_every", "img_size", "frame_stack", "play_steps", "episode_length", "total_timesteps",
                 "num_envs", "num_steps", "minibatch_size", "update_epochs", "eval_episodes", "eval_quick_episodes",
                 "init_context", "eval_max_steps"):
        if getattr(args, name) < 1:
            raise dmo.RunError(f"{name} ({getattr(args, name)}) must be at least 1")
    for name in ("seed", "eval_every", "eval_seed", "ent_coef", "vf_coef"):
        if getattr(args, name) < 0:
            raise dmo.RunError(f"{name} ({getattr(args, name)}) must not be negative")
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise dmo.RunError(f"{name} ({getattr(args, name)}) must be positive")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            raise dmo.RunError(f"{name} ({getattr(args, name)}) must be in [0, 1]")
    for name in ("cnn_channels", "hidden"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            raise dmo.RunError(f"{name} ({getattr(args, name)}) must be one or more sizes of at least 1")
    if args.img_size < 2 ** len(args.cnn_channels):
        raise dmo.RunError(f"img_size ({args.img_size}) must be at least 2^len(cnn_channels) "
                           f"({2 ** len(args.cnn_channels)}): each convolution halves the frame")
    if args.total_timesteps < args.num_envs * args.num_steps:
        raise dmo.RunError(f"total_timesteps ({args.total_timesteps}) must be at least one rollout, num_envs * "
                           f"num_steps ({args.num_envs * args.num_steps})")
    if args.wm_denoising_steps is not None and args.wm_denoising_steps < 1:
        raise dmo.RunError(f"wm_denoising_steps ({args.wm_denoising_steps}) must be at least 1")
    if args.env_id == dv4.ENV_ID:
        if args.env == "sim":
            raise dmo.RunError("--env sim runs the Push-T rungs; EgoPushCube-v0 trains in dmo_sapo_dreamerv4.py's "
                               "world model (--env world-model)")
        if not (args.wm_checkpoint and args.tok_checkpoint):
            raise dmo.RunError("--env world-model on EgoPushCube-v0 needs --wm-checkpoint RUN/dynamics.pt and "
                               "--tok-checkpoint RUN/tokenizer.pt (from dmo_sapo_dreamerv4.py)")
        if args.frame_stack > args.init_context:
            raise dmo.RunError(f"frame_stack ({args.frame_stack}) exceeds init_context ({args.init_context})")
    elif args.env == "world-model" and not (args.wm_checkpoint and args.reward_checkpoint):
        raise dmo.RunError("--env world-model needs --wm-checkpoint and --reward-checkpoint (from dmo_sapo_diamond.py)")
    if (args.num_envs * args.num_steps) % args.minibatch_size:
        raise dmo.RunError(f"num_envs * num_steps ({args.num_envs * args.num_steps}) must be a multiple of "
                           f"minibatch_size ({args.minibatch_size})")


# ----------------------------------------------------------------------------------------------------
# PPO (CleanRL's ppo_continuous_action.py, with Table 4's sizes)
# ----------------------------------------------------------------------------------------------------
def ppo(args, env, device, writer, run_dir):
    """CleanRL's PPO loop in `env` (WorldModelEnv or Simulator). Returns the agent and the samples it used."""
    agent = Agent(args.img_size, args.frame_stack, args.cnn_channels, args.hidden, env.action_dim).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    path = os.path.join(run_dir, "agent.pt")
    T, B, S = args.num_steps, args.num_envs, args.img_size
    batch_size = T * B
    num_iterations = args.total_timesteps // batch_size
    obs = torch.zeros(T, B, args.frame_stack, 3, S, S, dtype=torch.uint8, device=device)
    actions = torch.zeros(T, B, env.action_dim, device=device)
    logprobs, rewards, dones, values = (torch.zeros(T, B, device=device) for _ in range(4))
    next_obs, global_step, start = env.obs.clone(), 0, 0
    if args.resume and os.path.exists(path):
        ckpt = dmo.load_checkpoint(path, "ppo_agent", args, restore_rng=True)
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, global_step = ckpt["iteration"], ckpt["global_step"]
        print(f"PPO: resuming {path} at iteration {start} of {num_iterations} ({global_step:,} samples)"
              + (": nothing to continue, the agent is evaluated again" if start >= num_iterations else ""))
    elif args.resume:
        print(f"PPO: {path} does not exist, nothing to continue: training starts at iteration 0")

    def save(iteration):
        if args.save_model:
            dmo.save_checkpoint(path, "ppo_agent", args, AGENT_FIELDS, agent=agent.state_dict(),
                                optimizer=optimizer.state_dict(), iteration=iteration, global_step=global_step,
                                run_args=dataclasses.asdict(args))

    progress = dmo.Progress("ppo", num_iterations, start)
    for iteration in range(start, num_iterations):
        t_iter = time.time()
        optimizer.param_groups[0]["lr"] = (1.0 - iteration / num_iterations) * args.learning_rate  # linear decay

        # Rollout: num_steps in every environment
        raw_rewards = torch.zeros(T, B, device=device)
        for step in range(T):
            global_step += B
            obs[step] = next_obs
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            actions[step], logprobs[step], values[step] = action, logprob, value
            next_obs, reward, terminated, truncated, final_obs = env.step(action.clamp(-1, 1))  # clipped Gaussian
            raw_rewards[step] = reward
            if truncated.any():  # a truncated episode bootstraps from the value of its last observation
                with torch.no_grad():
                    reward = reward + args.gamma * truncated.float() * agent.get_value(final_obs)
            rewards[step], dones[step] = reward, (terminated | truncated).float()
        for episode in env.finished:
            for k, v in episode.items():
                writer.add_scalar(f"charts/episodic_{k}", v, global_step)
        env.finished.clear()
        with torch.no_grad():
            advantages, returns = gae(rewards, values, dones, agent.get_value(next_obs), args.gamma, args.gae_lambda)

        # PPO update: update_epochs over shuffled minibatches
        b_obs, b_actions, b_logprobs = obs.flatten(0, 1), actions.flatten(0, 1), logprobs.flatten(0, 1)
        b_advantages, b_returns, b_values = advantages.flatten(), returns.flatten(), values.flatten()
        clipfracs = []
        for epoch in range(args.update_epochs):
            for mb in torch.randperm(batch_size, device=device).split(args.minibatch_size):
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_actions[mb])
                logratio = newlogprob - b_logprobs[mb]
                ratio = logratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
                mb_advantages = b_advantages[mb]
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                pg_loss = torch.max(-mb_advantages * ratio,
                                    -mb_advantages * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                v_clipped = b_values[mb] + (newvalue - b_values[mb]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((newvalue - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
                dmo.check_finite("PPO loss", loss.item(), global_step, path)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

        var_y = b_returns.var()
        explained_var = float("nan") if var_y == 0 else (1 - (b_returns - b_values).var() / var_y).item()
        sps = batch_size / (time.time() - t_iter)
        mean_r = raw_rewards.mean().item()
        scalars = {"charts/SPS": sps, "charts/learning_rate": optimizer.param_groups[0]["lr"],
                   "losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                   "losses/entropy": entropy_loss.item(), "losses/approx_kl": approx_kl.item(),
                   "losses/clipfrac": float(np.mean(clipfracs)), "losses/explained_variance": explained_var}
        # the metric DMO logs, against the same x-axis: mean reward per world-model step (true reward in the sim)
        scalars["imagination/reward" if args.env == "world-model" else "charts/reward"] = mean_r
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        progress(iteration, reward=mean_r, entropy=entropy_loss.item(), SPS=sps)
        if args.eval_every and (iteration + 1) % args.eval_every == 0 and iteration + 1 < num_iterations:
            metrics, _ = evaluate(args, agent, args.eval_quick_episodes, args.eval_seed, device)  # uses no RNG
            task(args).log_eval(writer, metrics, global_step)
            print(f"[eval] {global_step:,} samples: {task(args).eval_line(metrics)}")
        if (iteration + 1) % args.save_every == 0 or dmo.STOP["requested"]:
            save(iteration + 1)
            dmo.stop_if_requested(f"PPO saved at iteration {iteration + 1}" if args.save_model else
                                  f"PPO stopped at iteration {iteration + 1}, not saved: --no-save-model")
    save(num_iterations)
    return agent, global_step


def run(args):
    if args.resume:
        run_dir = dmo.STOP["run_dir"] = args.resume
        args.run_name = os.path.basename(os.path.normpath(run_dir))
        if os.path.exists(os.path.join(run_dir, "wall_time_s.txt")):
            with open(os.path.join(run_dir, "wall_time_s.txt")) as f:
                dmo.CLOCK["before"] = float(f.read())
    else:
        args.run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.runs_dir, args.run_name)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    stages = ["the world model, reward model and play data" if args.env == "world-model" else "the simulators",
              f"PPO in the {args.env}", f"evaluation in {args.env_id}"]
    dmo.STAGES["names"] = stages

    dmo.start_stage(stages[0])
    if args.env_id == dv4.ENV_ID:
        world = DreamerV4World(args, device)  # checkpoints first: a wrong one fails before anything is written
        args.img_size = world.img_size
        data = dv4.load_play_data(push_cube_settings(args), device)
        env = DreamerV4Env(args, world, data, device)
    elif args.env == "world-model":
        world = DiamondWorld(args, device)
        if args.frame_stack > world.context:
            raise dmo.RunError(f"frame_stack ({args.frame_stack}) exceeds the world model's context ({world.context})")
        args.img_size = world.img_size
        data = dmo.load_play_data(args, device)
        env = WorldModelEnv(args, world, data, device)
    else:
        env = Simulator(args, args.num_envs, args.seed, device)

    purge_step = 0  # TensorBoard drops what a killed process logged after the checkpoint it resumes from
    if args.resume and os.path.exists(os.path.join(run_dir, "agent.pt")):  # refuse changed flags before args.json
        purge_step = dmo.load_checkpoint(os.path.join(run_dir, "agent.pt"), "ppo_agent", args)["global_step"] + 1
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({k: v for k, v in dataclasses.asdict(args).items() if k != "resume"}, f, indent=1)
    writer = dmo.STOP["writer"] = SummaryWriter(run_dir, purge_step=purge_step)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    dmo.STOP["run_dir"], dmo.STOP["armed"] = run_dir, True  # Ctrl-C from here on: PPO stops and saves
    print(f"run directory {run_dir} ({device}), PPO in the {args.env} at {args.img_size}x{args.img_size}")

    dmo.start_stage(stages[1])
    agent, global_step = ppo(args, env, device, writer, run_dir)

    # Zero-shot deployment in the simulator
    dmo.STOP["armed"] = False  # the agent is saved: a Ctrl-C from here on stops at once
    dmo.start_stage(stages[2])
    print(f"evaluating {args.eval_episodes} episodes in {args.env_id}")
    metrics, videos = evaluate(args, agent.eval(), args.eval_episodes, args.eval_seed, device,
                               record=3 if args.capture_video else 0)
    for i, frames in enumerate(videos):
        envs.write_video(os.path.join(run_dir, f"eval_episode_{i}.mp4"), frames, scale=1)
    result = {"env_id": args.env_id, **metrics, "global_step": global_step, "wall_time_s": dmo.wall_time()}
    if args.env_id == dv4.ENV_ID:
        result["start"] = args.start
    task(args).log_eval(writer, metrics, global_step)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    writer.close()
    print(json.dumps(result))
    print(f"done in {dmo.duration(result['wall_time_s'])}: {result['successes']} of {result['episodes']} evaluation "
          f"episodes succeeded ({task(args).eval_line(result)})")
    dmo.print_outputs(run_dir, [f"eval_episode_{i}.mp4" for i in range(len(videos))])
    return result


def main(argv=None):
    dmo.STOP.update(armed=False, requested=False, run_dir=None, writer=None)
    previous = signal.signal(signal.SIGINT, dmo.request_stop)
    try:
        run(parse_args(argv))
    except (dmo.RunError, dv4.RunError, envs.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (dmo.Interrupted, KeyboardInterrupt) as e:
        print(dmo.stop_message(e, os.path.basename(__file__)), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
