"""rwm_mbpo_ppo.py: the dual-autoregressive loss, the warm-up, the error metric, the imagination reward,
and a `--preset tiny` run of every mode (outputs, checkpoints, --resume, bad checkpoints)."""

import json
import math
import os
import subprocess
import sys

import cv2
import mujoco
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rwm_mbpo_ppo as rwm  # noqa: E402

torch.set_num_threads(1)
B, M = 4, 5
TASK, ANT = rwm.CheetahVelocityEnv, rwm.AntVelocityEnv  # the default task and the paper's


def make_batch(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(B, L, TASK.obs_dim, generator=g), action=torch.rand(B, L, TASK.act_dim, generator=g) * 2 - 1,
                next_obs=torch.randn(B, L, TASK.obs_dim, generator=g),
                next_contacts=(torch.rand(B, L, TASK.con_dim, generator=g) > 0.5).float(),
                next_term=(torch.rand(B, L, 1, generator=g) > 0.9).float())


def loss_of(model, b, N):
    return rwm.rwm_loss(model, b["obs"], b["action"], b["next_obs"], b["next_contacts"], b["next_term"], M, N)


class Spy(rwm.RWM):
    """Records the inputs of every call (their gradients kept)."""

    def forward(self, obs, action, h=None):
        if obs.requires_grad:
            obs.retain_grad()
        self.calls.append(obs)
        return super().forward(obs, action, h)


def spy(hidden=16):
    torch.manual_seed(0)
    model = Spy(TASK, hidden)
    model.calls = []
    return model


def test_one_forecast_step_is_teacher_forcing_with_a_loss_at_every_position():
    torch.manual_seed(0)
    model, b = rwm.RWM(TASK, 16), make_batch(M)
    # teacher forcing, written plainly: one parallel pass over the true states, every position predicts its successor
    mean, log_std, con, term, _ = model(b["obs"], b["action"])
    log_p = torch.distributions.Normal(mean, log_std.exp()).log_prob(b["next_obs"]).sum(-1)  # (B, M)
    nll = -log_p.mean() - 0.5 * math.log(2 * math.pi) * TASK.obs_dim  # the script drops the constant
    p_c, y_c = torch.sigmoid(con), b["next_contacts"]
    bce_c = -(y_c * p_c.log() + (1 - y_c) * (1 - p_c).log()).mean()
    p_d, y_d = torch.sigmoid(term), b["next_term"][..., 0]
    bce_d = -(y_d * p_d.log() + (1 - y_d) * (1 - p_d).log()).mean()
    torch.testing.assert_close(loss_of(model, b, 1), nll + bce_c + bce_d, rtol=1e-5, atol=1e-4)
    # every position counts: changing the target of the first step changes the loss (with N > 1 it would not)
    first = dict(b, next_obs=b["next_obs"].clone())
    first["next_obs"][:, 0] += 1.0
    assert not torch.allclose(loss_of(model, first, 1), loss_of(model, b, 1))


def test_gradients_flow_through_fed_back_samples():
    model, b = spy(), make_batch(M + 2)
    loss_of(model, b, 3).backward()
    fed_back = model.calls[1:]
    assert len(fed_back) == 2
    for obs in fed_back:
        assert obs.requires_grad and obs.grad is not None and obs.grad.abs().sum() > 0
    # ... and through them into the parameters: a loss on the last step only reaches the mean head via the samples
    assert model.mean[0].weight.grad.abs().sum() > 0


def test_warm_up_consumes_exactly_M_steps():
    N = 4
    model, b = spy(), make_batch(M + N - 1)
    loss_of(model, b, N)
    assert [o.shape[1] for o in model.calls] == [M] + [1] * (N - 1)
    torch.testing.assert_close(model.calls[0], b["obs"][:, :M])

    def loss_with(obs):
        torch.manual_seed(1)
        return loss_of(model, dict(b, obs=obs), N)

    base = loss_with(b["obs"])
    after = b["obs"].clone()
    after[:, M:] += 10.0  # true states after the history are never inputs
    torch.testing.assert_close(loss_with(after), base)
    last = b["obs"].clone()
    last[:, M - 1] += 1.0  # the last history step is
    assert not torch.allclose(loss_with(last), base)
    first = b["obs"].clone()
    first[:, 0] += 1.0  # and so is the first
    assert not torch.allclose(loss_with(first), base)


def test_imagination_starts_after_an_M_step_warm_up():
    buffer, rms = rwm.ReplayBuffer(TASK, 1, 50), rwm.Normalizer(TASK.obs_dim)
    states = torch.arange(51, dtype=torch.float32)[:, None].repeat(1, TASK.obs_dim)  # state t = t everywhere
    for t in range(50):
        buffer.add(np.array([0]), obs=states[t:t + 1].numpy(), action=np.zeros((1, TASK.act_dim)),
                   next_obs=states[t + 1:t + 2].numpy(), next_contacts=np.zeros((1, TASK.con_dim)), next_term=np.zeros(1))
    model = spy()
    im = rwm.Imagination(TASK, model, rms, buffer, 3, M, np.random.default_rng(0), "cpu")
    warm = model.calls[0]
    assert warm.shape[:2] == (3, M)
    # the imagined state is the real one right after the history, the GRU state is the warm-up's
    torch.testing.assert_close(im.state[:, 0], warm[:, -1, 0] + 1)
    torch.testing.assert_close(im.h, model(warm, torch.zeros(3, M, TASK.act_dim))[-1])


def test_forecasts_pair_each_state_with_its_own_action():
    """The model that predicts state M + k gets action M + k - 1 (the public evaluation is off by one)."""
    H = 4
    obs = torch.randn(2, M, TASK.obs_dim)
    action = torch.arange(M + H - 1, dtype=torch.float32)[None, :, None].repeat(2, 1, TASK.act_dim)  # action t = t
    model = spy()
    seen = []
    model.gru.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0, :, -1].tolist()))
    assert model.forecast(obs, action, H).shape == (2, H, TASK.obs_dim)
    assert sum(seen, []) == list(range(M + H - 1))
    mlp = rwm.MLPModel(TASK, M)
    windows = []
    mlp.next_obs = lambda o, a: windows.append(a[0, :, 0].tolist()) or o[:, -1]
    rwm.rolling_forecast(mlp, obs, action, H)
    assert windows == [list(range(k, k + M)) for k in range(H)]
    rssm = rwm.RSSMModel(TASK)
    used = []
    step = rssm.rssm.img_step
    rssm.rssm.img_step = lambda state, a, sample=True: used.append(a[0, 0].item()) or step(state, a, sample)
    rssm.forecast(obs, action, H)
    assert used[-H:] == list(range(M - 1, M + H - 1))


def test_relative_error_hand_case():
    target = torch.tensor([[[1.0, -1.0], [2.0, 2.0]], [[0.0, 2.0], [-4.0, 0.0]]])  # (B=2, H=2, D=2)
    pred = torch.tensor([[[1.5, -1.0], [2.0, 0.0]], [[0.0, 1.0], [-4.0, 2.0]]])
    # step 1: (0.5 + 1) / (1 + 1 + 2) ; step 2: (2 + 2) / (2 + 2 + 4)
    torch.testing.assert_close(rwm.relative_error(pred, target), torch.tensor([1.5 / 4, 4 / 8]))


class Oracle(torch.nn.Module):
    """A world model that predicts the simulator's recorded next states and contacts exactly."""

    def __init__(self, rms, nexts, contacts):
        super().__init__()
        self.gru = torch.nn.GRU(1, 4, 2)
        self.rms, self.queue = rms, list(zip(nexts, contacts))

    def forward(self, obs, action, h=None):
        n = obs.shape[0]
        if obs.shape[1] > 1:  # warm-up
            return obs, obs, torch.zeros(n, obs.shape[1], TASK.con_dim), torch.zeros(n, obs.shape[1]), torch.zeros(2, n, 4)
        nxt, con = self.queue.pop(0)
        return (self.rms(nxt.double())[:, None], torch.full((n, 1, TASK.obs_dim), -40.0), (2 * con - 1)[:, None] * 50,
                torch.full((n, 1), -50.0), h)


def test_actions_are_joint_position_targets():
    env = rwm.AntVelocityEnv(episode_steps=400, command_resample_steps=200)
    obs, _ = env.reset(seed=0)
    for _ in range(40):  # zero action: the PD loop holds the standing pose, on the ground, with small torques
        obs, _, terminated, _, _ = env.step(np.zeros(ANT.act_dim))
    assert not terminated and 0.3 < env.robot.data.qpos[2] < 0.7
    np.testing.assert_allclose(obs[ANT.joint_pos], rwm.DEFAULT_JOINT_POS, atol=0.05)
    assert np.abs(obs[ANT.torque]).max() < 5.0
    # each action moves its own joint (the Ant's actuators are listed in another order than its joints)
    for j in (0, 1, 6):
        env.reset(seed=0)
        action = np.zeros(ANT.act_dim)
        action[j] = -0.5 if j == 1 else 0.5  # targets 0.25 rad off the pose, inside the joint ranges
        for _ in range(40):
            obs, *_ = env.step(action)
        target = rwm.DEFAULT_JOINT_POS + rwm.ACTION_SCALE * action
        np.testing.assert_allclose(obs[ANT.joint_pos], target, atol=0.06)


def test_cheetah_state_contacts_and_termination():
    env = TASK(episode_steps=400, command_resample_steps=200)
    env.reset(seed=0)
    d = env.robot.data
    d.qvel[:] = 0.0
    d.qvel[0], d.qvel[2] = 1.5, 0.3  # forward velocity, pitch rate
    d.qpos[2] = 0.0
    mujoco.mj_forward(env.robot.model, d)
    state = env._state()
    assert state.shape == (TASK.obs_dim,)
    np.testing.assert_allclose(state[TASK.lin_vel], [1.5, 0.0], atol=1e-9)  # level: body frame = world frame
    np.testing.assert_allclose(state[TASK.ang_vel], [0.3])
    np.testing.assert_allclose(state[TASK.gravity], [0.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(state[TASK.joint_pos], d.qpos[3:9])
    env.reset(seed=0)
    for _ in range(20):  # zero torques: the cheetah settles on its feet, no undesired contact, no termination
        obs, _, terminated, _, info = env.step(np.zeros(TASK.act_dim))
        assert not terminated
    assert info["contacts"][:2].sum() >= 1 and info["contacts"][2:].sum() == 0
    env.reset(seed=0)
    env.robot.data.qpos[2] = TASK.MAX_PITCH + 0.2  # nose up past the limit: the episode ends on the next step
    mujoco.mj_forward(env.robot.model, env.robot.data)
    _, reward, terminated, _, _ = env.step(np.zeros(TASK.act_dim))
    assert terminated and reward < rwm.DT * TASK.reward_weights["termination"] + rwm.DT


def test_mlp_is_trained_autoregressively_on_its_own_predictions():
    torch.manual_seed(0)
    N, model = 3, rwm.MLPModel(TASK, M)
    b = make_batch(M + N - 1)
    obs = b["obs"][:, :M]
    preds = []
    for k in range(N):  # each prediction is fed back as the newest state of the next window
        preds.append(model.next_obs(obs[:, -M:], b["action"][:, k : k + M]))
        obs = torch.cat([obs, preds[-1][:, None]], 1)
    expected = torch.nn.functional.mse_loss(torch.stack(preds, 1), b["next_obs"][:, M - 1 :])
    loss = model.loss(b, N)
    torch.testing.assert_close(loss, expected)
    later = dict(b, obs=b["obs"].clone())
    later["obs"][:, M:] += 10.0  # true states after the history are never inputs
    torch.testing.assert_close(model.loss(later, N), loss)


def test_imagination_reward_matches_the_simulator():
    args = rwm.Args(**rwm.PRESETS["tiny"])
    env = rwm.make_env(args)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(30):
        state, command, prev_action = obs[:TASK.obs_dim], obs[TASK.obs_dim:], env.prev_action
        action = rng.uniform(-1, 1, TASK.act_dim) * 0.5
        obs, reward, terminated, truncated, info = env.step(action)
        assert not (terminated or truncated)
        rows.append((state, command, prev_action, action, obs[:TASK.obs_dim], info["contacts"], reward))
    assert np.std([r[-1] for r in rows]) > 0
    assert sum(r[5][:2].sum() for r in rows) > 0  # the feet touch the floor
    tensor = lambda i: torch.tensor(np.stack([r[i] for r in rows]), dtype=torch.float32)  # noqa: E731
    state, command, prev_action, action, next_state, contacts = (tensor(i) for i in range(6))
    sim_reward = torch.tensor([r[-1] for r in rows], dtype=torch.float32)
    # the reward function on the same states, in torch and batched
    no_term = torch.zeros(len(rows))
    torch.testing.assert_close(TASK.reward(state, next_state, action, prev_action, contacts, no_term, command),
                               sim_reward, rtol=1e-4, atol=1e-4)
    fell = TASK.reward(state, next_state, action, prev_action, contacts, no_term + 1, command)
    torch.testing.assert_close(fell - sim_reward, no_term + rwm.DT * TASK.reward_weights["termination"])
    # the imagination environment, stepping an oracle model through the recorded transitions one by one
    buffer, rms = rwm.ReplayBuffer(TASK, 1, 20), rwm.Normalizer(TASK.obs_dim)
    rms.update(next_state)
    for t in range(20):
        buffer.add(np.array([0]), obs=state[t:t + 1].numpy(), action=action[t:t + 1].numpy(),
                   next_obs=next_state[t:t + 1].numpy(), next_contacts=contacts[t:t + 1].numpy(), next_term=np.zeros(1))
    oracle = Oracle(rms, next_state[:, None], contacts[:, None])
    im = rwm.Imagination(TASK, oracle, rms, buffer, 1, M, np.random.default_rng(0), "cpu")
    im.state, im.prev_action, im.command = state[:1].clone(), prev_action[:1].clone(), command[:1].clone()
    for t in range(len(rows)):
        im.command = command[t:t + 1].clone()  # the simulator resamples commands; imagination keeps its own
        reward, done, time_out, _ = im.step(action[t:t + 1])
        assert done.item() == 0.0 and time_out.item() == 0.0
        torch.testing.assert_close(reward, sim_reward[t:t + 1], rtol=1e-5, atol=1e-5)


class Constant(torch.nn.Module):
    """A world model that keeps the state and gives every contact and the termination fixed logits."""

    def __init__(self, contact_logit, term_logit):
        super().__init__()
        self.gru = torch.nn.GRU(1, 4, 2)
        self.contact_logit, self.term_logit = contact_logit, term_logit

    def forward(self, obs, action, h=None):
        n, t = obs.shape[:2]
        return (obs, torch.full_like(obs, -40.0), torch.full((n, t, TASK.con_dim), self.contact_logit),
                torch.full((n, t), self.term_logit), torch.zeros(2, n, 4))


def test_imagined_contacts_enter_the_reward_as_probabilities_and_terminations_are_sampled():
    buffer, rms = rwm.ReplayBuffer(TASK, 1, 20), rwm.Normalizer(TASK.obs_dim)
    for t in range(20):
        buffer.add(np.array([0]), obs=np.full((1, TASK.obs_dim), 0.1 * t), action=np.zeros((1, TASK.act_dim)),
                   next_obs=np.full((1, TASK.obs_dim), 0.1 * t + 0.1), next_contacts=np.zeros((1, TASK.con_dim)),
                   next_term=np.zeros(1))
    p = 0.3
    torch.manual_seed(0)
    for term_prob, term_logit in ((0.0, -50.0), (0.25, math.log(0.25 / 0.75)), (1.0, 50.0)):
        im = rwm.Imagination(TASK, Constant(math.log(p / (1 - p)), term_logit), rms, buffer, 4000, M,
                             np.random.default_rng(0), "cpu")
        state, prev, command = im.state.clone(), im.prev_action.clone(), im.command.clone()
        action = torch.zeros(4000, TASK.act_dim)
        reward, done, _, _ = im.step(action)
        assert done.mean().item() == pytest.approx(term_prob, abs=0.03)  # a Bernoulli draw per agent
        contacts = torch.full((4000, TASK.con_dim), p)  # the expected contacts, not a threshold (which gives 0)
        expected = TASK.reward(state, state, action, prev, contacts, done, command)
        torch.testing.assert_close(reward, expected, rtol=1e-5, atol=1e-5)


def run(*flags, check=True, preset=("--preset", "tiny")):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "rwm_mbpo_ppo.py"), *preset, *flags],
                          capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def only_run(runs_dir):
    (name,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, name)


EVAL_KEYS = {"env_id", "episodes", "successes", "success_rate", "mean_return", "global_step", "wall_time_s",
             "mean_tracking_error"}


@pytest.mark.parametrize("mode", ["mbpo-ppo", "ppo-sim"])
def test_tiny_policy_learning_writes_outputs_and_resumes(mode, tmp_path):
    run("--mode", mode, "--runs-dir", str(tmp_path))
    run_dir = only_run(tmp_path)
    result = json.load(open(os.path.join(run_dir, "eval.json")))
    assert EVAL_KEYS <= set(result) and result["episodes"] == 2 and result["global_step"] > 0
    assert all(math.isfinite(result[k]) for k in ("mean_return", "mean_tracking_error"))
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu")
    assert {"agent", "obs_rms", "optimizer", "global_step", "iteration", "args"} <= set(ckpt)
    assert ckpt["obs_rms"]["count"] > 1  # normalisers travel with the policy
    if mode == "mbpo-ppo":
        assert {"world_model", "wm_optimizer", "buffer"} <= set(ckpt)
    agent = rwm.Agent(TASK)
    agent.load_state_dict(ckpt["agent"])
    more = ["--iterations", "5"] if mode == "mbpo-ppo" else ["--total-timesteps", "384"]
    run("--resume", run_dir, *more, preset=())  # the run's arguments
    resumed = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu")
    assert resumed["iteration"] > ckpt["iteration"] and resumed["global_step"] > ckpt["global_step"]
    assert json.load(open(os.path.join(run_dir, "eval.json")))["global_step"] == resumed["global_step"]


def test_tiny_prediction_study_writes_table(tmp_path):
    run("--mode", "prediction-study", "--runs-dir", str(tmp_path))
    run_dir = only_run(tmp_path)
    study = json.load(open(os.path.join(run_dir, "prediction_study.json")))
    H = rwm.PRESETS["tiny"]["study_eval_horizon"]
    assert set(study["models"]) == {"RWM-AR", "RWM-TF", "MLP", "RSSM", "Transformer"}
    for row in study["models"].values():
        for sigma in (0.0, 0.1, 0.2, 0.4, 0.5, 0.8):
            assert len(row[f"sigma_{sigma}"]["per_step"]) == H and math.isfinite(row[f"sigma_{sigma}"]["mean"])
    table = open(os.path.join(run_dir, "prediction_study.md")).read()
    assert table.count("\n| RWM-") == 2 and "σ=0.8" in table
    ckpt = torch.load(os.path.join(run_dir, "prediction_study.pt"), map_location="cpu")
    assert set(ckpt["models"]) == set(study["models"]) and "obs_rms" in ckpt
    picture = cv2.imread(os.path.join(run_dir, "forecasts.png"))  # Fig. 5: 5 windows x 4 state dimensions
    assert picture.shape == (24 + 5 * 150, 4 * 300, 3) and picture.min() == 0 and picture.max() == 255


def test_tiny_horizon_study_writes_grid(tmp_path):
    run("--mode", "horizon-study", "--runs-dir", str(tmp_path), "--study-history-horizons", "8", "4",
        "--study-forecast-horizons", "1", "4")
    run_dir = only_run(tmp_path)
    study = json.load(open(os.path.join(run_dir, "horizon_study.json")))
    assert set(study["models"]) == {"M=4,N=1", "M=4,N=4", "M=8,N=1", "M=8,N=4"}
    for row in study["models"].values():
        assert len(row["per_step"]) == 8 and row["mean"] == pytest.approx(np.mean(row["per_step"]))
    lines = open(os.path.join(run_dir, "horizon_study.md")).read().splitlines()
    assert lines[-2].startswith("| 4 | ") and lines[-1].startswith("| 8 | ") and lines[-3] == "| --- | --- | --- |"
    assert cv2.imread(os.path.join(run_dir, "horizon_study.png")).shape == (10 + 50 + 2 * 90, 10 + 50 + 2 * 90, 3)


def test_study_policy_of_another_task_is_refused(tmp_path):
    path = str(tmp_path / "ant.pt")
    rwm.save_checkpoint(path, args=rwm.asdict(rwm.Args(**rwm.PRESETS["paper"])), agent={})
    proc = run("--mode", "prediction-study", "--study-policy", path, "--runs-dir", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 1 and not (tmp_path / "runs").exists()
    assert proc.stderr == (f"error: --study-policy {path} is not a policy for CheetahVelocity-v5 (its env_id is "
                           f"'AntVelocity-v5')\n")


def test_bad_checkpoint_gives_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps(rwm.asdict(rwm.Args(**rwm.PRESETS["tiny"]))))
    bad = run_dir / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run("--resume", str(run_dir), check=False, preset=())
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], proc.stderr
    proc = run("--resume", str(bad), check=False, preset=())  # --resume takes the run directory, not the file
    assert proc.returncode == 1 and proc.stderr == (f"error: --resume {bad} is a file; --resume takes a run directory: "
                                                    f"--resume {run_dir}\n")


@pytest.mark.parametrize("flag, value, message", [
    ("--eval-every", "0", "eval_every (0) must be at least 1"), ("--gamma", "2", "gamma (2.0) must be in [0, 1]"),
    ("--wm-lr", "-1", "wm_lr (-1.0) must be positive"), ("--seed", "-2", "seed (-2) must not be negative"),
    ("--num-minibatches", "1000", "num_minibatches (1000) must not exceed the PPO batch (160)"),
    ("--pretrain-steps", "5", "pretrain_steps (5) and buffer_size (200) must be at least history_horizon + "
                              "forecast_horizon - 1 (11)")])
def test_bad_numbers_are_refused(monkeypatch, flag, value, message):
    monkeypatch.setattr(sys, "argv", ["rwm_mbpo_ppo.py", "--preset", "tiny", flag, value])
    with pytest.raises(SystemExit) as e:
        rwm.parse_args()
    assert str(e.value) == f"error: {message}"


def test_refused_command_leaves_no_run_directory_and_help_lists_the_presets(tmp_path):
    proc = run("--eval-every", "0", "--runs-dir", str(tmp_path / "runs"), check=False)
    assert proc.returncode == 1 and proc.stderr == "error: eval_every (0) must be at least 1\n"
    assert not (tmp_path / "runs").exists()
    proc = run("--help", preset=())
    presets = " ".join(proc.stdout.split("Presets (--preset NAME")[1].split())
    assert "tiny env_id=CheetahVelocity-v5, episode_steps=100, command_resample_steps=50" in presets
    assert "paper env_id=AntVelocity-v5, episode_steps=1000" in presets and "imagination_envs=4096" in presets


def test_ctrl_c_saves_the_pretraining_and_resume_continues_it(tmp_path, ctrl_c):
    code, out, err = ctrl_c([sys.executable, "rwm_mbpo_ppo.py", "--preset", "tiny", "--runs-dir", str(tmp_path),
                             "--pretrain-updates", "1000000"], when="pretrain world model: update 100/")
    run_dir = only_run(tmp_path)
    done = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu")["pretrain_updates_done"]
    assert code == 130 and done >= 100, (code, err)
    assert err.strip() == (f"interrupted (the world-model pretraining at update {done} saved); continue with: python "
                           f"rwm_mbpo_ppo.py --resume {run_dir}")
    interrupted = open(os.path.join(run_dir, "checkpoint.pt"), "rb").read()
    for _ in range(2):  # resumed, and once more from the same checkpoint as after a kill that lost the later one
        proc = run("--resume", run_dir, "--pretrain-updates", str(done + 100), "--iterations", "1", preset=())
        assert f"continues the world-model pretraining at update {done} of {done + 100}" in proc.stdout
        assert f"pretrain world model: update {done + 100}/" in proc.stdout and "update 100/" not in proc.stdout
        open(os.path.join(run_dir, "checkpoint.pt"), "wb").write(interrupted)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = [e.step for e in EventAccumulator(run_dir).Reload().Scalars("world_model/pretrain_loss")]
    assert steps == list(range(100, done + 101, 100)), "TensorBoard continues where the checkpoint was saved"


def test_checkpoint_of_another_config_names_the_field(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    args = rwm.Args(**rwm.PRESETS["tiny"])
    rwm.save_checkpoint(path, args=dict(vars(args), wm_hidden=64))
    with pytest.raises(SystemExit, match="wm_hidden=64"):
        rwm.load_checkpoint(path, args)
    assert not os.path.exists(path + ".tmp")
