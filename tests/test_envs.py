import os
import subprocess
import sys

import cv2
import gymnasium as gym
import numpy as np
import pytest

import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rollout(env_id, seed, steps=15, **kwargs):
    env = gym.make(env_id, **kwargs)
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    frames, states = [obs], [info["state"]]
    for _ in range(steps):
        obs, _, terminated, truncated, info = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        frames.append(obs)
        states.append(info["state"])
    return np.stack(frames), np.stack(states)


@pytest.mark.parametrize("env_id", ["PushT-v0", "EgoPushCube-v0"])
def test_same_seed_same_frames(env_id):
    a, sa = rollout(env_id, seed=3)
    b, sb = rollout(env_id, seed=3)
    c, _ = rollout(env_id, seed=4)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(a, c)


def test_pusht_renders_a_state_the_same_in_every_env():
    # the T's shapes are a set whose order follows object addresses, so it differs between env instances; two
    # overlapping anti-aliased boxes drawn in another order gave frames 1 level apart (seen in 4 of 8 envs)
    frames = [gym.make("PushT-v0", obs_size=32).reset(seed=2_000_000)[0] for _ in range(16)]
    for frame in frames[1:]:
        np.testing.assert_array_equal(frame, frames[0])


@pytest.mark.parametrize("env_id", ["PushT-v0", "PushTReach-v0", "PushTPuck-v0"])
def test_one_rendering_path_for_every_frame_size(env_id):
    # a model at 32x32 sees the 64x64 frame area-resized, whether the frame comes from a data file (the scripts
    # resize with envs.resize_frame), from an environment made with obs_size=32, or is the goal image
    big, small = gym.make(env_id, obs_size=64), gym.make(env_id, obs_size=32)
    rng = np.random.default_rng(0)
    for seed in range(4):
        a, b = big.reset(seed=seed)[0], small.reset(seed=seed)[0]
        np.testing.assert_array_equal(envs.resize_frame(a, 32), b)
        action = rng.uniform(-1, 1, 2).astype(np.float32)
        np.testing.assert_array_equal(envs.resize_frame(big.step(action)[0], 32), small.step(action)[0])
    np.testing.assert_array_equal(envs.resize_frame(envs.goal_image(env_id, 64), 32), envs.goal_image(env_id, 32))
    frame = cv2.resize(big.unwrapped._draw(32), (32, 32))  # drawn at 32 directly: what evaluation used to see
    assert not np.array_equal(frame, small.reset(seed=0)[0])


def test_reach_rung_rewards_distance_and_ends_on_the_target():
    env = gym.make("PushTReach-v0")
    target = envs.PushTReachEnv.target
    _, info = env.reset(options={"state": [100.0, 256.0]})
    assert info["distance"] == pytest.approx(156.0) and not info["is_success"] and info["state"].shape == (2,)
    _, reward, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))  # 200 px/s for 0.2 s
    assert info["state"][0] == pytest.approx(140.0) and reward == pytest.approx(-1.16) and not terminated
    for _ in range(2):
        _, reward, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))
    assert not terminated and info["distance"] == pytest.approx(36.0)
    _, reward, terminated, _, info = env.step(np.array([0.9, 0.0], np.float32))  # 36 px: on the target
    assert terminated and info["is_success"] and reward == pytest.approx(0.0, abs=1e-6)
    # no T on this rung: nothing is in the tool's way, nothing is drawn but the table, the target and the tool
    _, info = env.reset(options={"state": [256.0, 100.0]})
    for _ in range(8):
        _, _, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))
    assert info["state"][1] == pytest.approx(100 + 8 * 40.0) and not info["contact"]
    colours = {tuple(c) for c in envs.goal_image("PushTReach-v0", 64).reshape(-1, 3)}
    assert envs.PUSHT_COLORS["block"] not in colours and envs.PUSHT_COLORS["agent"] in colours
    goal = envs.goal_image("PushTReach-v0", 64)
    green = np.all(np.abs(goal.astype(int) - envs.PUSHT_COLORS["goal"]) < 30, axis=-1)
    assert green.sum() == 0, "the goal image shows the tool covering the target"
    np.testing.assert_allclose(envs.task_rewards("PushTReach-v0", np.array([[256.0, 156.0], target])), [-1.0, 0.0],
                               atol=1e-6)


def test_puck_rung_scores_overlap_and_pushing_is_quasi_static():
    env = gym.make("PushTPuck-v0").unwrapped
    target, r = envs.PushTPuckEnv.target, envs.PushTPuckEnv.puck_radius
    _, info = env.reset(options={"state": [256.0, 400.0, *target]})
    assert info["coverage"] == pytest.approx(1.0) and info["distance"] == pytest.approx(0.0)
    d = r  # two discs of radius r, centres r apart: overlap (2 pi / 3 - sqrt(3) / 2) r^2 over pi r^2
    _, info = env.reset(options={"state": [256.0, 400.0, target[0] + d, target[1]]})
    assert info["coverage"] == pytest.approx((2 * np.pi / 3 - np.sqrt(3) / 2) / np.pi, abs=1e-6)
    # pushing the puck right by the tool's motion, onto the target: success ends the episode; it stops when the tool does
    _, info = env.reset(options={"state": [100.0, 256.0, 200.0, 256.0]})
    for _ in range(2):
        _, reward, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))
    assert info["contact"] and info["state"][2] > 230 and not terminated
    assert reward == pytest.approx(-info["distance"] / 100, abs=0.01)  # touching: no gap term
    moved = info["state"][2:].copy()
    _, reward, terminated, _, info = env.step(np.zeros(2, np.float32))
    np.testing.assert_allclose(info["state"][2:], moved, atol=1.0)
    _, info = env.reset(options={"state": [180.0, 256.0, 238.0, 256.0]})  # 3 px apart, 18 px short
    _, reward, terminated, _, info = env.step(np.array([0.5, 0.0], np.float32))
    assert terminated and info["is_success"] and reward > -0.07
    _, info = env.reset(options={"state": [56.0, 256.0, 156.0, 256.0]})  # the tool 45 px from touching the puck
    assert env._reward(info) == pytest.approx(-(100 + 0.5 * 45) / 100)
    goal = envs.goal_image("PushTPuck-v0", 64)
    green = np.all(np.abs(goal.astype(int) - envs.PUSHT_COLORS["goal"]) < 30, axis=-1)
    assert green.sum() == 0, "the goal image shows the puck covering the target"


def test_reach_play_covers_the_table_and_goal_videos_end_on_the_target():
    data = envs.collect("PushTReach-v0", 1500, seed=0, verbose=False)
    envs.validate_dataset(data)
    xy = data["state"]
    assert xy.shape == (1500, 2) and (xy.min(0) < 80).all() and (xy.max(0) > 430).all()
    assert np.abs(data["action"]).mean() > 0.3  # it moves
    videos = envs.pusht_goal_videos(3, length=20, seed=0, obs_size=32, env_id="PushTReach-v0")
    np.testing.assert_allclose(videos["state"][19::20], [envs.PushTReachEnv.target] * 3)
    assert (np.linalg.norm(videos["state"][0::20] - envs.PushTReachEnv.target, axis=1) > 30).all()


def test_pusht_velocity_command_moves_agent_by_v_dt():
    env = gym.make("PushT-v0")
    _, info = env.reset(options={"state": [256, 100, 380, 250, 0.0]})  # block far from the agent
    _, _, _, _, info2 = env.step(np.array([0.5, -0.25], np.float32))
    dt = 1 / envs.CONTROL_HZ
    np.testing.assert_allclose(info2["state"][:2] - info["state"][:2], [0.5 * 200 * dt, -0.25 * 200 * dt], atol=1e-3)
    np.testing.assert_array_equal(info2["state"][2:], info["state"][2:])  # no contact, block untouched
    # at the wall the tool stops at the wall instead of leaving the table
    _, info = env.reset(options={"state": [30, 256, 300, 300, 0.0]})
    _, _, _, _, info2 = env.step(np.array([-1.0, 0.0], np.float32))
    assert info2["state"][0] == pytest.approx(env.unwrapped.agent_bounds[0])


def test_pusht_goal_pose_scores_success():
    env = gym.make("PushT-v0")
    goal = envs.PushTEnv.goal_pose
    _, info = env.reset(options={"state": [256, 400, *goal]})
    assert info["coverage"] > 0.999
    _, reward, terminated, _, info = env.step(np.zeros(2, np.float32))
    assert terminated and info["is_success"] and reward == 1.0
    # gym-pusht's own order (position, then angle) misplaces the block: the reason envs.py sets the angle first
    sim = env.unwrapped.sim
    sim._setup()
    sim.block.position = tuple(goal[:2])
    sim.block.angle = goal[2]
    sim.space.step(0.01)
    assert sim._get_coverage() < 0.5
    image = envs.pusht_goal_image()
    assert image.shape == (64, 64, 3)
    green = np.all(np.abs(image.astype(int) - envs.PUSHT_COLORS["goal"]) < 30, axis=-1)
    assert green.sum() < 10  # the block covers the green goal T


def test_pusht_pushing_moves_block_and_contact_is_reported():
    env = gym.make("PushT-v0")
    _, info = env.reset(options={"state": [256, 150, 256, 300, 0.0]})
    contact = False
    for _ in range(8):
        _, _, _, _, new = env.step(np.array([0.0, 1.0], np.float32))
        contact |= new["contact"]
    assert contact
    assert new["state"][3] > info["state"][3] + 20  # the T was pushed along +y


def orange_pixels(obs):
    return np.all(np.abs(obs.astype(int) - envs.EGO_COLORS["cube"]) < 40, axis=-1).sum()


def test_ego_cube_behind_robot_is_not_visible():
    env = gym.make("EgoPushCube-v0")
    ahead, _ = env.reset(options={"robot_pose": [2.0, 2.0, 0.0], "cube_pose": [2.9, 2.1, 0.3]})
    behind, _ = env.reset(options={"robot_pose": [2.0, 2.0, 0.0], "cube_pose": [1.2, 2.0, 0.3]})
    beside, _ = env.reset(options={"robot_pose": [2.0, 2.0, 0.0], "cube_pose": [2.1, 2.8, 0.3]})
    assert orange_pixels(ahead) > 15
    assert orange_pixels(behind) == 0
    assert orange_pixels(beside) == 0  # outside the +-55 degree field of view
    # turning around brings the cube behind into view
    turned, _ = env.reset(options={"robot_pose": [2.0, 2.0, np.pi], "cube_pose": [1.2, 2.0, 0.3]})
    assert orange_pixels(turned) > 15


def drive(controller, action, steps):
    env = gym.make("EgoPushCube-v0", controller=controller)
    _, info = env.reset(options={"robot_pose": [1.0, 2.0, 0.0], "cube_pose": [4.0, 0.5, 0.0]})
    poses = [info["robot_pose"]]
    for _ in range(steps):
        _, _, _, _, info = env.step(np.asarray(action, np.float32))
        poses.append(info["robot_pose"])
    return np.stack(poses)


def test_ego_velocity_command_first_order_response():
    poses = drive("default", [1.0, 0.0, 0.0], 8)
    step = np.diff(poses[:, 0])
    assert step[0] < step[-1]  # accelerates from rest
    assert step[-1] == pytest.approx(envs.MAX_COMMAND[0] / envs.CONTROL_HZ, rel=0.02)  # steady state: v * dt
    assert np.abs(poses[:, 1] - 2.0).max() < 1e-3 and np.abs(poses[:, 2]).max() < 1e-3  # straight ahead
    turn = drive("default", [0.0, 0.0, 0.5], 8)
    assert np.diff(turn[:, 2])[-1] == pytest.approx(0.5 * envs.MAX_COMMAND[2] / envs.CONTROL_HZ, rel=0.02)


def test_ego_alt_controller_responds_differently():
    default, alt = drive("default", [1.0, 0.0, 0.3], 6), drive("alt", [1.0, 0.0, 0.3], 6)
    assert np.abs(default - alt).max() > 0.05
    assert np.diff(alt[:2, 0])[0] < np.diff(default[:2, 0])[0]  # the alt controller lags more
    with pytest.raises(ValueError, match="controller"):
        gym.make("EgoPushCube-v0", controller="nope")


def test_ego_near_start_puts_the_robot_behind_the_cube_facing_it():
    env = gym.make("EgoPushCube-v0", start="near")
    for seed in range(20):
        _, info = env.reset(seed=seed)
        robot, cube = np.array(info["robot_pose"]), np.array(info["cube_pose"])
        assert 0.9 <= np.linalg.norm(cube[:2] - envs.NET_CENTER) <= 1.8  # the cube before the net
        assert 0.6 - 1e-6 <= np.linalg.norm(cube[:2] - robot[:2]) <= 1.0 + 1e-6
        to_cube, to_net = cube[:2] - robot[:2], envs.NET_CENTER - cube[:2]
        cos = to_cube @ to_net / np.linalg.norm(to_cube) / np.linalg.norm(to_net)
        assert cos > np.cos(0.5) - 1e-6  # behind the cube, on the line to the net within 0.5 rad
        heading = np.arctan2(to_cube[1], to_cube[0]) - robot[2]
        assert abs(np.arctan2(np.sin(heading), np.cos(heading))) <= 0.4 + 1e-6  # facing the cube
    # given poses win over the start distribution; the full distribution starts elsewhere too
    _, info = env.reset(options={"robot_pose": [1.0, 1.0, 0.0], "cube_pose": [2.0, 2.0, 0.0]})
    assert np.allclose(info["robot_pose"][:2], [1.0, 1.0], atol=1e-3)
    full = gym.make("EgoPushCube-v0")
    far = [np.linalg.norm(np.array(full.reset(seed=s)[1]["cube_pose"][:2]) - envs.NET_CENTER) > 1.8 for s in range(20)]
    assert any(far)
    with pytest.raises(ValueError, match="start"):
        gym.make("EgoPushCube-v0", start="nope")


def test_play_goes_on_after_a_success_when_asked():
    """A forward-driving 'operator' lined up behind the cube scores, then keeps recording: the cube in the net is
    labelled success on every frame after, the episode's last action is zero, and without the option it ends."""
    forward = lambda obs, info: np.array([1.0, 0.0, 0.0], np.float32)
    poses = {"robot_pose": [3.0, 2.0, 0.0], "cube_pose": [3.5, 2.0, 0.0]}

    class Lined(gym.Wrapper):  # every reset from the lined-up poses
        def reset(self, **kw):
            return self.env.reset(options=poses)

    env = Lined(gym.make("EgoPushCube-v0"))
    frames, success = envs.record_episode(env, forward, 100, 0)
    assert success and [f["label"] for f in frames][-1] == 2 and frames[-1]["action"].tolist() == [0, 0, 0]
    more, success_more = envs.record_episode(env, forward, 100, 0, after_success=5)
    assert success_more and len(more) == len(frames) + 5
    assert [f["label"] for f in more[len(frames) - 1:]] == [2] * 6, "the cube stays in the net"
    assert all(f["action"].tolist() == [1, 0, 0] for f in more[:-1]) and more[-1]["action"].tolist() == [0, 0, 0]
    assert all(np.array_equal(a["obs"], b["obs"]) for a, b in zip(frames, more)), "the same episode up to the goal"
    short, _ = envs.record_episode(env, forward, len(frames) + 2, 0, after_success=5)
    assert len(short) == len(frames) + 2, "the frame budget still holds"


def test_ego_labels_push_and_success():
    env = gym.make("EgoPushCube-v0")
    # robot lined up behind the cube, facing the net: driving forward pushes the cube toward the goal
    _, _ = env.reset(options={"robot_pose": [3.0, 2.0, 0.0], "cube_pose": [3.5, 2.0, 0.0]})
    labels, rewards = [], []
    for _ in range(15):
        _, reward, terminated, _, info = env.step(np.array([1.0, 0.0, 0.0], np.float32))
        labels.append(info["label"])
        rewards.append(reward)
        if terminated:
            break
    assert 1 in labels and labels[-1] == 2 and info["is_success"] and rewards[-1] == 10.0
    # pushing away from the goal is not labelled as progress
    _, _ = env.reset(options={"robot_pose": [3.0, 2.0, np.pi], "cube_pose": [2.5, 2.0, 0.0]})
    labels = [env.step(np.array([1.0, 0.0, 0.0], np.float32))[4]["label"] for _ in range(6)]
    assert labels == [0] * 6


def test_push_cube_metrics():
    line = np.stack([np.linspace(0, 2, 11), np.zeros(11), np.zeros(11)], 1)
    m = envs.push_cube_metrics(line)
    assert m["straightness"] == pytest.approx(1.0) and m["curvature"] == pytest.approx(0.0)
    t = np.linspace(0, np.pi / 2, 200)  # quarter circle of radius 1, heading along the tangent
    arc = np.stack([np.sin(t), 1 - np.cos(t), t], 1)
    m = envs.push_cube_metrics(arc)
    assert m["straightness"] == pytest.approx(np.sqrt(2) / (np.pi / 2), rel=1e-3)
    assert m["curvature"] == pytest.approx(1.0, rel=1e-3)  # 1 rad per metre on a unit circle


# -- data files ---------------------------------------------------------------------------------------
def small_dataset(n=10, a=2):
    first = np.zeros(n, bool)
    first[[0, 5]] = True
    return {"obs": np.zeros((n, 64, 64, 3), np.uint8), "action": np.zeros((n, a), np.float32), "is_first": first,
            "env_id": np.array("PushT-v0"), "control_hz": np.array(5.0), "format_version": np.array(1)}


def test_dataset_round_trip(tmp_path):
    data = envs.collect("EgoPushCube-v0", 40, seed=1, demo_fraction=0.5, verbose=False)
    path = str(tmp_path / "d.npz")
    envs.save_dataset(path, data)
    loaded = envs.load_dataset(path)
    assert set(loaded) == set(data)
    for k in data:
        np.testing.assert_array_equal(loaded[k], data[k])
        assert loaded[k].dtype == data[k].dtype
    assert not any(f.startswith("d.npz.tmp") for f in os.listdir(tmp_path))


BAD = {
    "missing obs": (lambda d: d.pop("obs"), "'obs'.*missing"),
    "missing action": (lambda d: d.pop("action"), "'action'.*missing"),
    "missing is_first": (lambda d: d.pop("is_first"), "'is_first'.*missing"),
    "obs dtype": (lambda d: d.update(obs=d["obs"].astype(np.float32)), "'obs'.*uint8"),
    "obs shape": (lambda d: d.update(obs=d["obs"][..., 0]), "'obs'"),
    "action dtype": (lambda d: d.update(action=d["action"].astype(np.float64)), "'action'.*float32"),
    "action length": (lambda d: d.update(action=d["action"][:-1]), "'action'"),
    "action range": (lambda d: d["action"].__setitem__((3, 1), 1.5), "'action'.*outside.*row 3"),
    "action nan": (lambda d: d["action"].__setitem__((2, 0), np.nan), "'action': NaN values \\(row 2"),
    "action inf": (lambda d: d["action"].__setitem__((4, 1), -np.inf), "'action': infinite values \\(row 4"),
    "is_first dtype": (lambda d: d.update(is_first=d["is_first"].astype(np.int64)), "'is_first'.*bool"),
    "is_first start": (lambda d: d["is_first"].__setitem__(0, False), "'is_first'.*first frame"),
    "one-frame episode": (lambda d: d["is_first"].__setitem__(6, True), "'is_first'.*episode 1"),
    "empty": (lambda d: d.update(obs=d["obs"][:0], action=d["action"][:0], is_first=d["is_first"][:0]),
              "'obs'.*empty episode"),
    "state dtype": (lambda d: d.update(state=np.zeros((10, 5), np.uint8)), "'state'"),
    "is_demo length": (lambda d: d.update(is_demo=np.zeros(9, bool)), "'is_demo'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dataset_validation_errors(tmp_path, case):
    data = small_dataset()
    corrupt, pattern = BAD[case]
    corrupt(data)
    path = str(tmp_path / "bad.npz")
    with open(path, "wb") as f:
        np.savez(f, **data)
    with pytest.raises(envs.DatasetError, match=pattern) as e:
        envs.load_dataset(path)
    assert path in str(e.value) and "\n" not in str(e.value)
    # save_dataset refuses the same data and leaves an existing file alone
    good = str(tmp_path / "good.npz")
    envs.save_dataset(good, small_dataset())
    before = open(good, "rb").read()
    with pytest.raises(envs.DatasetError):
        envs.save_dataset(good, data)
    assert open(good, "rb").read() == before


def test_unreadable_files(tmp_path):
    with pytest.raises(envs.DatasetError, match="no such file"):
        envs.load_dataset(str(tmp_path / "missing.npz"))
    path = tmp_path / "cut.npz"
    envs.save_dataset(str(path), small_dataset())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(envs.DatasetError, match="not a readable .npz"):
        envs.load_dataset(str(path))


def test_junk_files_are_not_valid_data_files(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("frame,action\n0,0.5\n")
    with pytest.raises(envs.DatasetError) as e:
        envs.load_dataset(str(text))
    assert "not a valid .npz data file" in str(e.value) and "pickle" not in str(e.value) and str(text) in str(e.value)
    npy = tmp_path / "frames.npy"
    np.save(npy, np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(envs.DatasetError, match="not a valid .npz data file"):
        envs.load_dataset(str(npy))
    objects = tmp_path / "objects.npz"  # an object array would need unpickling: refused by name, without pickle advice
    np.savez(objects, **{**small_dataset(), "obs": np.array([None, 1], dtype=object)})
    with pytest.raises(envs.DatasetError) as e:
        envs.load_dataset(str(objects))
    assert "key 'obs': an array of Python objects" in str(e.value) and "allow_pickle" not in str(e.value)


def test_collectors_write_valid_data():
    play = envs.collect("PushT-v0", 300, seed=0, verbose=False)
    envs.validate_dataset(play)
    assert len(play["obs"]) == 300 and play["action"].shape == (300, 2) and play["state"].shape == (300, 5)
    assert play["is_first"][0] and not play["is_demo"].any()
    # high-entropy play: actions spread over the action box, and the tool often touches the T
    assert play["action"].std(0).min() > 0.3
    assert (play["action"][~np.roll(play["is_first"], -1)] == 0).all(axis=1).mean() < 0.05
    demos = envs.collect("EgoPushCube-v0", 200, seed=0, demo_fraction=1.0, verbose=False)
    envs.validate_dataset(demos)
    assert demos["is_demo"].all() and demos["state"].shape == (200, 6)
    assert set(np.unique(demos["reward_label"])) <= {0, 1, 2} and (demos["reward_label"] == 1).any()
    starts = np.flatnonzero(demos["is_first"])
    ends = np.append(starts[1:], 200) - 1
    np.testing.assert_array_equal(demos["action"][ends[:-1]], 0)  # an episode's last frame has no action
    with pytest.raises(ValueError, match="demonstrator"):
        envs.collect("PushT-v0", 10, demo_fraction=0.5)


def test_pusht_goal_videos_end_at_the_goal():
    videos = envs.pusht_goal_videos(3, length=20, seed=0, obs_size=32)
    envs.validate_dataset(videos)
    assert videos["obs"].shape == (60, 32, 32, 3) and (videos["action"] == 0).all() and videos["is_demo"].all()
    np.testing.assert_array_equal(np.flatnonzero(videos["is_first"]), [0, 20, 40])
    env = envs.PushTEnv(obs_size=32)
    coverage = [env.reset(options={"state": s})[1]["coverage"] for s in videos["state"]]
    np.testing.assert_allclose(coverage[19::20], 1.0, atol=1e-3)  # every video's last frame: T on target
    # and the frames are the states': the last frame is the rendering of its state (the video is reversed)
    rendered = env.reset(options={"state": videos["state"][0]})[0].astype(int)  # (state is stored as float32)
    assert np.abs(rendered - videos["obs"][0]).max() <= 2 and not np.array_equal(videos["obs"][0], videos["obs"][19])
    assert np.mean(coverage[0::20]) < 0.9  # play pushed the T off the target at least sometimes


def test_play_data_touches_the_object(capsys):
    envs.collect("PushT-v0", 400, seed=1)
    envs.collect("EgoPushCube-v0", 400, seed=1, demo_fraction=0.25)
    out = capsys.readouterr().out.splitlines()
    fractions = [float(line.split("touches the object in ")[1].split("%")[0]) for line in out]
    assert all(f > 15 for f in fractions), out


def test_collecting_many_frames_prints_progress(capsys, monkeypatch):
    monkeypatch.setattr(envs, "PROGRESS_FRAMES", 300)
    envs.collect("PushTReach-v0", 300, seed=0)
    *progress, summary = capsys.readouterr().out.splitlines()
    assert 5 <= len(progress) <= 9 and "touches the object" in summary, progress
    percents = [int(line.split("(")[1].split("%")[0]) for line in progress]
    assert all(line.startswith("collecting PushTReach-v0: ") and " s left" in line for line in progress)
    assert percents == sorted(set(percents)) and percents[0] >= 10 and percents[-1] < 100
    envs.collect("PushTReach-v0", 299, seed=0)  # fewer frames than PROGRESS_FRAMES: only the summary
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_write_video(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    path = str(tmp_path / "v.mp4")
    envs.write_video(path, frames, scale=2)
    cap = cv2.VideoCapture(path)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 7 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 128


def run_cli(*args):
    return subprocess.run([sys.executable, "envs.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_collect_and_check(tmp_path):
    out = str(tmp_path / "p.npz")
    r = run_cli("collect", "PushT-v0", "--steps", "30", "--out", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("check", out)
    assert r.returncode == 0 and "30 frames" in r.stdout
    with open(out, "r+b") as f:
        f.truncate(100)
    r = run_cli("check", out)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and out in r.stderr
    r = run_cli("collect", "Nope-v0", "--steps", "5", "--out", out)
    assert r.returncode == 1 and "unknown env_id" in r.stderr
    r = run_cli("collect", "PushT-v0", "--steps", "64", "--out", out, "--goal-videos")
    assert r.returncode == 0 and envs.load_dataset(out)["is_demo"].all()
    r = run_cli("collect", "EgoPushCube-v0", "--steps", "64", "--out", out, "--goal-videos")
    assert r.returncode == 1 and "Push-T ladder" in r.stderr
    r = run_cli("collect", "EgoPushCube-v0", "--demos", "--episodes", "2", "--out", out)  # whole episodes
    data = envs.load_dataset(out)
    assert r.returncode == 0 and data["is_first"].sum() == 2 and data["is_demo"].all()
    assert data["is_first"][0] and len(data["obs"]) > 2


@pytest.mark.parametrize("flag, value, message", [("--steps", "1", "steps (1) must be at least 2"),
                                                  ("--seed", "-1", "seed (-1) must not be negative"),
                                                  ("--demo-fraction", "1.5", "demo_fraction (1.5) must be in [0, 1]"),
                                                  ("--episodes", "-2", "episodes (-2) must not be negative")])
def test_cli_refuses_bad_numbers_before_collecting(tmp_path, flag, value, message):
    out = tmp_path / "sub" / "p.npz"
    r = run_cli("collect", "PushTReach-v0", "--steps", "30", "--out", str(out), flag, value)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "sub").exists()
