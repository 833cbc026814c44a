"""Robotic World Model (RWM) + MBPO-PPO on MuJoCo legged velocity-tracking tasks (seed 004).

Li, Krause, Hutter, "Robotic World Model: A Neural Network Simulator for Robust Policy Optimization in
Robotics": a GRU world model trained with dual-autoregressive training (history M = 32, forecast N = 8,
Eq. 1-2), and policy optimisation with PPO on its imagined rollouts (Algorithm 1, Table S10).
Two tasks stand in for ANYmal D (TASKS): `CheetahVelocity-v5` (gymnasium's HalfCheetah tracking a forward-velocity
command; it can flip, which ends the episode), which PPO learns on a 2-core CPU and the `tiny`/`default` presets
use, and `AntVelocity-v5` (the Ant tracking omnidirectional commands through a PD loop), the `paper` preset's.
Each task defines its commands, observations (Table S1), contacts, rewards (Table S5) and termination here.
See ../shared/ALGORITHMS.md §9.

    python rwm_mbpo_ppo.py --seed 1                              # MBPO-PPO (Algorithm 1)
    python rwm_mbpo_ppo.py --mode ppo-sim --seed 1               # the same PPO in the simulator
    python rwm_mbpo_ppo.py --mode prediction-study --seed 1      # Fig. 5, 6, 8: RWM-AR/TF, MLP, RSSM, Transformer
    python rwm_mbpo_ppo.py --mode horizon-study --seed 1         # Fig. 7: RWM's error over M x N
    python rwm_mbpo_ppo.py --preset tiny --forecast-horizon 1    # RWM-TF ablation, smoke size
    python rwm_mbpo_ppo.py --resume runs/RUN                     # continue a stopped run (Ctrl-C saves it)
"""

import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import cv2
import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from rssm import RSSM, RSSMConfig


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when available (the simulator always runs on the CPU)"""
    capture_video: bool = False
    """unused: the task is state-only (kept for the shared command line)"""
    save_model: bool = True
    """write checkpoints to the run folder"""
    preset: Literal["tiny", "default", "paper"] = "default"
    """size preset (each preset's values are listed at the top of --help); flags given on the command line override
    it"""
    mode: Literal["mbpo-ppo", "ppo-sim", "prediction-study", "horizon-study"] = "mbpo-ppo"
    """Algorithm 1, model-free PPO in the simulator, the prediction-error study (Fig. 5, 6, 8), or RWM's error over
    history and forecast horizons (Fig. 7)"""
    runs_dir: str = "runs"
    """outputs go to {runs_dir}/{run_name}/"""
    resume: Optional[str] = None
    """a run directory to continue from its checkpoint.pt (with its args.json; flags given override them)"""

    # Task
    env_id: Literal["CheetahVelocity-v5", "AntVelocity-v5"] = "CheetahVelocity-v5"
    """the velocity-tracking task (TASKS): HalfCheetah forward velocity (default) or the Ant's omnidirectional (paper)"""
    episode_steps: int = 400
    """time limit in control steps (20 s at 20 Hz)"""
    command_resample_steps: int = 200
    """a new velocity command is drawn every this many steps"""
    eval_episodes: int = 8
    """episodes of the final evaluation in the simulator"""
    eval_every: int = 10
    """iterations between evaluations in the simulator (logged, eval_history.jsonl)"""
    success_error: float = 0.5
    """an episode succeeds when it does not fall and its mean tracking error is below this"""

    # World model (Tables S6, S9)
    history_horizon: int = 32
    """M: warm-up (context) steps"""
    forecast_horizon: int = 8
    """N: autoregressive forecast steps in training; 1 = teacher forcing (RWM-TF)"""
    wm_hidden: int = 256
    """GRU hidden size (2 layers)"""
    wm_lr: float = 1e-3
    """Adam learning rate of the world model"""
    wm_batch_size: int = 256
    """windows per world-model update"""
    pretrain_steps: int = 2000
    """real steps per simulator env collected before policy learning"""
    pretrain_updates: int = 2000
    """world-model updates on the pretraining data"""
    wm_updates: int = 20
    """world-model updates per MBPO iteration"""
    buffer_size: int = 1000
    """|D|: real steps kept per simulator env (FIFO)"""

    # MBPO-PPO (Table S10)
    num_real_envs: int = 8
    """simulator envs that collect real data"""
    real_steps: int = 10
    """real steps per simulator env per iteration (Algorithm 1 line 3)"""
    imagination_envs: int = 4096
    """imagination agents"""
    imagination_steps: int = 100
    """imagination steps per iteration"""
    iterations: int = 2500
    """learning iterations"""

    # PPO (Table S10, rsl_rl)
    learning_rate: float = 1e-3
    """initial learning rate, adapted to the KL target"""
    desired_kl: float = 0.01
    """KL target of the adaptive learning rate"""
    update_epochs: int = 5
    """learning epochs"""
    num_minibatches: int = 4
    """mini-batches"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """clip range"""
    ent_coef: float = 0.005
    """entropy coefficient"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient clipping of the policy and the world model"""

    # Model-free reference (--mode ppo-sim)
    num_envs: int = 64
    """simulator envs"""
    num_steps: int = 32
    """steps per env per PPO iteration"""
    total_timesteps: int = 1_000_000
    """real samples"""

    # Prediction study (--mode prediction-study)
    study_steps: int = 4000
    """real steps per simulator env for the training set (the test set is a quarter of it)"""
    study_updates: int = 2000
    """updates per model"""
    study_eval_horizon: int = 32
    """forecast steps of the evaluation"""
    study_eval_windows: int = 256
    """test windows"""
    study_noise: tuple[float, ...] = (0.1, 0.2, 0.4, 0.5, 0.8)
    """Gaussian noise levels on states and actions (normalised space), Fig. 6"""
    study_policy: Optional[str] = None
    """checkpoint whose policy collects the data (default: the untrained stochastic policy)"""
    study_history_horizons: tuple[int, ...] = (4, 8, 16, 32)
    """--mode horizon-study: the history horizons M of the grid (rows)"""
    study_forecast_horizons: tuple[int, ...] = (1, 2, 4, 8)
    """--mode horizon-study: the forecast horizons N of the grid (columns; 1 = teacher forcing)"""


# Sizes per preset (the algorithmic constants above are those of Tables S6-S10)
PRESETS = {
    "tiny": dict(env_id="CheetahVelocity-v5", episode_steps=100, command_resample_steps=50, eval_episodes=2,
                 eval_every=2, history_horizon=8, forecast_horizon=4, wm_hidden=32, wm_batch_size=16,
                 pretrain_steps=60, pretrain_updates=5, wm_updates=2, buffer_size=200, num_real_envs=2, real_steps=8,
                 imagination_envs=16, imagination_steps=10, iterations=3, num_envs=2, num_steps=32,
                 total_timesteps=256, study_steps=100, study_updates=5, study_eval_horizon=8, study_eval_windows=16),
    "default": dict(env_id="CheetahVelocity-v5", episode_steps=400, command_resample_steps=200, eval_episodes=32,
                    eval_every=10, history_horizon=32, forecast_horizon=8, wm_hidden=256, wm_batch_size=64,
                    pretrain_steps=1000, pretrain_updates=1500, wm_updates=10, buffer_size=1000, num_real_envs=8,
                    real_steps=25, imagination_envs=256, imagination_steps=50, iterations=300, num_envs=64,
                    num_steps=32, total_timesteps=2_000_000, study_steps=1000, study_updates=1500,
                    study_eval_horizon=32, study_eval_windows=256),
    "paper": dict(env_id="AntVelocity-v5", episode_steps=1000, command_resample_steps=200, eval_episodes=32,
                  eval_every=50, history_horizon=32, forecast_horizon=8, wm_hidden=256, wm_batch_size=1024,
                  pretrain_steps=5000, pretrain_updates=20000, wm_updates=50, buffer_size=1000, num_real_envs=64,
                  real_steps=24, imagination_envs=4096, imagination_steps=100, iterations=2500, num_envs=4096,
                  num_steps=24, total_timesteps=200_000_000, study_steps=5000, study_updates=20000,
                  study_eval_horizon=64, study_eval_windows=1024),
}
ARCH_FIELDS = ("env_id", "mode", "wm_hidden", "history_horizon", "num_real_envs", "buffer_size", "num_envs")


def cli_value(name):
    """The value of a flag given as `--name value` or `--name=value`, else None."""
    for i, tok in enumerate(sys.argv[1:], 1):
        if tok == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if tok.startswith(name + "="):
            return tok.split("=", 1)[1]
    return None


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


def parse_args():
    """Preset values, then the flags of the command line; with --resume the run's args.json instead of a preset.
    Everything is checked before a run directory is created: one-line errors, exit code 1."""
    preset, resume = cli_value("--preset") or "default", cli_value("--resume")
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset must be one of {list(PRESETS)}, got {preset!r}")
    if resume and os.path.isfile(resume):
        raise SystemExit(f"error: --resume {resume} is a file; --resume takes a run directory: "
                         f"--resume {os.path.dirname(resume) or '.'}")
    if resume and not os.path.isfile(os.path.join(resume, "args.json")):
        raise SystemExit(f"error: --resume {resume}: not a run directory (no args.json)")
    if resume:
        with open(os.path.join(resume, "args.json")) as f:
            saved = json.load(f)
        tuples = ("study_noise", "study_history_horizons", "study_forecast_horizons")
        defaults = dict(saved, resume=resume, **{k: tuple(saved[k]) for k in tuples if k in saved})
    else:
        defaults = dict(PRESETS[preset], preset=preset)
    args = tyro.cli(Args, default=Args(**defaults), description=presets_help(__doc__, PRESETS))
    check_args(args)
    ckpt, path = None, resume and os.path.join(resume, "checkpoint.pt")
    if resume and args.mode in ("prediction-study", "horizon-study"):
        raise SystemExit(f"error: --resume {resume}: a {args.mode} keeps no checkpoint to continue from; run it again")
    if resume and os.path.exists(path):
        ckpt = load_checkpoint(path, args)  # flags that change the architecture or the data layout are refused
    if args.study_policy:
        policy = load_checkpoint(args.study_policy)
        if policy["args"].get("env_id") != args.env_id or "agent" not in policy:
            raise SystemExit(f"error: --study-policy {args.study_policy} is not a policy for {args.env_id} (its "
                             f"env_id is {policy['args'].get('env_id')!r})")
    return args, ckpt


def check_args(args):
    """Every numeric flag: a one-line error (exit code 1) names the first bad one."""
    for name in ("episode_steps", "command_resample_steps", "eval_episodes", "eval_every", "history_horizon",
                 "forecast_horizon", "wm_hidden", "wm_batch_size", "pretrain_steps", "wm_updates", "buffer_size",
                 "num_real_envs", "real_steps", "imagination_envs", "imagination_steps", "iterations", "update_epochs",
                 "num_minibatches", "num_envs", "num_steps", "total_timesteps", "study_steps", "study_updates",
                 "study_eval_horizon", "study_eval_windows"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: {name} ({getattr(args, name)}) must be at least 1")
    for name in ("seed", "pretrain_updates", "ent_coef", "vf_coef"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: {name} ({getattr(args, name)}) must not be negative")
    for name in ("success_error", "wm_lr", "learning_rate", "desired_kl", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"error: {name} ({getattr(args, name)}) must be positive")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"error: {name} ({getattr(args, name)}) must be in [0, 1]")
    if min(args.study_history_horizons + args.study_forecast_horizons, default=0) < 1:
        raise SystemExit(f"error: study_history_horizons {args.study_history_horizons} and study_forecast_horizons "
                         f"{args.study_forecast_horizons} must be at least 1")
    if min(args.study_noise, default=0.0) < 0:
        raise SystemExit(f"error: study_noise ({args.study_noise}) must not be negative")
    mbpo, window = args.mode == "mbpo-ppo", args.history_horizon + args.forecast_horizon - 1  # world-model windows
    if mbpo and min(args.pretrain_steps, args.buffer_size) < window:
        raise SystemExit(f"error: pretrain_steps ({args.pretrain_steps}) and buffer_size ({args.buffer_size}) must be "
                         f"at least history_horizon + forecast_horizon - 1 ({window})")
    batch = args.imagination_envs * args.imagination_steps if mbpo else args.num_envs * args.num_steps
    if args.num_minibatches > batch:
        raise SystemExit(f"error: num_minibatches ({args.num_minibatches}) must not exceed the PPO batch ({batch})")
    if args.mode == "ppo-sim" and args.total_timesteps < args.num_envs * args.num_steps:
        raise SystemExit(f"error: total_timesteps ({args.total_timesteps}) must be at least one rollout, num_envs * "
                         f"num_steps ({args.num_envs * args.num_steps})")


# ----------------------------------------------------------------------------------------------------
# The tasks: velocity tracking on MuJoCo robots (Tables S1-S5 adapted to each robot)
# ----------------------------------------------------------------------------------------------------
# A task is its environment class. Besides reset/step, the class carries what the world model, the policy and
# imagination need to know of it: the sizes of the world-model state, action, contacts and command, and the reward
# and tracking error as functions of states, so that the same code scores the simulator (numpy) and imagination
# (torch). Every state is laid out as Table S1: base linear velocity, base angular velocity, projected gravity (all
# in the body frame), joint positions, joint velocities, joint torques; the policy sees all but the torques (S4).
DT = 0.05  # both robots: 5 physics steps of 0.01 s per control step (20 Hz)
TRACKING_SIGMA2 = 0.25


class VelocityTrackingEnv(gym.Env):
    """What both robots share: a gymnasium MuJoCo env as the robot (its model, data and reset noise; observations
    and rewards are ours), velocity commands resampled every `command_resample_steps`, contact labels of
    `contact_ids` (desired first, undesired after), and the step's bookkeeping. A robot adds its state, actions,
    termination and reward."""

    def __init__(self, robot_id, contact_geoms, episode_steps, command_resample_steps):
        self.robot = gym.make(robot_id).unwrapped
        self.contact_ids = np.array([self.robot.model.geom(n).id for n in contact_geoms])
        self.episode_steps, self.resample_steps = episode_steps, command_resample_steps
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.obs_dim + self.cmd_dim,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.act_dim,), np.float32)

    def _contacts(self):
        d = self.robot.data
        g1, g2 = d.contact.geom1[: d.ncon], d.contact.geom2[: d.ncon]
        return np.isin(self.contact_ids, np.concatenate([g2[g1 == 0], g1[g2 == 0]])).astype(np.float64)  # geom 0: floor

    def _reset_robot(self, seed):
        self.robot.reset(seed=seed)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._reset_robot(seed)
        self.command = self.np_random.uniform(self.command_low, self.command_high)
        self.t, self.prev_action, self.state = 0, np.zeros(self.act_dim), self._state()
        return np.concatenate([self.state, self.command]), {}

    def step(self, action):
        action = np.clip(action, -1.0, 1.0)
        self._simulate(action)
        next_state, contacts = self._state(), self._contacts()
        terminated = self._terminated(next_state)
        reward = float(self.reward(self.state, next_state, action, self.prev_action, contacts, terminated, self.command))
        info = dict(contacts=contacts, tracking_error=float(self.tracking_error(next_state, self.command)))
        self.t += 1
        truncated = self.t >= self.episode_steps
        if self.t % self.resample_steps == 0:
            self.command = self.np_random.uniform(self.command_low, self.command_high)
        self.state, self.prev_action = next_state, action
        return np.concatenate([next_state, self.command]), reward, terminated, truncated, info


class CheetahVelocityEnv(VelocityTrackingEnv):
    """HalfCheetah-v5's planar robot and physics; the command is a forward velocity in [0, 2] m/s.

    State (23): v_x, v_z | pitch rate | g_x, g_z | 6 joint positions | 6 joint velocities | 6 joint torques.
    Actions are gymnasium's (motor commands in [-1, 1] times the gears). Contacts: the two feet, then the torso and
    the head (undesired: the robot is on its back or its nose). The episode terminates when the body pitches more
    than MAX_PITCH, on its way to a flip (random actions reach it in most episodes, so the termination and contact
    heads see positive labels from the first data on)."""

    obs_dim, act_dim, con_dim, cmd_dim, policy_obs_dim = 23, 6, 4, 1, 17 + 1
    command_low, command_high = np.array([0.0]), np.array([2.0])
    lin_vel, ang_vel, gravity = slice(0, 2), slice(2, 3), slice(3, 5)
    joint_pos, joint_vel, torque = slice(5, 11), slice(11, 17), slice(17, 23)
    MAX_PITCH = 1.0  # rad
    # tracking pays: perfect tracking earns 1.0 per second, standing still at a command drawn from U[0, 2] 0.22
    reward_weights = dict(track_lin_vel=1.0, lin_vel_z=-0.1, ang_vel=-0.01, torque=-2e-6, joint_acc=-2.5e-7,
                          action_rate=-0.01, undesired_contacts=-1.0, termination=-20.0)

    def __init__(self, episode_steps, command_resample_steps):
        super().__init__("HalfCheetah-v5", ("bfoot", "ffoot", "torso", "head"), episode_steps, command_resample_steps)
        self.torso = self.robot.model.body("torso").id

    @classmethod
    def reward(cls, obs, next_obs, action, prev_action, next_contacts, terminated, command):
        """Table S5's terms for a planar robot, each times the step time as in Isaac Lab's reward manager."""
        xp = torch if isinstance(next_obs, torch.Tensor) else np
        v, w = next_obs[..., cls.lin_vel], next_obs[..., cls.ang_vel]
        terms = dict(
            track_lin_vel=xp.exp(-((command[..., 0] - v[..., 0]) ** 2) / TRACKING_SIGMA2),
            lin_vel_z=v[..., 1] ** 2,
            ang_vel=w[..., 0] ** 2,
            torque=(next_obs[..., cls.torque] ** 2).sum(-1),
            joint_acc=(((next_obs[..., cls.joint_vel] - obs[..., cls.joint_vel]) / DT) ** 2).sum(-1),
            action_rate=((action - prev_action) ** 2).sum(-1),
            undesired_contacts=next_contacts[..., 2:].sum(-1),
            termination=terminated,
        )
        return DT * sum(cls.reward_weights[k] * terms[k] for k in terms)

    @classmethod
    def tracking_error(cls, next_obs, command):
        """|c - v_x| per step."""
        return abs(command[..., 0] - next_obs[..., 0])

    def _state(self):
        d = self.robot.data
        rot = d.xmat[self.torso].reshape(3, 3)  # body -> world
        lin_vel = rot.T @ np.array([d.qvel[0], 0.0, d.qvel[1]])  # the root slides in the world's x-z plane
        gravity = rot.T @ np.array([0.0, 0.0, -1.0])
        return np.concatenate([lin_vel[[0, 2]], d.qvel[2:3], gravity[[0, 2]], d.qpos[3:9], d.qvel[3:9],
                               d.qfrc_actuator[3:9]])

    def _simulate(self, action):
        self.robot.do_simulation(action, self.robot.frame_skip)

    def _terminated(self, state):
        return bool(abs(self.robot.data.qpos[2]) > self.MAX_PITCH)


# The Ant (the `paper` preset's robot, closest to ANYmal D): actions are joint-position targets around a standing
# pose, tracked by a PD loop at the physics rate, as on ANYmal (Isaac Lab: q* = q_default + 0.5 a). Driven by raw
# torques instead (gear 150 on a 0.9 kg robot), PPO learned to hold saturated torques; with the PD loop the untrained
# policy stands and PPO improves on that (results/rwm_mbpo_ppo.md).
DEFAULT_JOINT_POS = np.array([0.0, 0.87, 0.0, -0.87, 0.0, -0.87, 0.0, 0.87])  # hips, ankles mid-range (50 deg)
ACTION_SCALE, KP, KD = 0.5, 100.0, 10.0  # rad; N m / rad; N m s / rad (joint armature 1 kg m^2)
FOOT_GEOMS = ("left_ankle_geom", "right_ankle_geom", "third_ankle_geom", "fourth_ankle_geom")
KNEE_GEOMS = ("left_leg_geom", "right_leg_geom", "back_leg_geom", "rightback_leg_geom")  # Table S2: undesired


class AntVelocityEnv(VelocityTrackingEnv):
    """Ant-v5's robot and physics; the command is (v_x, v_y, ω_z), each in [-1, 1] (m/s, rad/s).

    State (33): v (3) | ω (3) | g (3) | 8 joint positions | 8 joint velocities | 8 joint torques. Contacts: the four
    feet, then the four legs (undesired). Terminates when flipped over or fallen."""

    obs_dim, act_dim, con_dim, cmd_dim, policy_obs_dim = 33, 8, 8, 3, 25 + 3
    command_low, command_high = -np.ones(3), np.ones(3)
    lin_vel, ang_vel, gravity = slice(0, 3), slice(3, 6), slice(6, 9)
    joint_pos, joint_vel, torque = slice(9, 17), slice(17, 25), slice(25, 33)
    reward_weights = dict(track_lin_vel=1.0, track_ang_vel=0.5, lin_vel_z=-2.0, ang_vel_xy=-0.05,
                          torque=-2.5e-5,  # Table S5
                          joint_acc=-2.5e-7, action_rate=-0.01, undesired_contacts=-1.0, flat_orientation=-5.0,
                          termination=-400.0)  # not in Table S5: without it the Ant learns to flip to end the penalties

    def __init__(self, episode_steps, command_resample_steps):
        super().__init__("Ant-v5", FOOT_GEOMS + KNEE_GEOMS, episode_steps, command_resample_steps)
        model = self.robot.model
        self.gear = model.actuator_gear[:, 0].copy()
        # the joint each actuator drives, as an index into q[7:15] (dofs 0-5 are the free joint; actuators start at hip_4)
        self.actuated_joint = model.jnt_dofadr[model.actuator_trnid[:, 0]] - 6

    @classmethod
    def reward(cls, obs, next_obs, action, prev_action, next_contacts, terminated, command):
        """Table S5 (feet air time left out), each term times the step time as in Isaac Lab's reward manager."""
        xp = torch if isinstance(next_obs, torch.Tensor) else np
        v, w, g = next_obs[..., cls.lin_vel], next_obs[..., cls.ang_vel], next_obs[..., cls.gravity]
        terms = dict(
            track_lin_vel=xp.exp(-((command[..., :2] - v[..., :2]) ** 2).sum(-1) / TRACKING_SIGMA2),
            track_ang_vel=xp.exp(-((command[..., 2] - w[..., 2]) ** 2) / TRACKING_SIGMA2),
            lin_vel_z=v[..., 2] ** 2,
            ang_vel_xy=(w[..., :2] ** 2).sum(-1),
            torque=(next_obs[..., cls.torque] ** 2).sum(-1),
            joint_acc=(((next_obs[..., cls.joint_vel] - obs[..., cls.joint_vel]) / DT) ** 2).sum(-1),
            action_rate=((action - prev_action) ** 2).sum(-1),
            undesired_contacts=next_contacts[..., 4:].sum(-1),
            flat_orientation=(g[..., :2] ** 2).sum(-1),
            termination=terminated,
        )
        return DT * sum(cls.reward_weights[k] * terms[k] for k in terms)

    @classmethod
    def tracking_error(cls, next_obs, command):
        """‖c - (v_x, v_y, ω_z)‖ per step."""
        xp = torch if isinstance(next_obs, torch.Tensor) else np
        actual = xp.stack([next_obs[..., 0], next_obs[..., 1], next_obs[..., 5]], -1)
        return ((command - actual) ** 2).sum(-1) ** 0.5

    def _state(self):
        d = self.robot.data
        rot = np.empty(9)
        mujoco.mju_quat2Mat(rot, d.qpos[3:7])
        rot = rot.reshape(3, 3)  # body -> world
        lin_vel = rot.T @ d.qvel[0:3]  # free joint: linear velocity in the world frame, angular in the body frame
        gravity = rot.T @ np.array([0.0, 0.0, -1.0])
        return np.concatenate([lin_vel, d.qvel[3:6], gravity, d.qpos[7:15], d.qvel[6:14], d.qfrc_actuator[6:14]])

    def _reset_robot(self, seed):
        self.robot.reset(seed=seed)  # Ant-v5's reset noise, then the joints to the standing pose (plus that noise)
        self.robot.data.qpos[7:15] += DEFAULT_JOINT_POS
        mujoco.mj_forward(self.robot.model, self.robot.data)

    def _simulate(self, action):
        target, d = DEFAULT_JOINT_POS + ACTION_SCALE * action, self.robot.data
        for _ in range(self.robot.frame_skip):  # PD at the physics rate (100 Hz), torques within the motors' range
            torque = KP * (target - d.qpos[7:15]) - KD * d.qvel[6:14]
            self.robot.do_simulation(np.clip(torque[self.actuated_joint] / self.gear, -1.0, 1.0), 1)

    def _terminated(self, state):
        return bool(state[8] > 0.0 or self.robot.data.qpos[2] < 0.2)  # flipped over or fallen


TASKS = {"CheetahVelocity-v5": CheetahVelocityEnv, "AntVelocity-v5": AntVelocityEnv}


def make_env(args):
    return TASKS[args.env_id](args.episode_steps, args.command_resample_steps)


def policy_obs(task, state_n, command):
    """Table S4 from a normalised world-model state (..., obs_dim) and the command: all but the torques."""
    return torch.cat([state_n[..., : task.torque.start], command], -1)


class Normalizer(nn.Module):
    """Running mean/std of the world-model state; saved with every checkpoint."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x):
        x = torch.as_tensor(x, dtype=torch.float64, device=self.mean.device).reshape(-1, self.mean.shape[0])
        n, mean, var = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        delta, total = mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + var * n + delta**2 * self.count * n / total) / total)
        self.count.fill_(total)

    def forward(self, x):
        return ((x - self.mean) / (self.var + 1e-8).sqrt()).float()

    def denormalize(self, x):
        return (x * (self.var + 1e-8).sqrt() + self.mean).float()


class ReplayBuffer:
    """D: real transitions of each simulator env in time order (FIFO ring of `size` steps per env)."""

    def __init__(self, task, num_envs, size):
        dims = dict(obs=task.obs_dim, action=task.act_dim, next_obs=task.obs_dim, next_contacts=task.con_dim, next_term=1)
        self.data = {k: np.zeros((num_envs, size, d), np.float32) for k, d in dims.items()}
        self.episode = np.full((num_envs, size), -1, np.int64)
        self.size, self.t = size, 0

    def add(self, episode, **step):  # one step of every env: (E, dim) arrays
        for k, v in step.items():
            self.data[k][:, self.t % self.size] = v.reshape(v.shape[0], -1)
        self.episode[:, self.t % self.size] = episode
        self.t += 1

    def sample(self, batch, length, rng):
        """`batch` windows of `length` consecutive steps inside one episode: dict of (B, length, dim) tensors."""
        lo, hi = max(0, self.t - self.size), self.t - length + 1
        envs, starts = [], []
        for _ in range(100):
            if hi <= lo:
                break
            e, s = rng.integers(0, len(self.episode), 4 * batch), rng.integers(lo, hi, 4 * batch)
            ok = self.episode[e, s % self.size] == self.episode[e, (s + length - 1) % self.size]
            envs, starts = np.concatenate([envs, e[ok]]), np.concatenate([starts, s[ok]])
            if len(envs) >= batch:
                break
        if len(envs) < batch:
            raise SystemExit(f"error: the replay buffer holds no episode of {length} steps; collect more data")
        e, idx = envs[:batch, None].astype(np.int64), (starts[:batch, None].astype(np.int64) + np.arange(length)) % self.size
        return {k: torch.from_numpy(v[e, idx]) for k, v in self.data.items()}

    def state_dict(self):
        return dict(t=self.t, episode=torch.from_numpy(self.episode), **{k: torch.from_numpy(v) for k, v in self.data.items()})

    def load_state_dict(self, sd):
        self.t, self.episode = sd["t"], sd["episode"].numpy().copy()
        self.data = {k: sd[k].numpy().copy() for k in self.data}


class Simulator:
    """`n` copies of the task in a plain batched loop with same-step auto-reset; every step goes to D if given."""

    def __init__(self, args, n, seed, obs_rms, buffer=None, update_rms=False):
        self.envs = [make_env(args) for _ in range(n)]
        self.task = TASKS[args.env_id]
        self.obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(self.envs)])
        self.obs_rms, self.buffer, self.update_rms = obs_rms, buffer, update_rms
        self.episode, self.next_episode = np.arange(n), n
        self.ep_return, self.ep_len, self.ep_error = np.zeros(n), np.zeros(n, int), np.zeros(n)
        self.finished = []  # dicts of finished episodes, drained by the caller

    def policy_obs(self, obs=None):
        obs = torch.as_tensor(self.obs if obs is None else obs, device=self.obs_rms.mean.device)
        d = self.task.obs_dim
        return policy_obs(self.task, self.obs_rms(obs[:, :d]), obs[:, d:].float())

    def step(self, action):
        """Returns the reward, whether the step ended an episode, whether it ended by the time limit only (a
        time-out, whose value is bootstrapped) and the policy's observation of the states reached (before any
        reset; None when no episode timed out)."""
        action, d = action.clamp(-1, 1).cpu().numpy(), self.task.obs_dim
        out = [env.step(a) for env, a in zip(self.envs, action)]
        next_obs = np.stack([o[0] for o in out])
        reward, term, trunc = (np.array([o[i] for o in out]) for i in (1, 2, 3))
        if self.buffer is not None:
            contacts = np.stack([o[4]["contacts"] for o in out])
            self.buffer.add(self.episode, obs=self.obs[:, :d], action=action, next_obs=next_obs[:, :d],
                            next_contacts=contacts, next_term=term.astype(np.float32))
        if self.update_rms:
            self.obs_rms.update(next_obs[:, :d])
        final_obs = self.policy_obs(next_obs) if trunc.any() else None  # the time-outs' states, before their reset
        self.ep_return += reward
        self.ep_len += 1
        self.ep_error += np.array([o[4]["tracking_error"] for o in out])
        for i in np.flatnonzero(term | trunc):
            mean_error = self.ep_error[i] / self.ep_len[i]
            self.finished.append(dict(env=i, ret=self.ep_return[i], length=self.ep_len[i], tracking_error=mean_error,
                                      fell=bool(term[i])))
            next_obs[i] = self.envs[i].reset()[0]
            self.episode[i], self.next_episode = self.next_episode, self.next_episode + 1
            self.ep_return[i], self.ep_len[i], self.ep_error[i] = 0.0, 0, 0.0
        self.obs = next_obs
        return (torch.as_tensor(reward, dtype=torch.float32), torch.as_tensor(term | trunc, dtype=torch.float32),
                torch.as_tensor(trunc & ~term, dtype=torch.float32), final_obs)


# ----------------------------------------------------------------------------------------------------
# RWM: GRU world model with dual-autoregressive training (§III-B, Table S6)
# ----------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0


def mlp(inp, hidden, out, act=nn.ReLU):
    layers, last = [], inp
    for h in hidden:
        layers += [nn.Linear(last, h), act()]
        last = h
    return nn.Sequential(*layers, nn.Linear(last, out))


class RWM(nn.Module):
    def __init__(self, task, hidden=256, head=128):
        super().__init__()
        self.gru = nn.GRU(task.obs_dim + task.act_dim, hidden, num_layers=2, batch_first=True)
        self.mean = mlp(hidden, [head], task.obs_dim)
        self.log_std = mlp(hidden, [head], task.obs_dim)
        self.contact = mlp(hidden, [head], task.con_dim)
        self.termination = mlp(hidden, [head], 1)

    def forward(self, obs, action, h=None):
        """Normalised states (B, T, obs_dim) and actions (B, T, act_dim) -> next-state Gaussian (mean, log_std), contact and termination
        logits for each step, and the GRU state (2, B, hidden)."""
        x, h = self.gru(torch.cat([obs, action], -1), h)
        mean = obs + self.mean(x)  # residual on the last input state
        log_std = LOG_STD_MIN + (LOG_STD_MAX - LOG_STD_MIN) * torch.sigmoid(self.log_std(x))  # bounded
        return mean, log_std, self.contact(x), self.termination(x).squeeze(-1), h

    def forecast(self, obs, action, horizon):
        """Warm up on the M history states, then feed back the predicted means: (B, horizon, obs_dim)."""
        M = obs.shape[1]
        mean, _, _, _, h = self(obs, action[:, :M])
        preds = [mean[:, -1:]]
        for k in range(1, horizon):
            mean, _, _, _, h = self(preds[-1], action[:, M - 1 + k : M + k], h)
            preds.append(mean)
        return torch.cat(preds, 1)


def prediction_loss(mean, log_std, con_logit, term_logit, next_obs, next_con, next_term):
    """L_o (Gaussian NLL) + L_c (contacts, BCE) + termination (BCE) for one step."""
    nll = (0.5 * ((next_obs - mean) / log_std.exp()) ** 2 + log_std).sum(-1).mean()
    return nll + F.binary_cross_entropy_with_logits(con_logit, next_con) + \
        F.binary_cross_entropy_with_logits(term_logit, next_term.squeeze(-1))


def rwm_loss(model, obs, action, next_obs, next_con, next_term, M, N):
    """Eq. (2) with α = 1 on windows of M + N - 1 steps: inner autoregression over the M history steps,
    then N forecast steps, each fed the model's own reparameterised sample (not detached).
    N = 1 is teacher forcing (RWM-TF): every one of the M steps predicts its successor from true inputs, so that it
    gets as many targets per window as N = 8 gets (one per window would train it on an eighth of the targets)."""
    mean, log_std, con, term, h = model(obs[:, :M], action[:, :M])
    if N == 1:
        return prediction_loss(mean, log_std, con, term, next_obs[:, :M], next_con[:, :M], next_term[:, :M])
    mean, log_std, con, term = mean[:, -1:], log_std[:, -1:], con[:, -1:], term[:, -1:]
    loss = 0.0
    for k in range(N):
        t = M - 1 + k  # the prediction of state t + 1
        loss = loss + prediction_loss(mean, log_std, con, term, next_obs[:, t : t + 1], next_con[:, t : t + 1],
                                      next_term[:, t : t + 1])
        if k < N - 1:
            sample = mean + log_std.exp() * torch.randn_like(mean)
            mean, log_std, con, term, h = model(sample, action[:, t + 1 : t + 2], h)
    return loss / N


def relative_error(pred, target):
    """e_k = Σ|ŝ - s| / Σ|s| (sums over windows and state dimensions) for each forecast step k: (H,)."""
    return (pred - target).abs().sum((0, 2)) / target.abs().sum((0, 2))


def normalized_batch(buffer, batch, length, obs_rms, rng, device):
    b = {k: v.to(device) for k, v in buffer.sample(batch, length, rng).items()}
    b["obs"], b["next_obs"] = obs_rms(b["obs"].double()), obs_rms(b["next_obs"].double())
    return b


def train_world_model(model, optimizer, buffer, obs_rms, args, updates, rng, device, M, N):
    for _ in range(updates):
        b = normalized_batch(buffer, args.wm_batch_size, M + N - 1, obs_rms, rng, device)
        loss = rwm_loss(model, b["obs"], b["action"], b["next_obs"], b["next_contacts"], b["next_term"], M, N)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
    return loss.item()


class Imagination:
    """The world model as a batched environment (Algorithm 1 lines 5-6). Every agent starts from a replay
    window: the GRU warms up on its M real history steps and imagination continues from the real state that
    follows them (the public code resets the hidden state and keeps one frame)."""

    def __init__(self, task, model, obs_rms, buffer, n, M, rng, device):
        self.task, self.model, self.obs_rms, self.buffer, self.M, self.rng = task, model, obs_rms, buffer, M, rng
        self.device = device
        self.h = torch.zeros(model.gru.num_layers, n, model.gru.hidden_size, device=device)
        self.state = torch.zeros(n, task.obs_dim, device=device)
        self.prev_action, self.command = torch.zeros(n, task.act_dim, device=device), torch.zeros(n, task.cmd_dim, device=device)
        self.reset(torch.arange(n, device=device))

    @torch.no_grad()
    def reset(self, idx):
        b = {k: v.to(self.device) for k, v in self.buffer.sample(len(idx), self.M, self.rng).items()}
        obs, action = self.obs_rms(b["obs"].double()), b["action"]
        _, _, _, _, h = self.model(obs, action)  # warm-up: the hidden state has consumed the M history steps
        self.h[:, idx] = h
        self.state[idx] = b["next_obs"][:, -1]  # the real state after the history
        self.prev_action[idx] = action[:, -1]
        low, high = (torch.as_tensor(x, dtype=torch.float32, device=self.device) for x in (self.task.command_low,
                                                                                             self.task.command_high))
        self.command[idx] = low + (high - low) * torch.rand(len(idx), self.task.cmd_dim, device=self.device)

    def policy_obs(self):
        return policy_obs(self.task, self.obs_rms(self.state.double()), self.command)

    @torch.no_grad()
    def step(self, action):
        action = action.clamp(-1, 1)
        mean, log_std, con, term, self.h = self.model(self.obs_rms(self.state.double())[:, None], action[:, None], self.h)
        next_state = self.obs_rms.denormalize((mean + log_std.exp() * torch.randn_like(mean))[:, 0].double())
        # the heads are Bernoulli distributions: a contact enters the reward as its probability (the expected
        # penalty; a threshold at 0.5 lets the policy lean on contacts the model is unsure of), and an episode ends
        # with the termination head's probability, as the next state is sampled from its Gaussian
        contacts, done = torch.sigmoid(con[:, 0]), torch.rand_like(term[:, 0]) < torch.sigmoid(term[:, 0])
        reward = self.task.reward(self.state, next_state, action, self.prev_action, contacts, done.float(), self.command)
        self.state, self.prev_action = next_state, action
        if done.any():
            self.reset(done.nonzero().squeeze(-1))
        return reward, done.float(), torch.zeros_like(reward), None  # no time limit in imagination: nothing to bootstrap


# ----------------------------------------------------------------------------------------------------
# PPO (rsl_rl style: adaptive-KL learning rate, Table S8 networks)
# ----------------------------------------------------------------------------------------------------
class Agent(nn.Module):
    def __init__(self, task):
        super().__init__()
        self.actor = mlp(task.policy_obs_dim, [128, 128, 128], task.act_dim, nn.ELU)
        self.critic = mlp(task.policy_obs_dim, [128, 128, 128], 1, nn.ELU)
        self.log_std = nn.Parameter(torch.zeros(task.act_dim))

    def get_value(self, x):
        return self.critic(x).squeeze(-1)

    def get_action_and_value(self, x, action=None):
        mu = self.actor(x)
        dist = torch.distributions.Normal(mu, self.log_std.exp().expand_as(mu))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action).sum(-1), dist.entropy().sum(-1), self.get_value(x), mu


@torch.no_grad()
def rollout(agent, env, num_steps, gamma, lam):
    """Steps `env` (Simulator or Imagination) with the policy; returns the flat batch with GAE returns."""
    keys = ("obs", "actions", "logprobs", "values", "mus", "rewards", "dones")
    buf = {k: [] for k in keys}
    for _ in range(num_steps):
        obs = env.policy_obs()
        action, logprob, _, value, mu = agent.get_action_and_value(obs)
        reward, done, time_out, final_obs = env.step(action)
        if time_out.any():  # an episode cut by the time limit is not over: bootstrap its last state's value (rsl_rl)
            reward = reward + gamma * time_out * agent.get_value(final_obs).to(reward.device)
        for k, v in zip(keys, (obs, action, logprob, value, mu, reward.to(obs.device), done.to(obs.device))):
            buf[k].append(v)
    buf = {k: torch.stack(v) for k, v in buf.items()}  # (T, B, ...)
    next_value, advantages, last = agent.get_value(env.policy_obs()), torch.zeros_like(buf["rewards"]), 0
    for t in reversed(range(num_steps)):  # GAE(λ)
        value_next = next_value if t == num_steps - 1 else buf["values"][t + 1]
        nonterminal = 1.0 - buf["dones"][t]
        delta = buf["rewards"][t] + gamma * value_next * nonterminal - buf["values"][t]
        advantages[t] = last = delta + gamma * lam * nonterminal * last
    buf["advantages"], buf["returns"] = advantages, advantages + buf["values"]
    return {k: v.flatten(0, 1) for k, v in buf.items()}


def ppo_update(agent, optimizer, b, args):
    n = b["obs"].shape[0]
    mb_size, std_old = n // args.num_minibatches, agent.log_std.exp().detach()
    for _ in range(args.update_epochs):
        perm = torch.randperm(n, device=b["obs"].device)
        for start in range(0, mb_size * args.num_minibatches, mb_size):
            mb = {k: v[perm[start : start + mb_size]] for k, v in b.items()}
            _, newlogprob, entropy, newvalue, mu = agent.get_action_and_value(mb["obs"], mb["actions"])
            std = agent.log_std.exp()
            with torch.no_grad():  # adaptive learning rate on the Gaussian KL (rsl_rl)
                kl = (torch.log(std / std_old) + (std_old**2 + (mb["mus"] - mu) ** 2) / (2 * std**2) - 0.5).sum(-1).mean()
                lr = optimizer.param_groups[0]["lr"]
                if kl > 2 * args.desired_kl:
                    lr = max(1e-5, lr / 1.5)
                elif kl < args.desired_kl / 2:
                    lr = min(1e-2, lr * 1.5)
                optimizer.param_groups[0]["lr"] = lr
            ratio = (newlogprob - mb["logprobs"]).exp()
            adv = (mb["advantages"] - mb["advantages"].mean()) / (mb["advantages"].std() + 1e-8)
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
            v_clipped = mb["values"] + (newvalue - mb["values"]).clamp(-args.clip_coef, args.clip_coef)
            v_loss = torch.max((newvalue - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2).mean()
            loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
    return dict(policy_loss=pg_loss.item(), value_loss=v_loss.item(), entropy=entropy.mean().item(),
                approx_kl=kl.item(), learning_rate=lr)


@torch.no_grad()
def evaluate(agent, obs_rms, args, episodes, seed):
    """Deterministic policy (the mean) in the simulator, one episode per env."""
    sim = Simulator(args, episodes, seed, obs_rms)
    first = {}  # each env's first episode
    while len(first) < episodes:
        sim.step(agent.actor(sim.policy_obs()))
        for ep in sim.finished:
            first.setdefault(ep["env"], ep)
        sim.finished.clear()
    eps = list(first.values())
    successes = sum(not ep["fell"] and ep["tracking_error"] < args.success_error for ep in eps)
    return dict(episodes=episodes, successes=int(successes), success_rate=successes / episodes,
                mean_return=float(np.mean([ep["ret"] for ep in eps])),
                mean_tracking_error=float(np.mean([ep["tracking_error"] for ep in eps])),
                fall_rate=float(np.mean([ep["fell"] for ep in eps])))


# ----------------------------------------------------------------------------------------------------
# Baselines of the prediction study (Table S7): the MLP trained autoregressively as RWM-AR is (Fig. 6's MLP), the
# Transformer and the RSSM with teacher forcing at every position
# ----------------------------------------------------------------------------------------------------
class MLPModel(nn.Module):
    """Next state (residual mean) from the flattened window of the last M (state, action) pairs."""

    def __init__(self, task, M):
        super().__init__()
        self.M, self.net = M, mlp(M * (task.obs_dim + task.act_dim), [256, 256], task.obs_dim)

    def next_obs(self, obs, action):  # (B, M, ·) -> (B, obs_dim)
        return obs[:, -1] + self.net(torch.cat([obs, action], -1).flatten(1))

    def loss(self, b, N):
        """Mean squared error of an N-step autoregressive forecast (predictions fed back, not detached) on windows of
        M + N - 1 steps: the MLP's version of Eq. (2)."""
        pred = rolling_forecast(self, b["obs"][:, : self.M], b["action"], N)
        return F.mse_loss(pred, b["next_obs"][:, self.M - 1 :])


class TransformerModel(nn.Module):
    """Decoder-only Transformer (dim 64, 8 heads, 2 layers, context M, sinusoidal positions)."""

    def __init__(self, task, M, dim=64):
        super().__init__()
        self.M, self.embed = M, nn.Linear(task.obs_dim + task.act_dim, dim)
        pos, i = torch.arange(M)[:, None], torch.arange(0, dim, 2)
        pe = torch.zeros(M, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / 10000 ** (i / dim)), torch.cos(pos / 10000 ** (i / dim))
        self.register_buffer("pe", pe)
        layer = nn.TransformerEncoderLayer(dim, 8, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, task.obs_dim)

    def forward(self, obs, action):  # (B, T <= M, ·) -> next-state prediction at every position
        T = obs.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=obs.device)
        x = self.blocks(self.embed(torch.cat([obs, action], -1)) + self.pe[:T], mask=mask, is_causal=True)
        return obs + self.head(x)

    def next_obs(self, obs, action):
        return self(obs, action)[:, -1]

    def loss(self, b, N=1):
        return F.mse_loss(self(b["obs"], b["action"]), b["next_obs"])


def rolling_forecast(model, obs, action, horizon):
    """Autoregression over a sliding window of the last M states, predicted ones appended: (B, horizon, obs_dim)."""
    M = obs.shape[1]
    for k in range(horizon):
        pred = model.next_obs(obs[:, -M:], action[:, k : k + M])
        obs = torch.cat([obs, pred[:, None]], 1)
    return obs[:, M:]


class RSSMModel(nn.Module):
    """The shared DreamerV3 RSSM (rssm.py) with its vector encoder/decoder; reward and continuation heads off."""

    def __init__(self, task):
        super().__init__()
        cfg = RSSMConfig.preset("small", obs_shape=(task.obs_dim,), action_dim=task.act_dim, reward_scale=0.0,
                                cont_scale=0.0)
        self.rssm = RSSM(cfg)

    def observe(self, obs, action):  # rssm.py: actions[:, t] leads into frame t
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)
        is_first = torch.zeros(obs.shape[:2], dtype=torch.bool, device=obs.device)
        is_first[:, 0] = True
        return self.rssm.observe(self.rssm.encode(obs), prev_action, is_first)

    def loss(self, b, N=1):
        post, prior = self.observe(b["obs"], b["action"])
        zeros = torch.zeros(b["obs"].shape[:2], device=b["obs"].device)
        return self.rssm.loss(post, prior, b["obs"], zeros, 1 - zeros)[0]

    def forecast(self, obs, action, horizon):
        M = obs.shape[1]
        post, _ = self.observe(obs, action[:, :M])
        state, preds = {k: v[:, -1] for k, v in post.items()}, []
        for k in range(horizon):
            state = self.rssm.img_step(state, action[:, M - 1 + k], sample=False)
            preds.append(self.rssm.decode(self.rssm.feat(state)))
        return torch.stack(preds, 1)


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed run keeps the last good checkpoint


def load_checkpoint(path, args=None):
    """One-line errors for unreadable checkpoints and for those of another configuration."""
    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as e:
        raise SystemExit(f"error: cannot load checkpoint {path}: not a readable torch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "args" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of {os.path.basename(__file__)} (no 'args')")
    for field in ARCH_FIELDS if args is not None else ():
        if ckpt["args"].get(field) != getattr(args, field):
            raise SystemExit(f"error: checkpoint {path} has {field}={ckpt['args'].get(field)!r}, "
                             f"this run has {field}={getattr(args, field)!r}")
    return ckpt


STAGES = {"names": [], "current": 0}  # the run's stages in order, and which one runs (1-based)


def start_stage(name):
    """Print `stage k of n: NAME` and the time since the process started."""
    STAGES["current"] = STAGES["names"].index(name) + 1
    print(f"stage {STAGES['current']} of {len(STAGES['names'])}: {name} | {duration(time.time() - START)} into this "
          f"process", flush=True)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def time_left(seconds):
    """This stage's time left, which bounds the run's from below while later stages are not timed yet."""
    later = len(STAGES["names"]) - STAGES["current"]
    run = f"; run: >= {duration(seconds)} + {later} stage{'s' * (later > 1)} not timed yet" if later > 0 else ""
    return f"~{duration(seconds)} left{run}"


# Ctrl-C. While training runs (armed), the first Ctrl-C asks it to stop at the end of the current step, where it
# saves checkpoint.pt; a second Ctrl-C, or one outside training, stops at once. main() then prints the command that
# continues the run and exits with 130.
START = time.time()
STOP = {"armed": False, "requested": False, "run_dir": None, "writer": None}


class Interrupted(Exception):
    """Ctrl-C, acted on at the end of a training step; the message says what was saved."""


def request_stop(signum, frame):  # the SIGINT handler main() installs
    if not STOP["armed"] or STOP["requested"]:
        raise KeyboardInterrupt
    STOP["requested"] = True
    print("\nCtrl-C: stopping at the end of this step, after saving a checkpoint (Ctrl-C again: stop now)", flush=True)


def stop_message(error):
    """Flush TensorBoard and say, in one line, what a Ctrl-C kept and the command that continues the run."""
    if STOP["writer"] is not None:
        STOP["writer"].close()
    if STOP["run_dir"] is None:
        return "interrupted: nothing was saved to continue from"
    kept = error if isinstance(error, Interrupted) else "the last checkpoint.pt is kept"
    return (f"interrupted ({kept}); continue with: python {os.path.basename(__file__)} --resume "
            f"{shlex.quote(STOP['run_dir'])}")


def in_pretraining(args, ckpt):
    """Whether a checkpoint was saved during MBPO-PPO's world-model pretraining (by Ctrl-C)."""
    return args.mode == "mbpo-ppo" and ckpt["iteration"] == 0 and \
        ckpt.get("pretrain_updates_done", args.pretrain_updates) < args.pretrain_updates


def check_finite(name, value, step):
    if not math.isfinite(value):
        raise SystemExit(f"error: {name} is {value} at step {step}; the last good checkpoint is kept")


def rng_state(rng):
    return dict(python=random.getstate(), numpy=rng.bit_generator.state, torch=torch.get_rng_state())


def set_rng_state(rng, s):
    random.setstate(s["python"])
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"])


def log_episodes(writer, sim, step):
    for ep in sim.finished:
        writer.add_scalar("charts/episodic_return", ep["ret"], step)
        writer.add_scalar("charts/episodic_length", ep["length"], step)
        writer.add_scalar("charts/tracking_error", ep["tracking_error"], step)
    sim.finished.clear()


def log_eval(writer, run_dir, mode, result, step, start_time):
    row = dict(mode=mode, global_step=step, wall_time_s=time.time() - start_time, **result)
    for k in ("mean_return", "mean_tracking_error", "success_rate", "fall_rate"):
        writer.add_scalar(f"eval/{k}", result[k], step)
    with open(os.path.join(run_dir, "eval_history.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"eval step={step} return={result['mean_return']:.2f} tracking_error={result['mean_tracking_error']:.3f} "
          f"falls={result['fall_rate']:.2f} wall={row['wall_time_s']:.0f}s", flush=True)


def policy_learning(args, writer, run_dir, device, rng, ckpt):
    """--mode mbpo-ppo (Algorithm 1) and --mode ppo-sim: the same PPO, on imagined or on real rollouts."""
    mbpo, task = args.mode == "mbpo-ppo", TASKS[args.env_id]
    agent, obs_rms = Agent(task).to(device), Normalizer(task.obs_dim).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)
    M, N = args.history_horizon, args.forecast_horizon
    if mbpo:  # Algorithm 1 line 1: policy, world model, replay buffer
        model = RWM(task, args.wm_hidden).to(device)
        wm_optimizer = torch.optim.Adam(model.parameters(), lr=args.wm_lr)
        buffer = ReplayBuffer(task, args.num_real_envs, args.buffer_size)
        sim = Simulator(args, args.num_real_envs, args.seed, obs_rms, buffer)
        num_iterations = args.iterations
    else:
        sim = Simulator(args, args.num_envs, args.seed, obs_rms, update_rms=True)
        num_iterations = args.total_timesteps // (args.num_envs * args.num_steps)
    iteration, global_step, pretrained, start_time = 0, 0, 0, time.time()
    training = ["simulator data", "world-model pretraining", "MBPO-PPO"] if mbpo else ["PPO in the simulator"]
    STAGES["names"] = training + ["evaluation in the simulator"]
    STOP["armed"] = True  # Ctrl-C from here on: training stops at the end of a step and saves checkpoint.pt
    if ckpt is None and args.resume:
        print(f"resuming {run_dir}: no checkpoint.pt yet, nothing to continue: the run starts over")
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        obs_rms.load_state_dict(ckpt["obs_rms"])
        if mbpo:
            model.load_state_dict(ckpt["world_model"])
            wm_optimizer.load_state_dict(ckpt["wm_optimizer"])
            buffer.load_state_dict(ckpt["buffer"])
            offset = int(buffer.episode.max()) + 1  # new episode ids, so no window spans the restart
            sim.episode, sim.next_episode = sim.episode + offset, sim.next_episode + offset
        iteration, global_step = ckpt["iteration"], ckpt["global_step"]
        pretrained = ckpt.get("pretrain_updates_done", args.pretrain_updates)
        start_time -= ckpt["wall_time_s"]
        set_rng_state(rng, ckpt["rng"])
        if in_pretraining(args, ckpt):
            print(f"resuming {run_dir}: continues the world-model pretraining at update {pretrained} of "
                  f"{args.pretrain_updates}")
        else:
            print(f"resuming {run_dir}: continues at iteration {iteration} of {num_iterations} ({global_step:,} real "
                  f"steps)" + (": nothing to continue, evaluating again" if iteration >= num_iterations else ""))
    elif mbpo:  # offline pretraining of the world model on simulator data (§V)
        start_stage("simulator data")
        rollout(agent, sim, args.pretrain_steps, args.gamma, args.gae_lambda)
        global_step += args.pretrain_steps * args.num_real_envs
        obs_rms.update(buffer.data["obs"][:, : min(buffer.t, buffer.size)])  # fixed from here on

    def checkpoint():
        state = dict(args=asdict(args), agent=agent.state_dict(), optimizer=optimizer.state_dict(),
                     obs_rms=obs_rms.state_dict(), iteration=iteration, global_step=global_step,
                     pretrain_updates_done=pretrained, wall_time_s=time.time() - start_time, rng=rng_state(rng))
        if mbpo:
            state.update(world_model=model.state_dict(), wm_optimizer=wm_optimizer.state_dict(),
                         buffer=buffer.state_dict())
        if args.save_model:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), **state)

    def stop_if_requested(where):  # after Ctrl-C (request_stop): save, and end the run
        if STOP["requested"]:
            checkpoint()
            raise Interrupted(f"{where} saved" if args.save_model else
                              f"stopped at {where}, not saved: --no-save-model")

    if mbpo and (ckpt is None or in_pretraining(args, ckpt)):
        start_stage("world-model pretraining")
        t0, first = time.time(), pretrained
        for done in range(pretrained, args.pretrain_updates, 100):
            n = min(100, args.pretrain_updates - done)
            wm_loss = train_world_model(model, wm_optimizer, buffer, obs_rms, args, n, rng, device, M, N)
            check_finite("world-model pretraining loss", wm_loss, done + n)
            writer.add_scalar("world_model/pretrain_loss", wm_loss, done + n)
            pretrained = done + n
            left = (args.pretrain_updates - pretrained) * (time.time() - t0) / (pretrained - first)
            print(f"pretrain world model: update {done + n}/{args.pretrain_updates} loss={wm_loss:.3f} "
                  f"({time.time() - start_time:.0f}s, {time_left(left)})", flush=True)
            stop_if_requested(f"the world-model pretraining at update {pretrained}")
        log_episodes(writer, sim, global_step)

    def evaluate_and_log():  # deterministic policy in the simulator, same start states every time
        result = evaluate(agent, obs_rms, args, args.eval_episodes, args.seed + 10_000)
        log_eval(writer, run_dir, args.mode, result, global_step, start_time)

    start_stage("MBPO-PPO" if mbpo else "PPO in the simulator")
    if iteration == 0:
        evaluate_and_log()  # the untrained policy starts the curves of eval_history.jsonl
    while iteration < num_iterations:
        t0, iteration = time.time(), iteration + 1
        if mbpo:
            # line 3: collect observation-action pairs in D with π (the PPO batch of real steps is not used)
            rollout(agent, sim, args.real_steps, args.gamma, args.gae_lambda)
            global_step += args.real_steps * args.num_real_envs
            # line 4: update the world model with autoregressive training (Eq. 2)
            wm_loss = train_world_model(model, wm_optimizer, buffer, obs_rms, args, args.wm_updates, rng, device, M, N)
            check_finite("world-model loss", wm_loss, global_step)
            writer.add_scalar("world_model/loss", wm_loss, global_step)
            # lines 5-6: imagination agents from D (with the M-step warm-up), rolled out for T steps
            imagination = Imagination(task, model, obs_rms, buffer, args.imagination_envs, M, rng, device)
            b = rollout(agent, imagination, args.imagination_steps, args.gamma, args.gae_lambda)
            writer.add_scalar("imagination/reward", b["rewards"].mean().item(), global_step)
            writer.add_scalar("imagination/termination_rate", b["dones"].mean().item(), global_step)
        else:
            b = rollout(agent, sim, args.num_steps, args.gamma, args.gae_lambda)
            global_step += args.num_steps * args.num_envs
        # line 7: PPO update
        stats = ppo_update(agent, optimizer, b, args)
        check_finite("PPO value loss", stats["value_loss"], global_step)
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", v, global_step)
        log_episodes(writer, sim, global_step)
        sps = int(b["obs"].shape[0] / (time.time() - t0))
        writer.add_scalar("charts/SPS", sps, global_step)
        if iteration % args.eval_every == 0 or iteration == num_iterations:
            evaluate_and_log()
            checkpoint()
        print(f"iter {iteration}/{num_iterations} real_steps={global_step} SPS={sps} kl={stats['approx_kl']:.4f} "
              f"lr={stats['learning_rate']:.1e} ({time.time() - start_time:.0f}s, "
              f"{time_left((num_iterations - iteration) * (time.time() - t0))})", flush=True)
        stop_if_requested(f"iteration {iteration}")
    STOP["armed"] = False  # the checkpoint is saved: a Ctrl-C from here on stops at once
    start_stage("evaluation in the simulator")
    result = evaluate(agent, obs_rms, args, args.eval_episodes, args.seed + 20_000)
    wall_time = time.time() - start_time
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump(dict(env_id=args.env_id, mode=args.mode, global_step=global_step, wall_time_s=wall_time, **result),
                  f, indent=2)
    print(json.dumps(result))
    print(f"done in {duration(wall_time)}: {result['successes']} of {result['episodes']} evaluation episodes "
          f"succeeded (mean tracking error {result['mean_tracking_error']:.3f}, falls {result['fall_rate']:.2f})")
    print(f"  results      {os.path.join(run_dir, 'eval.json')}\n"
          f"               {os.path.join(run_dir, 'eval_history.jsonl')}\n"
          f"  TensorBoard  tensorboard --logdir {shlex.quote(run_dir)}")


FORECAST_COLOURS = {"RWM-AR": (200, 90, 30), "RWM-TF": (40, 40, 220), "MLP": (40, 160, 40), "RSSM": (160, 40, 160),
                    "Transformer": (0, 140, 200)}  # BGR; also the number of test windows drawn


def draw_forecasts(path, task, history, real, forecasts, w=300, h=150, m=8):
    """Fig. 5: real states (black; grey over the M history steps) against each model's H-step forecast from the same
    history, for a few test windows (rows) and state dimensions (columns: forward velocity, pitch/yaw rate, the first
    joint's position and velocity). A PNG written with OpenCV."""
    dims = [(task.lin_vel.start, "v_x"), (task.ang_vel.stop - 1, "angular rate"), (task.joint_pos.start, "joint 1 q"),
            (task.joint_vel.start, "joint 1 qdot")]
    rows = []
    for i in range(real.shape[0]):
        cells = []
        for d, label in dims:
            seq = np.concatenate([history[i, :, d], real[i, :, d]])
            values = np.concatenate([seq] + [f[i, :, d] for f in forecasts.values()])
            lo, hi = values.min(), values.max() + 1e-6
            img = np.full((h, w, 3), 255, np.uint8)

            def pts(y, start):
                x = m + (start + np.arange(len(y))) * (w - 2 * m) / (len(seq) - 1)
                return np.stack([x, h - m - (y - lo) / (hi - lo) * (h - 2 * m)], -1).astype(np.int32)

            M = history.shape[1]
            cv2.line(img, (int(m + (M - 0.5) * (w - 2 * m) / (len(seq) - 1)), m), (int(m + (M - 0.5) * (w - 2 * m) /
                     (len(seq) - 1)), h - m), (200, 200, 200), 1)
            cv2.polylines(img, [pts(seq[:M], 0)], False, (150, 150, 150), 1, cv2.LINE_AA)
            cv2.polylines(img, [pts(seq[M - 1 :], M - 1)], False, (0, 0, 0), 2, cv2.LINE_AA)
            for name, f in forecasts.items():
                cv2.polylines(img, [pts(f[i, :, d], M)], False, FORECAST_COLOURS[name], 1, cv2.LINE_AA)
            if i == 0:
                cv2.putText(img, label, (m + 2, m + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.rectangle(img, (0, 0), (w - 1, h - 1), (0, 0, 0), 1)
            cells.append(img)
        rows.append(np.concatenate(cells, 1))
    legend = np.full((24, rows[0].shape[1], 3), 255, np.uint8)
    x = 8
    for name, colour in [("real", (0, 0, 0))] + [(n, FORECAST_COLOURS[n]) for n in forecasts]:
        cv2.putText(legend, name, (x, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
        x += 16 + 10 * len(name)
    cv2.imwrite(path, np.concatenate([legend] + rows, 0))


def study_data(args, task, device):
    """The study's datasets: `study_steps` real steps per env for training and a quarter of that (other seeds) for
    testing, collected by the stochastic policy of --study-policy (default: the untrained one); their normaliser."""
    agent, obs_rms = Agent(task), Normalizer(task.obs_dim)
    if args.study_policy:
        ckpt = load_checkpoint(args.study_policy)  # parse_args checked that it is a policy for this task
        agent.load_state_dict(ckpt["agent"])
        obs_rms.load_state_dict(ckpt["obs_rms"])
    buffers, test_steps = [], max(args.history_horizon + args.study_eval_horizon, args.study_steps // 4)
    for seed, steps in ((args.seed, args.study_steps), (args.seed + 1000, test_steps)):
        buffers.append(ReplayBuffer(task, args.num_real_envs, steps))
        sim = Simulator(args, args.num_real_envs, seed, obs_rms, buffers[-1])
        rollout(agent, sim, steps, args.gamma, args.gae_lambda)
    data_rms = Normalizer(task.obs_dim).to(device)
    data_rms.update(buffers[0].data["obs"])
    return buffers[0], buffers[1], data_rms


def fit_study_model(name, model, M, n_forecast, lr, train_buf, data_rms, args, writer, rng, device):
    """`study_updates` Adam updates of one model on windows of M + n_forecast - 1 steps; returns the seconds taken."""
    model.to(device)
    optimizer, t0 = torch.optim.Adam(model.parameters(), lr=lr), time.time()
    for update in range(1, args.study_updates + 1):
        b = normalized_batch(train_buf, args.wm_batch_size, M + n_forecast - 1, data_rms, rng, device)
        if isinstance(model, RWM):
            loss = rwm_loss(model, b["obs"], b["action"], b["next_obs"], b["next_contacts"], b["next_term"], M,
                            n_forecast)
        else:
            loss = model.loss(b, n_forecast)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if update % 100 == 0 or update == args.study_updates:
            check_finite(f"{name} loss", loss.item(), update)
            writer.add_scalar(f"world_model/{name}_loss", loss.item(), update)
            left = (args.study_updates - update) * (time.time() - t0) / update
            print(f"{name}: update {update}/{args.study_updates} loss={loss.item():.4f} ({time.time() - t0:.0f}s, "
                  f"{time_left(left)})", flush=True)
    model.eval()
    return time.time() - t0


@torch.no_grad()
def forecast_from(model, obs, action, H):
    return model.forecast(obs, action, H) if hasattr(model, "forecast") else rolling_forecast(model, obs, action, H)


def prediction_study(args, writer, run_dir, device, rng):
    """Fig. 6-8: train each model on one dataset, then the relative autoregressive error on held-out windows."""
    M, N, H = args.history_horizon, args.forecast_horizon, args.study_eval_horizon
    task = TASKS[args.env_id]
    STAGES["names"] = ["simulator data", "RWM-AR", "RWM-TF", "MLP", "RSSM", "Transformer"]
    start_stage("simulator data")
    train_buf, test_buf, data_rms = study_data(args, task, device)
    # name: (model, forecast steps of its training loss (1: teacher forcing at every position), learning rate)
    models = {"RWM-AR": (RWM(task, args.wm_hidden), N, 1e-3), "RWM-TF": (RWM(task, args.wm_hidden), 1, 1e-3),
              "MLP": (MLPModel(task, M), N, 1e-3), "RSSM": (RSSMModel(task), 1, 3e-4),
              "Transformer": (TransformerModel(task, M), 1, 3e-4)}
    test = normalized_batch(test_buf, args.study_eval_windows, M + H - 1, data_rms, np.random.default_rng(0), device)
    results, checkpoints, shown = {}, {}, {}  # shown: each model's clean forecasts of the first test windows
    for name, (model, n_forecast, lr) in models.items():
        start_stage(name)
        train_time = fit_study_model(name, model, M, n_forecast, lr, train_buf, data_rms, args, writer, rng, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        row = dict(train_time_s=train_time)
        for sigma in (0.0, *args.study_noise):  # noise on the history states and on all actions; clean targets
            obs = test["obs"][:, :M] + sigma * torch.randn(test["obs"][:, :M].shape, generator=gen, device=device)
            action = test["action"] + sigma * torch.randn(test["action"].shape, generator=gen, device=device)
            forecast = forecast_from(model, obs, action, H)
            e = relative_error(forecast, test["next_obs"][:, M - 1 :])
            row[f"sigma_{sigma}"] = dict(per_step=e.tolist(), mean=e.mean().item())
            if sigma == 0.0:
                shown[name] = data_rms.denormalize(forecast[: len(FORECAST_COLOURS)].double()).cpu().numpy()
        results[name] = row
        checkpoints[name] = model.state_dict()
    table = ["| model | e (step 1) | e (step N) | e (step H) | mean e | " + " | ".join(f"σ={s}" for s in args.study_noise)
             + " | train s |", "|" + " --- |" * (6 + len(args.study_noise))]
    for name, row in results.items():
        clean = row["sigma_0.0"]["per_step"]
        noisy = " | ".join(f"{row[f'sigma_{s}']['mean']:.3f}" for s in args.study_noise)
        table.append(f"| {name} | {clean[0]:.3f} | {clean[min(N, H) - 1]:.3f} | {clean[-1]:.3f} | "
                     f"{row['sigma_0.0']['mean']:.3f} | {noisy} | {row['train_time_s']:.0f} |")
    header = (f"Relative autoregressive prediction error e (normalised space), M={M}, N={N}, H={H} forecast steps, "
              f"{args.study_eval_windows} test windows; noise columns: mean e over the H steps.\n\n")
    with open(os.path.join(run_dir, "prediction_study.json"), "w") as f:
        json.dump(dict(env_id=args.env_id, history_horizon=M, forecast_horizon=N, eval_horizon=H,
                       real_steps=args.study_steps * args.num_real_envs, models=results), f, indent=2)
    with open(os.path.join(run_dir, "prediction_study.md"), "w") as f:
        f.write(header + "\n".join(table) + "\n")
    real = data_rms.denormalize(test["next_obs"][: len(FORECAST_COLOURS), M - 1 :].double()).cpu().numpy()
    history = data_rms.denormalize(test["obs"][: len(FORECAST_COLOURS), :M].double()).cpu().numpy()
    draw_forecasts(os.path.join(run_dir, "forecasts.png"), task, history, real, shown)
    writer.add_text("prediction_study", "\n".join(table))
    save_checkpoint(os.path.join(run_dir, "prediction_study.pt"), args=asdict(args), obs_rms=data_rms.state_dict(),
                    models=checkpoints)
    print(header + "\n".join(table))
    print(f"done in {duration(time.time() - START)}\n  results      {os.path.join(run_dir, 'prediction_study.md')}\n"
          f"               {os.path.join(run_dir, 'prediction_study.json')}\n"
          f"               {os.path.join(run_dir, 'forecasts.png')}\n"
          f"  TensorBoard  tensorboard --logdir {shlex.quote(run_dir)}")


def horizon_study(args, writer, run_dir, device, rng):
    """Fig. 7: RWM trained with each history horizon M and forecast horizon N of the grid on one dataset; the mean
    relative error of its H-step forecasts on the same held-out windows (each model warms up on the last M steps
    before the forecast), as a table and a heatmap."""
    task, H = TASKS[args.env_id], args.study_eval_horizon
    Ms, Ns = sorted(args.study_history_horizons), sorted(args.study_forecast_horizons)
    STAGES["names"] = ["simulator data"] + [f"M={M} N={N}" for M in Ms for N in Ns]
    start_stage("simulator data")
    train_buf, test_buf, data_rms = study_data(args, task, device)
    top = Ms[-1]
    test = normalized_batch(test_buf, args.study_eval_windows, top + H - 1, data_rms, np.random.default_rng(0), device)
    error = np.zeros((len(Ms), len(Ns)))
    results = {}
    for i, M in enumerate(Ms):
        for j, N in enumerate(Ns):
            start_stage(f"M={M} N={N}")
            model = RWM(task, args.wm_hidden)
            train_time = fit_study_model(f"RWM M={M} N={N}", model, M, N, args.wm_lr, train_buf, data_rms, args,
                                         writer, rng, device)
            forecast = forecast_from(model, test["obs"][:, top - M : top], test["action"][:, top - M :], H)
            e = relative_error(forecast, test["next_obs"][:, top - 1 :])
            error[i, j] = e.mean().item()
            results[f"M={M},N={N}"] = dict(history_horizon=M, forecast_horizon=N, per_step=e.tolist(),
                                           mean=error[i, j], train_time_s=train_time)
    table = ["| M \\ N | " + " | ".join(str(N) for N in Ns) + " |", "|" + " --- |" * (len(Ns) + 1)]
    table += [f"| {M} | " + " | ".join(f"{error[i, j]:.3f}" for j in range(len(Ns))) + " |" for i, M in enumerate(Ms)]
    header = (f"Mean relative autoregressive error of RWM over H={H} forecast steps ({args.study_eval_windows} test "
              f"windows, {args.study_updates} updates each), by history horizon M (rows) and training forecast "
              f"horizon N (columns; N = 1 is teacher forcing).\n\n")
    with open(os.path.join(run_dir, "horizon_study.json"), "w") as f:
        json.dump(dict(env_id=args.env_id, eval_horizon=H, models=results), f, indent=2)
    with open(os.path.join(run_dir, "horizon_study.md"), "w") as f:
        f.write(header + "\n".join(table) + "\n")
    draw_heatmap(os.path.join(run_dir, "horizon_study.png"), error, Ms, Ns)
    writer.add_text("horizon_study", "\n".join(table))
    print(header + "\n".join(table))
    print(f"done in {duration(time.time() - START)}\n  results      {os.path.join(run_dir, 'horizon_study.md')}\n"
          f"               {os.path.join(run_dir, 'horizon_study.json')}\n"
          f"               {os.path.join(run_dir, 'horizon_study.png')}")


def draw_heatmap(path, error, Ms, Ns, cell=90, m=50):
    """Fig. 7's heatmap: one cell per (M, N), darker = lower error, the value written in it."""
    h, w = m + cell * len(Ms), m + cell * len(Ns)
    img = np.full((h + 10, w + 10, 3), 255, np.uint8)
    lo, hi = error.min(), error.max() + 1e-9
    shade = cv2.applyColorMap(np.uint8(255 * (error - lo) / (hi - lo)), cv2.COLORMAP_VIRIDIS)
    for i, M in enumerate(Ms):
        y = m + i * cell
        cv2.putText(img, f"M={M}", (4, y + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        for j, N in enumerate(Ns):
            x = m + j * cell
            colour = tuple(int(c) for c in shade[i, j])
            cv2.rectangle(img, (x, y), (x + cell - 2, y + cell - 2), colour, -1)
            text = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
            cv2.putText(img, f"{error[i, j]:.3f}", (x + 16, y + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, text, 1,
                        cv2.LINE_AA)
    for j, N in enumerate(Ns):
        cv2.putText(img, f"N={N}", (m + j * cell + cell // 2 - 16, m - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0),
                    1, cv2.LINE_AA)
    cv2.imwrite(path, img)


def main():
    STOP.update(armed=False, requested=False, run_dir=None, writer=None)
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        args, ckpt = parse_args()
        if args.resume:
            run_dir = args.resume
        else:
            run_name = f"{args.env_id}__{args.exp_name}__{args.mode}__{args.seed}__{int(time.time())}"
            run_dir = os.path.join(args.runs_dir, run_name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({k: v for k, v in asdict(args).items() if k != "resume"}, f, indent=2)
        purge_step = 0  # TensorBoard drops what a killed process logged after the checkpoint it resumes from
        if ckpt is not None:  # the pretraining logs against its updates, and never loses them to a later purge
            pretraining_axis = args.pretrain_updates if args.mode == "mbpo-ppo" else 0
            purge_step = 1 + (ckpt["pretrain_updates_done"] if in_pretraining(args, ckpt) else
                              max(ckpt["global_step"], pretraining_axis))
        writer = STOP["writer"] = SummaryWriter(run_dir, purge_step=purge_step)
        writer.add_text("hyperparameters",
                        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        if args.mode in ("mbpo-ppo", "ppo-sim"):  # a study keeps no checkpoint to continue from
            STOP["run_dir"] = run_dir

        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.backends.cudnn.deterministic = args.torch_deterministic
        rng = np.random.default_rng(args.seed)
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

        if args.mode == "prediction-study":
            prediction_study(args, writer, run_dir, device, rng)
        elif args.mode == "horizon-study":
            horizon_study(args, writer, run_dir, device, rng)
        else:
            policy_learning(args, writer, run_dir, device, rng, ckpt)
        writer.close()
    except (Interrupted, KeyboardInterrupt) as e:
        print(stop_message(e), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
