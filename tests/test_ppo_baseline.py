"""ppo_baseline.py: GAE against a plain loop, tiny runs in the world model and in the simulator, and checkpoint errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import envs
import ppo_baseline as ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {**ppo.PRESETS["tiny"], "env_id": "PushT-v0"}  # Push-T (the default is the reach rung)
KEYS = ("env_id", "episodes", "successes", "success_rate", "mean_return", "mean_coverage", "mean_final_distance",
        "contact_fraction", "global_step", "wall_time_s")
torch.set_num_threads(1)


def test_gae_matches_a_plain_loop():
    T, B, gamma, lam = 7, 3, 0.9, 0.8
    g = torch.Generator().manual_seed(0)
    rewards, values, next_value = torch.randn(T, B, generator=g), torch.randn(T, B, generator=g), torch.randn(B, generator=g)
    dones = torch.zeros(T, B)
    dones[2, 0] = dones[6, 1] = dones[0, 2] = dones[3, 2] = 1  # episode ends after these steps
    advantages, returns = ppo.gae(rewards, values, dones, next_value, gamma, lam)
    for b in range(B):
        r, v, d = rewards[:, b].tolist(), values[:, b].tolist() + [next_value[b].item()], dones[:, b].tolist()
        for t in range(T):
            # A_t = sum_l (gamma lam)^l delta_{t+l}, up to and including the step that ends the episode
            ref, discount = 0.0, 1.0
            for k in range(t, T):
                delta = r[k] + (0.0 if d[k] else gamma * v[k + 1]) - v[k]
                ref += discount * delta
                if d[k]:
                    break
                discount *= gamma * lam
            assert advantages[t, b].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
            assert returns[t, b].item() == pytest.approx(ref + v[t], rel=1e-5, abs=1e-6)


class Bandit:
    """A contextual bandit in the environment interface: bright frames want action (0.5, 0.5), dark ones (-0.5, -0.5)."""

    action_dim = 2

    def __init__(self, n, size):
        self.n, self.size, self.finished = n, size, []
        self.new_obs()

    def new_obs(self):
        self.sign = torch.randint(2, (self.n,)) * 2.0 - 1
        self.obs = ((self.sign > 0).to(torch.uint8) * 255)[:, None, None, None, None].expand(-1, 4, 3, self.size, self.size)

    def step(self, action):
        reward = -(action - 0.5 * self.sign[:, None]).pow(2).sum(-1)
        self.new_obs()
        done = torch.zeros(self.n, dtype=torch.bool)
        return self.obs, reward, done, done, self.obs


def test_ppo_learns_a_contextual_bandit(tmp_path):
    torch.manual_seed(0)
    args = ppo.Args(**{**TINY, "img_size": 16, "num_envs": 16, "num_steps": 8, "minibatch_size": 32,
                       "total_timesteps": 16 * 8 * 40, "learning_rate": 3e-3, "save_model": False})
    agent, global_step = ppo.ppo(args, Bandit(16, 16), torch.device("cpu"), SummaryWriter(str(tmp_path)), str(tmp_path))
    assert global_step == 16 * 8 * 40
    bright, dark = (torch.full((1, 4, 3, 16, 16), v, dtype=torch.uint8) for v in (255, 0))
    with torch.no_grad():  # the mean overshoots +-0.5 while the std is large: clipping caps the far tail's error
        assert (agent.act(bright) > 0.3).all() and (agent.act(dark) < -0.3).all(), (agent.act(bright), agent.act(dark))


def test_quick_evaluations_are_logged_against_samples_and_leave_training_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    agents = []
    for every in (1, 0):
        torch.manual_seed(0)
        args = ppo.Args(**{**TINY, "env": "sim", "eval_every": every, "save_model": False})
        writer = SummaryWriter(str(tmp_path / str(every)))
        agent, _ = ppo.ppo(args, ppo.Simulator(args, args.num_envs, args.seed, torch.device("cpu")),
                           torch.device("cpu"), writer, str(tmp_path))
        writer.close()
        agents.append(agent.state_dict())
        events = EventAccumulator(str(tmp_path / str(every))).Reload()
        if every:  # 2 iterations of 32 samples: a quick evaluation after the first, none after the last
            (quick,) = events.Scalars("eval/mean_coverage")
            assert quick.step == 32 and 0 <= quick.value <= 1
        else:
            assert "eval/mean_coverage" not in events.Tags()["scalars"]
    assert all(torch.equal(agents[0][k], agents[1][k]) for k in agents[0]), "the evaluation changed the training"


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, "ppo_baseline.py", "--preset", "tiny", "--env-id", "PushT-v0", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def global_models(tmp_path_factory):
    """Play data and tiny world-model and reward-model checkpoints of dmo_sapo_diamond.py."""
    tmp = tmp_path_factory.mktemp("dmo")
    data = str(tmp / "PushT-v0_play.npz")
    envs.save_dataset(data, envs.collect("PushT-v0", 1200, seed=0, verbose=False))
    r = subprocess.run([sys.executable, "dmo_sapo_diamond.py", "--preset", "tiny", "--env-id", "PushT-v0", "--stop-after", "reward_model",
                        "--runs-dir", str(tmp / "runs"), "--data-path", data, "--no-capture-video"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp / "runs").iterdir()
    return {"data": data, "wm": str(run_dir / "world_model.pt"), "reward": str(run_dir / "reward_model.pt")}


def check_run(runs_dir, env):
    (run_dir,) = runs_dir.iterdir()
    result = json.loads((run_dir / "eval.json").read_text())
    assert all(k in result for k in KEYS), result
    assert result["episodes"] == 2 and result["global_step"] == 64 and 0 <= result["mean_coverage"] <= 1
    # the checkpoint alone reproduces the evaluation
    args = ppo.Args(**{**TINY, "env": env})
    ckpt = ppo.dmo.load_checkpoint(str(run_dir / "agent.pt"), "ppo_agent", args)
    agent = ppo.Agent(args.img_size, args.frame_stack, args.cnn_channels, args.hidden)
    agent.load_state_dict(ckpt["agent"])
    assert ckpt["global_step"] == 64
    metrics, _ = ppo.evaluate(args, agent, 2, args.eval_seed, torch.device("cpu"))
    assert metrics["mean_coverage"] == pytest.approx(result["mean_coverage"], abs=1e-6)
    return run_dir


def test_tiny_preset_in_the_simulator_and_resume(tmp_path):
    r = run_script("--env", "sim", "--runs-dir", str(tmp_path), "--no-capture-video", "--total-timesteps", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["global_step"] == 32
    assert [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("stage ")] == [
        "stage 1 of 3: the simulators", "stage 2 of 3: PPO in the sim", "stage 3 of 3: evaluation in PushT-v0"]
    raw, headline, *where = r.stdout[r.stdout.index('{"env_id"'):].splitlines()
    assert json.loads(raw) == result and f"{result['successes']} of 2 evaluation episodes succeeded" in headline
    assert where == [f"  results      {run_dir / 'eval.json'}", f"  TensorBoard  tensorboard --logdir {run_dir}"]
    args_json = (run_dir / "args.json").read_text()
    r = subprocess.run([sys.executable, "ppo_baseline.py", "--resume", str(run_dir), "--hidden", "16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # agent.pt refuses it; args.json is kept
    assert r.returncode == 1 and "checkpoint has hidden=[32], this run has hidden=[16]" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and (run_dir / "args.json").read_text() == args_json
    r = subprocess.run([sys.executable, "ppo_baseline.py", "--resume", str(run_dir), "--total-timesteps", "64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # continue the run for a second iteration
    assert r.returncode == 0 and "resuming" in r.stdout and "at iteration 1" in r.stdout, r.stderr[-2000:]
    check_run(tmp_path, "sim")


def test_ctrl_c_saves_the_agent_and_resume_continues_it(tmp_path, ctrl_c):
    flags = ["--env", "sim", "--env-id", "PushTReach-v0", "--no-capture-video", "--eval-every", "0"]
    code, out, err = ctrl_c([sys.executable, "ppo_baseline.py", "--preset", "tiny", *flags, "--runs-dir",
                             str(tmp_path), "--total-timesteps", "3200000"], when="[ppo] step 1/")
    (run_dir,) = tmp_path.iterdir()
    iteration = torch.load(run_dir / "agent.pt", map_location="cpu", weights_only=False)["iteration"]
    assert code == 130 and iteration >= 1, (code, err)
    assert err.strip() == (f"interrupted (PPO saved at iteration {iteration}); continue with: python ppo_baseline.py "
                           f"--resume {run_dir}")
    interrupted = (run_dir / "agent.pt").read_bytes()
    for _ in range(2):  # resumed, and once more from the same checkpoint as after a kill that lost the later one
        r = subprocess.run([sys.executable, "ppo_baseline.py", "--resume", str(run_dir), "--total-timesteps",
                            str(32 * (iteration + 2))], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"at iteration {iteration} of {iteration + 2}" in r.stdout, r.stderr[-2000:]
        (run_dir / "agent.pt").write_bytes(interrupted)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = [e.step for e in EventAccumulator(str(run_dir)).Reload().Scalars("charts/SPS")]
    assert steps == [32 * i for i in range(1, iteration + 3)], "TensorBoard continues where the checkpoint was saved"


@pytest.mark.parametrize("flag, value, message", [
    ("--num-envs", "0", "num_envs (0) must be at least 1"), ("--seed", "-1", "seed (-1) must not be negative"),
    ("--learning-rate", "0", "learning_rate (0.0) must be positive"),
    ("--gamma", "1.5", "gamma (1.5) must be in [0, 1]"),
    ("--hidden", "0", "hidden ([0]) must be one or more sizes of at least 1"),
    ("--img-size", "2", "img_size (2) must be at least 2^len(cnn_channels) (4): each convolution halves the frame"),
    ("--total-timesteps", "16", "total_timesteps (16) must be at least one rollout, num_envs * num_steps (32)")])
def test_bad_numbers_are_refused(flag, value, message):
    with pytest.raises(ppo.dmo.RunError) as e:
        ppo.parse_args(["--preset", "tiny", "--env", "sim", flag, value])
    assert str(e.value) == message


def test_refused_command_leaves_no_run_directory_and_help_lists_the_presets(tmp_path):
    r = run_script("--env", "sim", "--runs-dir", str(tmp_path / "runs"), "--eval-episodes", "0", timeout=60)
    assert r.returncode == 1 and r.stderr == "error: eval_episodes (0) must be at least 1\n"
    assert not (tmp_path / "runs").exists()
    (tmp_path / "agent.pt").write_bytes(b"")
    with pytest.raises(ppo.dmo.RunError, match=f"--resume {tmp_path}/agent.pt is a file; --resume takes a run dir"):
        ppo.parse_args(["--resume", str(tmp_path / "agent.pt")])
    r = subprocess.run([sys.executable, "ppo_baseline.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    presets = " ".join(r.stdout.split("Presets (--preset NAME")[1].split())
    assert "tiny total_timesteps=64, num_envs=4" in presets and "paper env_id=PushT-v0, img_size=64, total_timesteps=40000000" in presets
    assert "default the defaults of the flags below" in presets


def test_tiny_preset_in_the_world_model(global_models, tmp_path):
    r = run_script("--env", "world-model", "--wm-checkpoint", global_models["wm"], "--reward-checkpoint",
                   global_models["reward"], "--data-path", global_models["data"], "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = check_run(tmp_path, "world-model")
    assert (run_dir / "eval_episode_0.mp4").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    steps = [e.step for e in events.Scalars("imagination/reward")]
    assert steps == [32, 64], "imagination/reward against world-model samples, as DMO logs it"
    assert "charts/SPS" in events.Tags()["scalars"] and "losses/policy_loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/mean_coverage")] == [32, 64], "quick and final evaluations"


def test_checkpoint_of_the_wrong_kind_is_a_one_line_error(global_models, tmp_path):
    for wm, reward, expected in [(global_models["reward"], global_models["reward"], "expected a 'world_model' checkpoint"),
                                 (global_models["wm"], global_models["wm"], "expected a 'reward_model' checkpoint"),
                                 (global_models["data"], global_models["reward"], "cannot read checkpoint")]:
        r = run_script("--env", "world-model", "--wm-checkpoint", wm, "--reward-checkpoint", reward, "--runs-dir",
                       str(tmp_path), timeout=60)
        assert r.returncode == 1 and expected in r.stderr, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.iterdir()), "a failed start writes no run directory"


# ----------------------------------------------------------------------------------------------------
# Push-Cube: PPO inside dmo_sapo_dreamerv4.py's world model (Table 1's PPO row)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dreamerv4_models(tmp_path_factory):
    """Near-start play data and tiny tokenizer and dynamics checkpoints of dmo_sapo_dreamerv4.py."""
    tmp = tmp_path_factory.mktemp("dv4")
    data = str(tmp / "EgoPushCube-v0_near_play_600.npz")
    envs.save_dataset(data, envs.collect("EgoPushCube-v0", 600, seed=0, verbose=False, start="near"))
    r = subprocess.run([sys.executable, "dmo_sapo_dreamerv4.py", "--preset", "tiny", "--stop-after", "dynamics",
                        "--runs-dir", str(tmp / "runs"), "--data-path", data], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp / "runs").iterdir()
    return {"data": data, "dyn": str(run_dir / "dynamics.pt"), "tok": str(run_dir / "tokenizer.pt")}


def push_cube_args(models, **overrides):
    return ppo.Args(**{**ppo.PRESETS["tiny"], "env_id": "EgoPushCube-v0", "wm_checkpoint": models["dyn"],
                       "tok_checkpoint": models["tok"], "data_path": models["data"], "init_context": 4, **overrides})


def test_dreamerv4_env_starts_from_play_windows_and_ends_episodes_together(dreamerv4_models):
    args = push_cube_args(dreamerv4_models, num_envs=3, episode_length=3)
    torch.manual_seed(0)
    world = ppo.DreamerV4World(args, torch.device("cpu"))
    assert world.img_size == 32 and world.cfg.dyn_sampling_steps == 4 and world.context == 4
    data = ppo.dv4.load_play_data(ppo.push_cube_settings(args), torch.device("cpu"))
    env = ppo.DreamerV4Env(args, world, data, torch.device("cpu"))
    windows = data["obs"].unfold(0, args.frame_stack, 1).permute(0, 4, 1, 2, 3)  # every k consecutive play frames
    assert all((windows == o).flatten(1).all(1).any() for o in env.obs), "the stack is the end of a play window"
    assert env.obs.shape == (3, 4, 3, 32, 32) and env.obs.dtype == torch.uint8 and env.action_dim == 3
    rewards = []
    for t in range(3):
        before = env.obs.clone()
        obs, reward, terminated, truncated, final_obs = env.step(torch.zeros(3, 3))
        rewards.append(reward)
        assert not terminated.any() and bool(truncated.all()) == (t == 2)
        assert torch.equal(final_obs[:, :-1], before[:, 1:]), "the stack moves on by the generated frame"
        assert torch.equal(obs, final_obs) == (t < 2), "after the last step every episode restarts from play data"
    assert len(env.finished) == 3 and env.t == 0
    returns = torch.stack(rewards).sum(0)
    assert [e["return"] for e in env.finished] == pytest.approx(returns.tolist())
    assert all(0 <= r <= 10 for r in returns / 3), "the reward head's expected reward lies among 0, 1, 10"


def test_tiny_preset_in_the_dreamerv4_world_model(dreamerv4_models, tmp_path):
    r = subprocess.run([sys.executable, "ppo_baseline.py", "--preset", "tiny", "--env-id", "EgoPushCube-v0",
                        "--wm-checkpoint", dreamerv4_models["dyn"], "--tok-checkpoint", dreamerv4_models["tok"],
                        "--data-path", dreamerv4_models["data"], "--init-context", "4", "--runs-dir", str(tmp_path),
                        "--no-capture-video"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["env_id"] == "EgoPushCube-v0" and result["start"] == "near" and result["global_step"] == 64
    assert result["episodes"] == 2 and 0 <= result["success_rate"] <= 1 and result["mean_final_cube_to_net_m"] < 2.1
    assert all(k in result for k in ("steps_to_success_mean", "straightness_mean", "curvature_mean"))  # Table 1
    # the checkpoint alone reproduces the evaluation, with Push-Cube's three action dimensions
    args = push_cube_args(dreamerv4_models)
    ckpt = ppo.dmo.load_checkpoint(str(run_dir / "agent.pt"), "ppo_agent", args)
    agent = ppo.Agent(args.img_size, args.frame_stack, args.cnn_channels, args.hidden, action_dim=3)
    agent.load_state_dict(ckpt["agent"])
    metrics, _ = ppo.evaluate(args, agent, 2, args.eval_seed, torch.device("cpu"))
    assert metrics["mean_final_cube_to_net_m"] == pytest.approx(result["mean_final_cube_to_net_m"], abs=1e-6)
    with pytest.raises(ppo.dmo.RunError, match="checkpoint has env_id=EgoPushCube-v0, this run has env_id=PushT-v0"):
        ppo.dmo.load_checkpoint(str(run_dir / "agent.pt"), "ppo_agent", ppo.Args(**TINY))


@pytest.mark.parametrize("flags, message", [
    (["--env", "sim"], "--env sim runs the Push-T rungs; EgoPushCube-v0 trains in dmo_sapo_dreamerv4.py's world model"),
    (["--wm-checkpoint", "d.pt"], "--env world-model on EgoPushCube-v0 needs --wm-checkpoint RUN/dynamics.pt and "
                                  "--tok-checkpoint RUN/tokenizer.pt"),
    (["--wm-checkpoint", "d.pt", "--tok-checkpoint", "t.pt", "--init-context", "2"],
     "frame_stack (4) exceeds init_context (2)")])
def test_push_cube_flags_are_checked(flags, message):
    with pytest.raises(ppo.dmo.RunError) as e:
        ppo.parse_args(["--preset", "tiny", "--env-id", "EgoPushCube-v0", *flags])
    assert str(e.value).startswith(message)


def test_push_cube_checkpoints_must_be_one_world_model(dreamerv4_models, tmp_path):
    for dyn, tok, expected in [(dreamerv4_models["tok"], dreamerv4_models["tok"], "expected a 'dynamics' checkpoint"),
                               (dreamerv4_models["dyn"], dreamerv4_models["dyn"], "expected a 'tokenizer' checkpoint")]:
        r = subprocess.run([sys.executable, "ppo_baseline.py", "--preset", "tiny", "--env-id", "EgoPushCube-v0",
                            "--wm-checkpoint", dyn, "--tok-checkpoint", tok, "--init-context", "4", "--runs-dir",
                            str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists(), "a failed start writes no run directory"
    tok = torch.load(dreamerv4_models["tok"], weights_only=False)
    tok["config"]["tok_latents"] = 8
    torch.save(tok, tmp_path / "tokenizer.pt")
    with pytest.raises(ppo.dmo.RunError, match="the dynamics has tok_latents=4, the tokenizer .* tok_latents=8"):
        ppo.DreamerV4World(push_cube_args(dreamerv4_models, tok_checkpoint=str(tmp_path / "tokenizer.pt")), "cpu")
    with pytest.raises(ppo.dmo.RunError, match=r"wm_denoising_steps \(3\) must be a power of 2 for DreamerV4"):
        ppo.DreamerV4World(push_cube_args(dreamerv4_models, wm_denoising_steps=3), "cpu")
    with pytest.raises(ppo.dmo.RunError, match=r"init_context \+ episode_length \(4 \+ 100\) exceeds"):
        ppo.DreamerV4World(push_cube_args(dreamerv4_models, episode_length=100), "cpu")
