"""Simulated stand-ins for the robots of seed 000 (Coupled local and global world models), the play-data
collectors that feed the world models, and the data-file format every script reads.

    PushT-v0        gym-pusht's physics and coverage score, driven like the paper's Flexiv arm (§4.1.1):
                    action = the tool's planar velocity, 5 Hz, 64x64 RGB frames.
    PushTReach-v0   the first rung of the same ladder: the same table, tool, renderer and actions, no T;
                    the tool must reach a target disk (reward -distance / 100, success within 15 px).
    PushTPuck-v0    the second rung: push a round puck onto a target disk (dense reward: the puck's distance
                    to the target and the tool's gap to the puck; success at 90 % overlap).
    EgoPushCube-v0  a robot in a walled room pushes a cube into a goal net (stand-in for the Go2, §4.1.2):
                    action = body velocity command to a first-order low-level controller, 5 Hz,
                    64x64 ego-centric view (heading up, limited field of view), per-frame task labels.

All register with Gymnasium on import and put the true state in `info`. Command line:

    python envs.py collect PushT-v0 --steps 500 --out /tmp/p.npz
    python envs.py collect EgoPushCube-v0 --steps 500 --out /tmp/d.npz --demos
    python envs.py collect PushT-v0 --steps 640 --out /tmp/g.npz --goal-videos
    python envs.py check /tmp/p.npz
"""

import dataclasses
import math
import os
import sys
import time
import warnings
from typing import Annotated, Optional

import cv2
import gymnasium as gym
import numpy as np
import pymunk
import tyro

with warnings.catch_warnings():  # pygame (imported by gym-pusht) warns about pkg_resources
    warnings.simplefilter("ignore")
    from gym_pusht.envs.pusht import PushTEnv as GymPushT

CONTROL_HZ = 5.0
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# Push-T
# ----------------------------------------------------------------------------------------------------
PUSHT_COLORS = {  # RGB, the colours gym-pusht draws with
    "background": (255, 255, 255),
    "wall": (211, 211, 211),
    "goal": (144, 238, 144),
    "block": (119, 136, 153),
    "agent": (65, 105, 225),
}


class PushTEnv(gym.Env):
    """gym-pusht's Push-T with the tool driven by velocity commands instead of gym-pusht's PD loop.

    The agent is gym-pusht's kinematic disk; its velocity is set directly to `action * max_speed` (px/s)
    for 1/5 s (20 physics substeps of 0.01 s), and clipped so the disk stays inside the walls.
    Coverage, reward (coverage / 0.95, clipped to 1) and success (coverage > 0.95) are gym-pusht's.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    goal_pose = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's target pose of the T (x, y, angle)
    dt, substeps = 0.01, int(1 / (0.01 * CONTROL_HZ))

    def __init__(self, max_speed: float = 200.0, obs_size: int = 64, render_mode: str = "rgb_array"):
        self.max_speed, self.obs_size, self.render_mode = max_speed, obs_size, render_mode
        self.sim = GymPushT(obs_type="state")
        self.observation_space = gym.spaces.Box(0, 255, (obs_size, obs_size, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.agent_bounds = (5 + 2 + 15, 506 - 2 - 15)  # wall line +- wall radius +- agent radius

    def _set_state(self, state):
        sim = self.sim
        sim._setup()
        sim.agent.position = tuple(state[:2])
        # gym-pusht sets the block's position before its angle, which rotates the T about its centre of
        # gravity (not its origin) and so misplaces it; set the angle first.
        sim.block.angle = float(state[4])
        sim.block.position = tuple(state[2:4])
        sim.space.step(self.dt)  # resolve any initial overlap, as gym-pusht does

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options is not None and options.get("state") is not None:
            state = np.asarray(options["state"], dtype=np.float64)
        else:
            state = self._initial_state(self.np_random)
        self._set_state(state)
        return self._render_frame(self.obs_size), self._info()

    def _initial_state(self, r):  # gym-pusht's initial-state distribution
        return np.array([r.integers(50, 450), r.integers(50, 450), r.integers(100, 400), r.integers(100, 400),
                         r.uniform(-np.pi, np.pi)], dtype=np.float64)

    def _reward(self, info):
        return float(np.clip(info["coverage"] / self.sim.success_threshold, 0.0, 1.0))

    def step(self, action):
        sim = self.sim
        velocity = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0) * self.max_speed
        lo, hi = self.agent_bounds
        for _ in range(self.substeps):
            position = np.array(sim.agent.position)
            target = np.clip(position + velocity * self.dt, lo, hi)
            sim.agent.velocity = tuple((target - position) / self.dt)
            sim.space.step(self.dt)
        sim.agent.velocity = (0.0, 0.0)
        info = self._info()
        return self._render_frame(self.obs_size), self._reward(info), info["is_success"], False, info

    def _info(self):
        sim = self.sim
        coverage = sim._get_coverage()
        touching = sim.space.shape_query(next(iter(sim.agent.shapes)))
        return {
            "state": self.state,
            "coverage": coverage,
            "distance": pusht_block_distance(self.state),
            "is_success": bool(coverage > sim.success_threshold),
            "contact": any(q.shape.body is sim.block for q in touching),
        }

    @property
    def state(self):
        """(agent x, agent y, block x, block y, block angle in [0, 2 pi)) in gym-pusht's pixel units."""
        a, b = self.sim.agent.position, self.sim.block.position
        return np.array([a.x, a.y, b.x, b.y, self.sim.block.angle % (2 * np.pi)], dtype=np.float32)

    def _render_frame(self, size):
        """The observation: drawn at 64x64 and area-resized to `size` (envs.resize_frame), the one rendering path of
        every frame a model sees (data files hold 64x64 frames that the scripts area-resize the same way)."""
        return resize_frame(self._draw(FRAME_SIZE), size)

    def _draw(self, size):
        # The scene gym-pusht draws with pygame, drawn with OpenCV at 2x and area-downsampled (10x faster).
        sim, s, shift = self.sim, 2 * size / 512, 4
        img = np.full((2 * size, 2 * size, 3), PUSHT_COLORS["background"], np.uint8)
        wall = max(1, round(4 * s))
        cv2.rectangle(img, (round(5 * s), round(5 * s)), (round(506 * s), round(506 * s)), PUSHT_COLORS["wall"], wall)
        self._draw_task(img, s, shift)
        center = np.round(np.array(sim.agent.position) * s * 2**shift).astype(int)
        cv2.circle(img, tuple(center), round(15 * s * 2**shift), PUSHT_COLORS["agent"], -1, cv2.LINE_AA, shift)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    def _draw_task(self, img, s, shift):
        """The goal T in green, then the T."""
        sim = self.sim

        def fill(body, color):
            # the T's two boxes in a fixed order: body.shapes is a set, and the anti-aliased seam where the boxes
            # overlap depends on which is drawn last, so set order made the same state render 1 level apart
            for shape in sorted(sim.block.shapes, key=lambda shape: [tuple(v) for v in shape.get_vertices()]):
                pts = np.array([body.local_to_world(v) for v in shape.get_vertices()]) * s
                cv2.fillPoly(img, [np.round(pts * 2**shift).astype(np.int32)], color, cv2.LINE_AA, shift)

        fill(sim.get_goal_pose_body(self.goal_pose), PUSHT_COLORS["goal"])
        fill(sim.block, PUSHT_COLORS["block"])

    def render(self):
        return self._draw(256)


FRAME_SIZE = 64  # every simulator frame is drawn at this size; models see it area-resized (resize_frame)


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (H, W, 3) frame area-resized to (size, size, 3): the one way frames change resolution, at collection,
    in a script's data loading, at evaluation and for the goal image."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


class PushTReachEnv(PushTEnv):
    """The first rung of the Push-T ladder (DESIGN.md): PushT-v0's table, tool, renderer, 5 Hz velocity actions and
    frames without the T; the tool must reach a target disk drawn at the table's centre (in the goal's green, the
    tool's size). Reward -distance / 100 (px of the 512 px table); success, which ends the episode, when the tool's
    centre is within `success_distance` px of the target's."""

    target = np.array([256.0, 256.0])
    success_distance = 15.0  # the tool's radius

    def _set_state(self, state):
        sim = self.sim
        sim._setup()
        sim.space.remove(sim.block, *sim.block.shapes)  # no object on this rung
        sim.agent.position = tuple(state[:2])
        sim.space.step(self.dt)

    def _initial_state(self, r):
        return np.array([r.integers(50, 450), r.integers(50, 450)], dtype=np.float64)

    def _reward(self, info):
        return -info["distance"] / 100.0

    def _info(self):
        distance = float(np.linalg.norm(self.state - self.target))
        return {"state": self.state, "distance": distance, "is_success": distance < self.success_distance,
                "contact": False}

    @property
    def state(self):
        """(tool x, tool y) in gym-pusht's pixel units."""
        a = self.sim.agent.position
        return np.array([a.x, a.y], dtype=np.float32)

    def _draw_task(self, img, s, shift):
        center = np.round(self.target * s * 2**shift).astype(int)
        cv2.circle(img, tuple(center), round(15 * s * 2**shift), PUSHT_COLORS["goal"], -1, cv2.LINE_AA, shift)


class PushTPuckEnv(PushTReachEnv):
    """The second rung of the Push-T ladder: a round puck instead of the T (no orientation), pushed by the same tool
    onto a target disk of the puck's size at the table's centre. Coverage is the overlap of the puck with the
    target; success (which ends the episode) above 0.9 (gym-pusht: 0.95 for the T). The reward is dense, as
    first-order methods need: -(the puck's distance to the target + half the tool's gap to the puck) / 100; a
    coverage reward has no gradient until the tool touches the puck (the gate finds one at 12 of 256 play
    states of Push-T, and DMO-SAPO with the oracle learned nothing on it: results/dmo_sapo_diamond.md)."""

    puck_radius, success_coverage = 40.0, 0.9

    def _set_state(self, state):
        sim = self.sim
        sim._setup()
        sim.space.remove(sim.block, *sim.block.shapes)
        body = pymunk.Body(1.0, pymunk.moment_for_circle(1.0, 0, self.puck_radius))
        shape = pymunk.Circle(body, self.puck_radius)
        body.position, body.friction = tuple(state[2:4]), 1
        sim.space.add(body, shape)
        sim.block = body  # gym-pusht's name for the object: contact and play strokes read it
        sim.agent.position = tuple(state[:2])
        sim.space.step(self.dt)

    def _initial_state(self, r):
        return np.array([r.integers(50, 450), r.integers(50, 450), r.integers(100, 400), r.integers(100, 400)],
                        dtype=np.float64)

    def step(self, action):
        out = super().step(action)
        self.sim.block.velocity, self.sim.block.angular_velocity = (0.0, 0.0), 0.0  # quasi-static, as the T
        return out

    def _reward(self, info):
        tool, puck = info["state"][:2], info["state"][2:]
        gap = max(0.0, float(np.linalg.norm(tool - puck)) - self.puck_radius - 15.0)  # 15: the tool's radius
        return -(info["distance"] + 0.5 * gap) / 100.0

    def _info(self):
        sim = self.sim
        distance = float(np.linalg.norm(np.array(sim.block.position) - self.target))
        r = self.puck_radius  # overlap of two discs of radius r at this distance, over one disc's area
        coverage = 0.0 if distance >= 2 * r else (2 * r * r * math.acos(distance / (2 * r))
                                                   - distance / 2 * math.sqrt(4 * r * r - distance**2)) / (math.pi * r * r)
        touching = sim.space.shape_query(next(iter(sim.agent.shapes)))
        return {"state": self.state, "coverage": coverage, "distance": distance,
                "is_success": coverage > self.success_coverage,
                "contact": any(q.shape.body is sim.block for q in touching)}

    @property
    def state(self):
        """(tool x, tool y, puck x, puck y) in gym-pusht's pixel units."""
        a, b = self.sim.agent.position, self.sim.block.position
        return np.array([a.x, a.y, b.x, b.y], dtype=np.float32)

    def _draw_task(self, img, s, shift):
        for xy, colour in ((self.target, PUSHT_COLORS["goal"]), (np.array(self.sim.block.position), PUSHT_COLORS["block"])):
            center = np.round(xy * s * 2**shift).astype(int)
            cv2.circle(img, tuple(center), round(self.puck_radius * s * 2**shift), colour, -1, cv2.LINE_AA, shift)


def pusht_block_distance(state) -> float:
    """Distance (px of the 512 px workspace) of the T's position from its target: progress that coverage, which
    stays 0 until the T overlaps its target, does not show."""
    return float(np.linalg.norm(np.asarray(state[2:4], dtype=np.float64) - PushTEnv.goal_pose[:2]))


def pusht_goal_image(size: int = 64, agent_xy=(256.0, 400.0)) -> np.ndarray:
    """The goal frame for the contrastive reward: the T at its target pose, the tool at `agent_xy`."""
    env = PushTEnv(obs_size=size)
    obs, info = env.reset(options={"state": [*agent_xy, *PushTEnv.goal_pose]})
    assert info["coverage"] > 0.99, f"goal image has coverage {info['coverage']:.3f}"
    return obs


def goal_image(env_id: str, size: int = 64) -> np.ndarray:
    """The goal frame of a Push-T ladder task: the T at its target (PushT-v0), the tool on the target (PushTReach-v0)."""
    if env_id == "PushTReach-v0":
        return PushTReachEnv(obs_size=size).reset(options={"state": PushTReachEnv.target})[0]
    if env_id == "PushTPuck-v0":
        return PushTPuckEnv(obs_size=size).reset(options={"state": [256.0, 400.0, *PushTPuckEnv.target]})[0]
    return pusht_goal_image(size)


def goal_start_state(env_id: str, rng: np.random.Generator) -> np.ndarray:
    """A state at the goal from which play moves away (goal videos): the T on its target and the tool 90-150 px
    from it (PushT-v0), the tool on the target (PushTReach-v0)."""
    if env_id == "PushTReach-v0":
        return PushTReachEnv.target.copy()
    angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(90, 150)
    if env_id == "PushTPuck-v0":
        return np.array([*(PushTPuckEnv.target + radius * np.array([np.cos(angle), np.sin(angle)])), *PushTPuckEnv.target])
    angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(90, 150)
    tool = np.array([256.0, 256.0]) + radius * np.array([np.cos(angle), np.sin(angle)])
    return np.array([*tool, *PushTEnv.goal_pose])


def task_rewards(env_id: str, states: np.ndarray) -> np.ndarray:
    """The simulator's reward for arriving in each of the (N, S) states: what an oracle reward head learns."""
    env = gym.make(env_id).unwrapped
    return np.array([env._reward(env.reset(options={"state": s})[1]) for s in states], np.float32)


def state_observation(states: np.ndarray) -> np.ndarray:
    """A Push-T ladder state (..., S) as a vector observation in about [-1, 1]: positions / 256 - 1, the T's angle
    / pi - 1. What a state-based local model sees (the original DMO paper's setting)."""
    states = np.asarray(states, np.float32)
    scale = np.array([256.0, 256.0, 256.0, 256.0, np.pi], np.float32)[: states.shape[-1]]  # reach 2, puck 4, T 5
    return states / scale - 1.0


def reach_play_policy(env: PushTReachEnv, rng: np.random.Generator):
    """High-entropy play without an object: smooth random motions (Ornstein-Uhlenbeck noise) mixed with strokes
    toward random points of the table, so the tool visits all of it at every speed."""
    noise, target, steps_left = np.zeros(2), None, 0

    def act(obs, info):
        nonlocal noise, target, steps_left
        if steps_left <= 0:  # new stroke
            steps_left = int(rng.integers(3, 12))
            target = rng.uniform(40, 472, 2) if rng.random() < 0.6 else None
        steps_left -= 1
        noise = 0.7 * noise + 0.5 * rng.normal(size=2)
        if target is None:
            return np.clip(noise, -1, 1).astype(np.float32)
        return np.clip((target - info["state"][:2]) / rng.uniform(40, 120) + 0.3 * noise, -1, 1).astype(np.float32)

    return act




def pusht_play_policy(env: PushTEnv, rng: np.random.Generator):
    """High-entropy play: smooth random motions (Ornstein-Uhlenbeck noise) mixed with strokes that aim at
    a random point beside the T and push through it, so the tool touches the block often."""
    noise, target, steps_left = np.zeros(2), None, 0

    def act(obs, info):
        nonlocal noise, target, steps_left
        if steps_left <= 0:  # new stroke
            steps_left = int(rng.integers(4, 16))
            target = None
            if rng.random() < 0.75:
                block = np.array(env.sim.block.local_to_world(env.sim.block.center_of_gravity))
                target = block + rng.normal(0.0, 45.0, 2)
        steps_left -= 1
        noise = 0.7 * noise + 0.5 * rng.normal(size=2)
        if target is None:
            return np.clip(noise, -1, 1).astype(np.float32)
        to_target = target - info["state"][:2]
        return np.clip(to_target / 60.0 + 0.3 * noise, -1, 1).astype(np.float32)

    return act


PLAY_POLICIES = {"PushT-v0": pusht_play_policy, "PushTReach-v0": reach_play_policy, "PushTPuck-v0": pusht_play_policy}


def pusht_goal_videos(episodes: int, length: int = 64, seed: int = 0, obs_size: int = 64,
                      env_id: str = "PushT-v0") -> dict:
    """Videos that end at the goal, for the reward model (ALGORITHMS.md §4 trains it on play "and optional
    demonstration video"). Nothing here solves the task: each episode starts at the goal (`goal_start_state`),
    play moves away from it, and the frames are stored backward in time. With a real robot: put the T on its
    target, play, record, reverse. Actions are zero (a reversed push is no transition of the physics), so these
    files train the reward model only."""
    env = gym.make(env_id, obs_size=obs_size).unwrapped
    rng = np.random.default_rng(seed)
    obs_eps, state_eps = [], []
    for _ in range(episodes):
        obs, info = env.reset(options={"state": goal_start_state(env_id, rng)})
        policy = PLAY_POLICIES[env_id](env, rng)
        frames, states = [obs], [info["state"]]
        while len(frames) < length:
            obs, _, _, _, info = env.step(policy(obs, info))
            frames.append(obs)
            states.append(info["state"])
        obs_eps.append(np.stack(frames[::-1]))
        state_eps.append(np.stack(states[::-1]))
    n = episodes * length
    return {
        "obs": np.concatenate(obs_eps), "action": np.zeros((n, 2), np.float32),
        "is_first": np.arange(n) % length == 0, "is_demo": np.ones(n, bool),
        "state": np.concatenate(state_eps).astype(np.float32),
        "env_id": np.array(env_id), "control_hz": np.array(CONTROL_HZ), "format_version": np.array(FORMAT_VERSION),
    }


# ----------------------------------------------------------------------------------------------------
# Ego-centric Push-Cube
# ----------------------------------------------------------------------------------------------------
ROOM_W, ROOM_H = 5.0, 4.0  # m, walls along x = 0, 5 and y = 0, 4
NET = (4.4, 5.0, 1.4, 2.6)  # goal net: x0, x1, y0, y1 (its back is the wall x = 5)
NET_CENTER = np.array([4.7, 2.0])
CUBE_HALF = 0.15  # m
ROBOT_SIZE = (0.6, 0.34)  # m, length (along heading) x width
MAX_COMMAND = np.array([0.6, 0.3, 1.0])  # forward m/s, lateral m/s, yaw rate rad/s at |action| = 1
CONTROLLERS = {  # first-order response dv/dt = (gain * v_cmd - v) / tau, per axis (forward, lateral, yaw)
    "default": {"tau": 0.15, "gain": (1.0, 1.0, 1.0)},
    "alt": {"tau": 0.4, "gain": (0.8, 0.7, 1.25)},  # slower, weaker translation, stronger yaw (Fig. 12)
}
EGO_COLORS = {"floor": (200, 190, 170), "wall": (70, 70, 80), "net": (245, 245, 245), "post": (220, 40, 40),
              "cube": (255, 140, 0), "robot": (40, 90, 200)}
SCENE_POINTS = np.array([(0, 0), (ROOM_W, 0), (ROOM_W, ROOM_H), (0, ROOM_H),  # floor polygon
                         (NET[0], NET[2]), (NET[1], NET[2]), (NET[1], NET[3]), (NET[0], NET[3]),  # net polygon
                         (0, 0), (ROOM_W, 0), (ROOM_W, 0), (ROOM_W, ROOM_H), (ROOM_W, ROOM_H), (0, ROOM_H), (0, ROOM_H), (0, 0),  # walls
                         (NET[0], NET[2]), (NET[1], NET[2]), (NET[0], NET[3]), (NET[1], NET[3])], float)  # posts
SCENE_LINE_COLORS = [EGO_COLORS["wall"]] * 4 + [EGO_COLORS["post"]] * 2
EGO_STARTS = ("full", "near")  # start distributions: anywhere in the room; the last stage (cube before the net)


class EgoPushCubeEnv(gym.Env):
    """Push a cube into a goal net with a mobile robot seen through its own camera.

    The robot is a box driven, like pymunk's top-down "tank" example, by a kinematic control body through
    a pivot and a gear joint with bounded force, so walls stop it. The cube slides on the floor with
    Coulomb friction (same joints to the static body). Observation: a 64x64 top-down view centred ahead of
    the robot, heading up, masked to a +-55 degree field of view; what is beside or behind is not seen.
    Labels (the operator's button presses of the paper): 0 other, 1 pushing the cube toward the goal,
    2 success. Reward: 1 while pushing toward the goal, 10 on success (terminal).
    start="near" starts every episode at the task's last stage (cube before the net, robot behind it): an easier
    rung of the same task.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    dt, substeps = 0.02, 10
    view = 3.0  # m, width and depth of the ego-centric view
    fov = math.radians(55)  # half angle

    def __init__(self, controller: str = "default", obs_size: int = 64, render_mode: str = "rgb_array",
                 start: str = "full"):
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {sorted(CONTROLLERS)}, got {controller!r}")
        if start not in EGO_STARTS:
            raise ValueError(f"start must be one of {EGO_STARTS}, got {start!r}")
        self.controller, self.obs_size, self.render_mode, self.start = controller, obs_size, render_mode, start
        self.tau, self.gain = CONTROLLERS[controller]["tau"], np.array(CONTROLLERS[controller]["gain"])
        self.observation_space = gym.spaces.Box(0, 255, (obs_size, obs_size, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        # pixel grid of the ego view: robot centre at the bottom centre, 1 pixel = view width / size
        self.px_per_m = obs_size / self.view
        self.cam = np.array([obs_size / 2, obs_size - 0.5 * ROBOT_SIZE[0] * self.px_per_m])
        u, v = np.meshgrid(np.arange(obs_size) + 0.5, np.arange(obs_size) + 0.5)
        self.fov_mask = np.abs(np.arctan2(u - self.cam[0], self.cam[1] - v)) <= self.fov

    # -- physics --------------------------------------------------------------------------------------
    def _build(self, robot_pose, cube_pose):
        self.space = space = pymunk.Space()
        for a, b in SCENE_POINTS[8:20].reshape(6, 2, 2):  # walls and net posts
            seg = pymunk.Segment(space.static_body, tuple(a), tuple(b), 0.03)
            seg.friction = 0.5
            space.add(seg)

        def friction_joints(body, force, torque):  # top-down Coulomb friction against the floor
            pivot = pymunk.PivotJoint(space.static_body, body, (0, 0), (0, 0))
            gear = pymunk.GearJoint(space.static_body, body, 0.0, 1.0)
            pivot.max_bias, pivot.max_force, gear.max_bias, gear.max_force = 0, force, 0, torque
            space.add(pivot, gear)

        self.cube = pymunk.Body(1.0, pymunk.moment_for_box(1.0, (2 * CUBE_HALF, 2 * CUBE_HALF)))
        cube_shape = pymunk.Poly.create_box(self.cube, (2 * CUBE_HALF, 2 * CUBE_HALF))
        cube_shape.friction, cube_shape.collision_type = 0.6, 2
        self.cube.position, self.cube.angle = tuple(cube_pose[:2]), float(cube_pose[2])
        space.add(self.cube, cube_shape)
        friction_joints(self.cube, 0.5 * 9.81, 0.2)

        self.robot = pymunk.Body(15.0, pymunk.moment_for_box(15.0, ROBOT_SIZE))
        robot_shape = pymunk.Poly.create_box(self.robot, ROBOT_SIZE, radius=0.02)
        robot_shape.friction, robot_shape.collision_type = 0.6, 1
        self.robot.position, self.robot.angle = tuple(robot_pose[:2]), float(robot_pose[2])
        self.control = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.control.position, self.control.angle = self.robot.position, self.robot.angle
        space.add(self.robot, robot_shape, self.control)
        pivot = pymunk.PivotJoint(self.control, self.robot, (0, 0), (0, 0))
        gear = pymunk.GearJoint(self.control, self.robot, 0.0, 1.0)
        pivot.max_bias, pivot.max_force, gear.max_bias, gear.max_force = 0, 400.0, 0, 100.0
        space.add(pivot, gear)

        self.touching = False
        handler = space.add_collision_handler(1, 2)
        handler.post_solve = lambda arbiter, space, data: setattr(self, "touching", True)
        self.body_velocity = np.zeros(3)  # (forward, lateral, yaw rate) of the low-level controller

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        options = options or {}
        r = self.np_random
        robot = options.get("robot_pose")
        cube = options.get("cube_pose")
        if self.start == "near" and robot is None and cube is None:
            # the task's last stage: the cube 0.9-1.7 m before the net, the robot 0.6-1 m behind it, within 0.5 rad of
            # the line from the cube to the net, facing the cube within 0.4 rad (driving straight ahead succeeds in 42 of
            # 100 episodes of 200 steps, random actions in 1, standing still in 0)
            cube = [r.uniform(3.0, 3.8), r.uniform(1.5, 2.5), r.uniform(-np.pi, np.pi)]
            line = math.atan2(NET_CENTER[1] - cube[1], NET_CENTER[0] - cube[0]) + r.uniform(-0.5, 0.5)
            back = r.uniform(0.6, 1.0)
            x, y = cube[0] - back * math.cos(line), cube[1] - back * math.sin(line)
            robot = [x, y, math.atan2(cube[1] - y, cube[0] - x) + r.uniform(-0.4, 0.4)]
        if robot is None:
            robot = [r.uniform(0.5, 2.8), r.uniform(0.5, 3.5), r.uniform(-np.pi, np.pi)]
        if cube is None:
            while cube is None or np.linalg.norm(np.subtract(cube[:2], robot[:2])) < 0.7:
                cube = [r.uniform(1.2, 3.8), r.uniform(0.6, 3.4), r.uniform(-np.pi, np.pi)]
        self._build(np.asarray(robot, float), np.asarray(cube, float))
        return self._ego_frame(), self._info(label=0)

    def step(self, action):
        command = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0) * MAX_COMMAND
        cube_before = np.array(self.cube.position)
        alpha = 1.0 - math.exp(-self.dt / self.tau)
        self.touching = False
        for _ in range(self.substeps):
            self.body_velocity += alpha * (self.gain * command - self.body_velocity)  # first-order response
            c, s = math.cos(self.robot.angle), math.sin(self.robot.angle)
            fwd, lat, yaw_rate = self.body_velocity
            self.control.velocity = (c * fwd - s * lat, s * fwd + c * lat)
            self.control.angular_velocity = yaw_rate
            self.space.step(self.dt)
        success = self.cube_in_net()
        progress = np.linalg.norm(cube_before - NET_CENTER) - np.linalg.norm(np.array(self.cube.position) - NET_CENTER)
        label = 2 if success else int(self.touching and progress > 0.01)
        reward = 10.0 if success else float(label == 1)
        return self._ego_frame(), reward, success, False, self._info(label)

    def cube_in_net(self):
        x, y = self.cube.position
        return bool(x > NET[0] + CUBE_HALF and NET[2] < y < NET[3])

    def _info(self, label):
        robot = np.array([*self.robot.position, self.robot.angle], dtype=np.float32)
        cube = np.array([*self.cube.position, self.cube.angle], dtype=np.float32)
        return {
            "state": np.concatenate([robot, cube]),
            "robot_pose": robot,
            "cube_pose": cube,
            "is_success": self.cube_in_net(),
            "label": label,
            "contact": self.touching,
        }

    # -- rendering -----------------------------------------------------------------------------------
    def _draw(self, img, A, b, thickness):
        """Draw the scene into `img` through the affine map world metres -> pixels, p -> A p + b."""
        bodies = [[body.local_to_world(v) for v in next(iter(body.shapes)).get_vertices()]
                  for body in (self.cube, self.robot)]
        pts = np.concatenate([SCENE_POINTS, np.array(bodies[0] + bodies[1])]) @ A.T + b
        pts = np.round(pts * 16).astype(np.int32)  # 4 bits of sub-pixel precision (shift=4)
        cv2.fillPoly(img, [pts[0:4]], EGO_COLORS["floor"], cv2.LINE_AA, 4)
        cv2.fillPoly(img, [pts[4:8]], EGO_COLORS["net"], cv2.LINE_AA, 4)
        for i, color in zip(range(8, 20, 2), SCENE_LINE_COLORS):
            cv2.line(img, tuple(pts[i]), tuple(pts[i + 1]), color, thickness, cv2.LINE_AA, 4)
        n = len(bodies[0])
        cv2.fillPoly(img, [pts[20:20 + n]], EGO_COLORS["cube"], cv2.LINE_AA, 4)
        cv2.fillPoly(img, [pts[20 + n:]], EGO_COLORS["robot"], cv2.LINE_AA, 4)

    def _ego_frame(self):
        yaw = self.robot.angle
        # robot frame, heading up: image x grows to the robot's right, image y grows backwards
        A = -self.px_per_m * np.array([[-math.sin(yaw), math.cos(yaw)], [math.cos(yaw), math.sin(yaw)]])
        img = np.zeros((self.obs_size, self.obs_size, 3), np.uint8)
        self._draw(img, A, self.cam - A @ np.array(self.robot.position), max(1, round(0.06 * self.px_per_m)))
        img[~self.fov_mask] = 0
        return img

    def render(self):
        """Top-down view of the whole room with the camera's field of view, for videos."""
        scale = 256 / ROOM_W
        size = (int(ROOM_H * scale), 256)
        img = np.zeros((*size, 3), np.uint8)
        self._draw(img, np.diag([scale, -scale]), np.array([0.0, ROOM_H * scale]), 2)
        x, y, yaw = *self.robot.position, self.robot.angle
        for side in (-1, 1):
            end = (x + 1.5 * math.cos(yaw + side * self.fov), y + 1.5 * math.sin(yaw + side * self.fov))
            cv2.line(img, (int(x * scale), int((ROOM_H - y) * scale)),
                     (int(end[0] * scale), int((ROOM_H - end[1]) * scale)), (255, 255, 0), 1, cv2.LINE_AA)
        return img


def push_cube_demonstrator(env: EgoPushCubeEnv, rng: np.random.Generator, noise: float = 0.25):
    """Scripted, privileged operator: go behind the cube (seen from the net), face the net, push.

    Noisy (Ornstein-Uhlenbeck noise on the command, occasional pauses) and imperfect, like human
    demonstrations: it cuts corners around the cube and sometimes knocks it off line.
    """
    ou = np.zeros(3)
    pause = 0

    def act(obs, info):
        nonlocal ou, pause
        x, y, yaw = info["robot_pose"]
        robot, cube = np.array([x, y]), info["cube_pose"][:2].astype(float)
        push_dir = (NET_CENTER - cube) / (np.linalg.norm(NET_CENTER - cube) + 1e-6)
        behind = cube - push_dir * (CUBE_HALF + ROBOT_SIZE[0] / 2 + 0.12)
        rel = robot - cube
        along, across = rel @ push_dir, rel @ np.array([-push_dir[1], push_dir[0]])
        if along < -0.2 and abs(across) < 0.12:  # lined up behind the cube: push through it to the net
            target, heading = NET_CENTER + push_dir, math.atan2(*push_dir[::-1])
        else:
            target = behind
            if along > -0.3 and abs(across) < 0.5:  # on the wrong side: go round the cube first
                side = np.sign(across) if across != 0 else 1.0
                target = cube + 0.65 * side * np.array([-push_dir[1], push_dir[0]]) - 0.3 * push_dir
            to = target - robot
            heading = math.atan2(to[1], to[0]) if np.linalg.norm(to) > 0.3 else math.atan2(*push_dir[::-1])
        c, s = math.cos(yaw), math.sin(yaw)
        error = target - robot
        body_err = np.array([c * error[0] + s * error[1], -s * error[0] + c * error[1]])
        yaw_err = (heading - yaw + np.pi) % (2 * np.pi) - np.pi
        command = np.array([1.5 * body_err[0], 1.5 * body_err[1], 2.0 * yaw_err]) / MAX_COMMAND
        command[:2] *= max(0.0, math.cos(yaw_err))  # turn before driving
        ou = 0.8 * ou + noise * rng.normal(size=3)
        if pause > 0 or rng.random() < 0.02:
            pause = pause - 1 if pause > 0 else int(rng.integers(2, 6))
            command = np.zeros(3)
        return np.clip(command + ou, -1, 1).astype(np.float32)

    return act


def push_cube_play_policy(env: EgoPushCubeEnv, rng: np.random.Generator):
    """High-entropy play: wandering (smooth random commands), pushing the cube in random directions, and
    bouts of the demonstrator, switched every few seconds."""
    demo = push_cube_demonstrator(env, rng, noise=0.4)
    noise, mode, steps_left, aim = np.zeros(3), "wander", 0, np.zeros(2)

    def act(obs, info):
        nonlocal noise, mode, steps_left, aim
        if steps_left <= 0:
            mode = rng.choice(["wander", "push", "demo"], p=[0.35, 0.4, 0.25])
            steps_left = int(rng.integers(8, 30))
            aim = rng.normal(0.0, 0.3, 2)
        steps_left -= 1
        noise = 0.8 * noise + 0.35 * rng.normal(size=3)
        if mode == "demo":
            return demo(obs, info)
        if mode == "wander":
            return np.clip(noise + np.array([0.3, 0.0, 0.0]), -1, 1).astype(np.float32)
        x, y, yaw = info["robot_pose"]
        to = info["cube_pose"][:2] + aim - np.array([x, y])
        yaw_err = (math.atan2(to[1], to[0]) - yaw + np.pi) % (2 * np.pi) - np.pi
        command = np.array([0.9 * math.cos(yaw_err), 0.0, 2.0 * yaw_err / MAX_COMMAND[2]])
        return np.clip(command + 0.5 * noise, -1, 1).astype(np.float32)

    return act


def push_cube_metrics(robot_poses: np.ndarray) -> dict:
    """Paper Table 1 on one episode's (T, 3) robot poses: straightness = displacement / path length,
    curvature = total |yaw change| per metre travelled."""
    xy, yaw = robot_poses[:, :2], robot_poses[:, 2]
    path = float(np.linalg.norm(np.diff(xy, axis=0), axis=1).sum())
    turn = float(np.abs((np.diff(yaw) + np.pi) % (2 * np.pi) - np.pi).sum())
    return {"straightness": float(np.linalg.norm(xy[-1] - xy[0])) / max(path, 1e-6), "curvature": turn / max(path, 1e-6)}


gym.register("PushT-v0", entry_point=PushTEnv, max_episode_steps=200)
gym.register("PushTReach-v0", entry_point=PushTReachEnv, max_episode_steps=50)
gym.register("PushTPuck-v0", entry_point=PushTPuckEnv, max_episode_steps=100)
gym.register("EgoPushCube-v0", entry_point=EgoPushCubeEnv, max_episode_steps=200)


# ----------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------
class DatasetError(ValueError):
    """A data file that does not follow the format; the message names the file and the key."""


def validate_dataset(data: dict, path: str = "<memory>") -> None:
    def fail(key, msg):
        raise DatasetError(f"{path}: key '{key}': {msg}")

    for key in ("obs", "action", "is_first"):
        if key not in data:
            fail(key, "missing (required keys: obs, action, is_first)")
    obs, action, is_first = data["obs"], data["action"], data["is_first"]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3:
        fail("obs", f"expected uint8 [N, H, W, 3], got {obs.dtype} {list(obs.shape)}")
    n = len(obs)
    if n == 0:
        fail("obs", "no frames (empty episode)")
    if action.dtype != np.float32 or action.ndim != 2 or len(action) != n:
        fail("action", f"expected float32 [{n}, A], got {action.dtype} {list(action.shape)}")
    if not np.isfinite(action).all():
        i = int(np.flatnonzero(~np.isfinite(action).all(axis=1))[0])
        fail("action", f"{'NaN' if np.isnan(action[i]).any() else 'infinite'} values (row {i}: {action[i].tolist()})")
    if np.abs(action).max() > 1.0 + 1e-6:
        i = int(np.argmax(np.abs(action).max(axis=1)))
        fail("action", f"values outside [-1, 1] (row {i}: {action[i].tolist()})")
    if is_first.dtype != np.bool_ or is_first.shape != (n,):
        fail("is_first", f"expected bool [{n}], got {is_first.dtype} {list(is_first.shape)}")
    if not is_first[0]:
        fail("is_first", "the first frame must start an episode")
    starts = np.flatnonzero(is_first)
    lengths = np.diff(np.append(starts, n))
    if lengths.min() < 2:
        k = int(np.argmin(lengths))
        fail("is_first", f"episode {k} (frame {starts[k]}) has {lengths[k]} frame; an episode needs >= 2")
    optional = {"reward_label": "ifub", "is_demo": "b", "state": "f"}
    for key, kinds in optional.items():
        if key in data:
            v = data[key]
            if v.dtype.kind not in kinds or len(v) != n or v.ndim != (2 if key == "state" else 1):
                fail(key, f"wrong dtype or shape {v.dtype} {list(v.shape)} for {n} frames")


def save_dataset(path: str, data: dict) -> None:
    """Validate, then write atomically (a temporary file, then os.replace), compressed."""
    validate_dataset(data, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **data)
    os.replace(tmp, path)


def load_dataset(path: str) -> dict:
    """Load and validate a data file; any problem is a DatasetError naming the file and the key."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # a .npz file is a zip archive
            raise DatasetError(f"{path}: not a valid .npz data file (not a zip archive of arrays; README: the data file)")
    data, key = {}, None
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                data[key] = f[key]
    except ValueError as e:
        if "allow_pickle" in str(e):  # an array of Python objects: never unpickled from a data file
            raise DatasetError(f"{path}: key '{key}': an array of Python objects, not a valid .npz data file of "
                               f"numbers (README: Bring your own robot data)") from None
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    except Exception as e:  # truncated or corrupt
        raise DatasetError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    validate_dataset(data, path)
    return data


def episode_bounds(is_first: np.ndarray) -> list:
    """[(start, end), ...] of the episodes in a data file (end exclusive)."""
    starts = np.flatnonzero(is_first)
    return list(zip(starts.tolist(), np.append(starts[1:], len(is_first)).tolist()))


def record_episode(env, policy, max_frames: int, seed: int, after_success: int = 0):
    """Run `policy` for one episode (at most `max_frames` frames). Returns the frames' records and
    whether the episode ended in success. The last frame gets a zero action: no frame of the same
    episode follows it, so that action is never part of a transition. With `after_success`, an episode that
    succeeds goes on for that many more frames (the simulator stepped past its termination, as an operator's
    play goes on after the goal; each frame labelled as the simulator labels it, 2 while the cube is in the net)."""
    def record(obs, info, action):
        return {"obs": obs, "action": action, "label": info.get("label", 0), "state": info["state"],
                "contact": info["contact"]}

    obs, info = env.reset(seed=seed)
    frames = []
    while True:
        action = policy(obs, info)
        frames.append(record(obs, info, action))
        if len(frames) == max_frames:
            break
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:  # keep the final frame: it may be the success frame
            frames.append(record(obs, info, action))
            break
    success = bool(info["is_success"])
    for _ in range(after_success if success else 0):
        if len(frames) == max_frames:
            break
        frames[-1]["action"] = action = policy(obs, info)
        obs, _, _, _, info = env.unwrapped.step(action)
        frames.append(record(obs, info, action))
    frames[-1]["action"] = np.zeros_like(action)
    return frames, success


PROGRESS_FRAMES = 10_000  # collections of at least this many frames print a progress line every 10 %


def collect(env_id: str, steps: int, seed: int = 0, demo_fraction: float = 0.0, verbose: bool = True,
            max_episodes: Optional[int] = None, after_success: int = 0, **env_kwargs) -> dict:
    """Record `steps` frames (or, with `max_episodes`, that many whole episodes) from the simulator: play episodes,
    and scripted demonstrations for a `demo_fraction` of the frames (EgoPushCube-v0 only). Episode i starts from
    reset seed `seed + i`; a successful one goes on for `after_success` frames (record_episode). env_kwargs go to
    gym.make (e.g. start="near" for EgoPushCube-v0)."""
    if demo_fraction > 0 and env_id != "EgoPushCube-v0":
        raise ValueError(f"no scripted demonstrator for {env_id}; demonstrations exist for EgoPushCube-v0")
    env = gym.make(env_id, **env_kwargs)
    rng = np.random.default_rng(seed)
    play = PLAY_POLICIES.get(env_id, push_cube_play_policy)
    episodes, is_demo, demo_stats = [], [], [0, 0]
    n = demo_n = tenths = 0
    t0 = time.time()
    while n < steps and (max_episodes is None or len(episodes) < max_episodes):
        demo = demo_fraction > 0 and demo_n <= demo_fraction * n
        policy = (push_cube_demonstrator if demo else play)(env.unwrapped, rng)
        frames, success = record_episode(env, policy, steps - n, seed + len(episodes), after_success)
        if len(frames) < 2:  # the budget ran out on an episode's first frame: end on the previous episode
            break
        episodes.append(frames)
        is_demo += [demo] * len(frames)
        n += len(frames)
        if demo:
            demo_n += len(frames)
            demo_stats[0] += 1
            demo_stats[1] += success
        if verbose and steps >= PROGRESS_FRAMES and 10 * n // steps > tenths and n < steps:
            tenths = 10 * n // steps
            left = (steps - n) * (time.time() - t0) / n
            print(f"collecting {env_id}: {n}/{steps} frames ({n / steps:.0%}), {left:.0f} s left", flush=True)
    frames = [f for ep in episodes for f in ep]
    data = {
        "obs": np.stack([f["obs"] for f in frames]),
        "action": np.stack([f["action"] for f in frames]).astype(np.float32),
        "is_first": np.concatenate([np.arange(len(ep)) == 0 for ep in episodes]),
        "is_demo": np.array(is_demo, bool),
        "state": np.stack([f["state"] for f in frames]).astype(np.float32),
        "env_id": np.array(env_id), "control_hz": np.array(CONTROL_HZ), "format_version": np.array(FORMAT_VERSION),
    }
    if env_id == "EgoPushCube-v0":
        data["reward_label"] = np.array([f["label"] for f in frames], np.int64)
    if verbose:
        contact = np.mean([f["contact"] for f in frames])
        demos = f"; {demo_stats[0]} demonstrations, {demo_stats[1]} successful" if demo_fraction > 0 else ""
        print(f"collected {len(frames)} frames in {len(episodes)} episodes of {env_id}; "
              f"the robot touches the object in {contact:.1%} of frames{demos}")
    return data


def write_video(path: str, frames, fps: float = CONTROL_HZ, scale: int = 4) -> None:
    """Write RGB uint8 frames (T, H, W, 3) to an mp4 file, upscaled `scale` times (nearest)."""
    frames = np.asarray(frames)
    h, w = frames.shape[1] * scale, frames.shape[2] * scale
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open an mp4 writer")
    for frame in frames:
        writer.write(cv2.cvtColor(cv2.resize(frame, (w, h), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR))
    writer.release()


def summarize(data: dict) -> str:
    n, bounds = len(data["obs"]), episode_bounds(data["is_first"])
    lengths = [e - s for s, e in bounds]
    lines = [
        f"env_id {data['env_id'] if 'env_id' in data else '?'}, {n} frames {list(data['obs'].shape[1:])} "
        f"at {float(data['control_hz']) if 'control_hz' in data else '?'} Hz",
        f"{len(bounds)} episodes, length min {min(lengths)} / mean {np.mean(lengths):.1f} / max {max(lengths)}",
        f"action dim {data['action'].shape[1]}, mean {np.round(data['action'].mean(0).astype(float), 3).tolist()}, "
        f"std {np.round(data['action'].std(0).astype(float), 3).tolist()}",
    ]
    if "is_demo" in data:
        lines.append(f"demonstration frames {data['is_demo'].mean():.1%}")
    if "reward_label" in data:
        values, counts = np.unique(data["reward_label"], return_counts=True)
        lines.append("reward_label counts " + ", ".join(f"{v}: {c}" for v, c in zip(values.tolist(), counts)))
    lines.append("keys " + ", ".join(f"{k} {data[k].dtype}{list(data[k].shape)}" for k in data))
    return "\n".join(lines)


@dataclasses.dataclass
class Collect:
    """Collect play data (or demonstrations) from a simulator into a data file."""

    env_id: Annotated[str, tyro.conf.Positional]
    """PushT-v0, PushTReach-v0 or EgoPushCube-v0"""
    steps: int = 10_000
    """number of frames to record"""
    episodes: int = 0
    """record this many whole episodes instead of --steps frames (0: use --steps), e.g. `--demos --episodes 50`"""
    out: str = "data/play.npz"
    """output .npz file"""
    demos: bool = False
    """record only scripted demonstrations (EgoPushCube-v0)"""
    demo_fraction: float = -1.0
    """fraction of frames from demonstrations in play data (-1: 0.25 for EgoPushCube-v0, 0 for PushT-v0)"""
    seed: int = 0
    """seed of the policies and of the episodes' initial states"""
    goal_videos: bool = False
    """PushT-v0, PushTReach-v0: record videos that end at the goal (play from the goal, reversed) for the reward model;
    --steps frames in episodes of 64"""


@dataclasses.dataclass
class Check:
    """Validate a data file and print a summary; exit 1 with one line if it is not valid."""

    path: Annotated[str, tyro.conf.Positional]
    """the .npz file"""


def main(argv=None) -> int:
    cmd = tyro.extras.subcommand_cli_from_dict({"collect": Collect, "check": Check}, args=argv)
    try:
        if isinstance(cmd, Check):
            print(summarize(load_dataset(cmd.path)))
            return 0
        if cmd.env_id not in ("PushT-v0", "PushTReach-v0", "PushTPuck-v0", "EgoPushCube-v0"):
            raise ValueError(f"unknown env_id {cmd.env_id!r} (PushT-v0, PushTReach-v0, PushTPuck-v0 or EgoPushCube-v0)")
        if cmd.episodes < 0:
            raise ValueError(f"episodes ({cmd.episodes}) must not be negative")
        if cmd.steps < 2:
            raise ValueError(f"steps ({cmd.steps}) must be at least 2: an episode needs two frames")
        if cmd.seed < 0:
            raise ValueError(f"seed ({cmd.seed}) must not be negative")
        if not (cmd.demo_fraction == -1 or 0 <= cmd.demo_fraction <= 1):
            raise ValueError(f"demo_fraction ({cmd.demo_fraction}) must be in [0, 1] (or -1: the task's default)")
        if cmd.goal_videos and cmd.env_id not in PLAY_POLICIES:
            raise ValueError("--goal-videos exists for the Push-T ladder (PushT-v0, PushTReach-v0, PushTPuck-v0) only")
        fraction = 1.0 if cmd.demos else cmd.demo_fraction
        if fraction < 0:
            fraction = 0.25 if cmd.env_id == "EgoPushCube-v0" else 0.0
        if cmd.goal_videos:
            data = pusht_goal_videos(max(1, cmd.steps // 64), seed=cmd.seed, env_id=cmd.env_id)
        else:
            data = collect(cmd.env_id, 10**12 if cmd.episodes else cmd.steps, cmd.seed, fraction,
                           max_episodes=cmd.episodes or None)
        save_dataset(cmd.out, data)
        print(f"wrote {cmd.out}")
        return 0
    except (DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
