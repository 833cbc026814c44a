"""dmo_sapo_diamond.py's core math against plain references written here, with stub networks whose values and
Jacobians are known: SAPO's actor objective (eq. 1) and its gradient path (DMO), the critic's TD(lambda) targets,
the temperature's direction, the action convention of every place that feeds actions to the RSSM or to DIAMOND,
EDM's training target and the Euler sampler. Each test fails under a deliberate one-line bug
(benchmarks/mutation_check.py applies them)."""

import copy
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmo_sapo_diamond as dmo  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------
# SAPO's actor objective in one horizon (imagine_horizon), with linear stubs
# ----------------------------------------------------------------------------------------------------
B, H, D, A = 4, 3, 2, 2  # rollouts, horizon, latent size (= feature size), action size
GAMMA, ALPHA, TARGET = 0.9, 0.3, -2.0
M = torch.tensor([[1.0, 0.3], [-0.2, 2.0]])  # the RSSM's prior: l' = l + M a (its Jacobian: what DMO follows)
K = torch.tensor([[0.5, -0.1], [0.2, 0.4]])  # the actor: a = K l + theta
Q = torch.tensor([0.7, -1.3])  # the actor's log-prob: q . a + C
C = 0.25
W, W0 = torch.tensor([1.5, -0.5]), 0.4  # R_phi(l) = w . l + w0 (its value differs from r's; its gradient is w)
GOAL = torch.tensor([0.3, -0.2])


def true_step(obs, action):
    """The forward model f-> (no gradient, a Jacobian other than the RSSM's) and the reward r of its next frame."""
    nxt = 0.9 * obs + 0.5 * action
    return nxt, -((nxt - GOAL) ** 2).sum(-1)


class LinearRSSM(torch.nn.Module):
    """A local model whose posterior is the forward model's observation (encode = identity) and whose prior is
    l + M a: DMO's step has the posterior's value and the prior's Jacobian (as rssm.RSSM.decoupled_step)."""

    image = False

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(obs_shape=(D,))
        self.feat_dim = D
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def feat(self, state):
        return state["deter"]

    def encode(self, obs):
        return obs

    def img_step(self, state, action, sample=True):
        return {"deter": state["deter"] + action @ M.T}

    def decoupled_step(self, state, action, embed, sample=True):
        prior = self.img_step(state, action)["deter"]
        return {"deter": prior + (embed - prior).detach()}

    def reward(self, feat):
        return feat @ W + W0


class LinearActor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.1, -0.2]))

    def forward(self, feat):
        action = feat @ K.T + self.theta
        return action, action @ Q + C


class StubRollouts:
    def __init__(self, obs):
        self.obs, self.state, self.reward = obs.clone(), {"deter": obs.clone()}, torch.full((B,), -7.0)
        self.forwarded, self.pushed = [], []

    @torch.no_grad()
    def forward(self, action):
        self.forwarded.append(action)
        nxt, r = true_step(self.obs, action)
        return nxt, nxt, r

    def push(self, frame, obs, action):
        self.pushed.append((frame, obs, action))
        self.obs = obs


def reference_horizon(obs0, theta, critic):
    """eq. (1)'s three terms per rollout and their gradients w.r.t. theta (summed over rollouts), by hand: the
    values from the forward model's states and r, the gradients through the RSSM's Jacobians only,
    J_{h+1} = d l_{h+1} / d theta = (I + M K) J_h + M, J_0 = 0, d a_h / d theta = K J_h + I."""
    obs, J = obs0.clone(), torch.zeros(D, A)
    reward, entropy = torch.zeros(B), torch.zeros(B)
    g_reward, g_entropy = torch.zeros(A), torch.zeros(A)
    steps = []
    for h in range(H):
        action = obs @ K.T + theta
        log_prob = action @ Q + C
        nxt, r = true_step(obs, action)
        bonus = ALPHA * (-log_prob - TARGET) / (2 * abs(TARGET))  # the bonus as the code scales it
        reward += GAMMA**h * r  # the value of r (never R_phi's)
        entropy += GAMMA**h * bonus
        g_entropy += B * GAMMA**h * ALPHA / (2 * abs(TARGET)) * -(Q @ (K @ J + torch.eye(A)))
        J = (torch.eye(D) + M @ K) @ J + M
        g_reward += B * GAMMA**h * (W @ J)  # the gradient of R_phi (never r's)
        steps.append(dict(obs=obs, action=action, log_prob=log_prob, r=r, bonus=bonus))
        obs = nxt
    last = obs.clone().requires_grad_()
    v = torch.minimum(critic.nets[0](last).squeeze(-1), critic.nets[1](last).squeeze(-1))  # the twin minimum
    (dv,) = torch.autograd.grad(v.sum(), last)
    bootstrap = GAMMA**H * v.detach()
    g_bootstrap = GAMMA**H * (dv @ J).sum(0)
    return (reward, entropy, bootstrap), (g_reward, g_entropy, g_bootstrap), steps, obs


@pytest.fixture
def horizon():
    torch.manual_seed(0)
    obs0 = torch.randn(B, D)
    critic = dmo.Critic(D, [8])
    args = SimpleNamespace(num_envs=B, horizon=H, forward_model="diamond", gamma=GAMMA, target_entropy=TARGET)
    actor, rssm, rollouts = LinearActor(), LinearRSSM(), StubRollouts(obs0)
    terms, traj = dmo.imagine_horizon(args, actor, critic, rssm, rollouts, torch.tensor(ALPHA))
    ref_terms, ref_grads, steps, last = reference_horizon(obs0, actor.theta.detach(), critic)
    return SimpleNamespace(terms=terms, traj=traj, actor=actor, critic=critic, rollouts=rollouts, ref_terms=ref_terms,
                           ref_grads=ref_grads, steps=steps, last=last)


def test_sapo_objective_terms_have_the_values_of_equation_1(horizon):
    # the critic's two heads disagree on which is lower across the rollouts: a max or a mean would differ
    last = horizon.last
    v0, v1 = (net(last).squeeze(-1).detach() for net in horizon.critic.nets)
    assert (v0 < v1).any() and (v1 < v0).any()
    for name, term, ref in zip(("reward", "entropy", "bootstrap"), horizon.terms, horizon.ref_terms):
        assert term.shape == (B,), name
        torch.testing.assert_close(term.detach(), ref, rtol=1e-5, atol=1e-6, msg=name)
    assert (horizon.ref_terms[1].abs() > 0.05).all(), "the entropy bonus is not near zero (its sign matters)"


def test_sapo_gradient_flows_through_the_rssm_and_the_reward_head_only(horizon):
    # the reward's gradient is R_phi's along the RSSM's Jacobians, the forward model only gives values
    for name, term, ref in zip(("reward", "entropy", "bootstrap"), horizon.terms, horizon.ref_grads):
        (g,) = torch.autograd.grad(term.sum(), horizon.actor.theta, retain_graph=True)
        assert ref.abs().max() > 1e-2, name
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6, msg=name)
    for action, step in zip(horizon.rollouts.forwarded, horizon.steps):
        assert not action.requires_grad, "the forward model gets the action detached"
        torch.testing.assert_close(action, step["action"])


def test_imagined_trajectory_for_the_critic_and_the_replay(horizon):
    traj, steps = horizon.traj, horizon.steps
    torch.testing.assert_close(traj["feats"], torch.stack([s["obs"] for s in steps]))  # l_0 .. l_{H-1}
    torch.testing.assert_close(traj["last_feat"], horizon.last)  # l_H
    torch.testing.assert_close(traj["rewards"], torch.stack([s["r"] for s in steps]))
    torch.testing.assert_close(traj["soft_rewards"], torch.stack([s["r"] + s["bonus"] for s in steps]))
    torch.testing.assert_close(traj["entropies"], torch.stack([-s["log_prob"] for s in steps]))
    assert not any(traj[k].requires_grad for k in ("feats", "last_feat", "soft_rewards", "entropies"))
    # the replay chunk, in the RSSM's convention: actions[:, t] led into frame t (zero into the first)
    frames, actions, rewards = traj["chunk"]
    torch.testing.assert_close(frames, torch.stack([s["obs"] for s in steps] + [horizon.last], 1))
    torch.testing.assert_close(actions, torch.stack([torch.zeros(B, A)] + [s["action"] for s in steps], 1))
    torch.testing.assert_close(rewards, torch.stack([torch.full((B,), -7.0)] + [s["r"] for s in steps], 1))
    replay = dmo.Replay(10 * (H + 1), H, (D,), torch.float32)
    replay.add(*traj["chunk"])
    obs, acts, is_first, rews = replay.sample(16, "cpu")
    assert is_first[:, 0].all() and not is_first[:, 1:].any()
    for o, a in zip(obs, acts):  # each sampled chunk is one of the stored ones, frames and actions still paired
        i = (frames - o).abs().sum((1, 2)).argmin()
        assert torch.equal(o, frames[i]) and torch.equal(a, actions[i])
    # the rollouts continue from l_H, with the graph cut
    assert not horizon.rollouts.state["deter"].requires_grad
    torch.testing.assert_close(horizon.rollouts.state["deter"], horizon.last)
    torch.testing.assert_close(horizon.rollouts.reward, steps[-1]["r"])


# ----------------------------------------------------------------------------------------------------
# dmo_sapo's updates: the actor loss, the critic's targets, the temperature (one horizon stubbed)
# ----------------------------------------------------------------------------------------------------
class RecordingCritic(dmo.Critic):
    """The script's critic; its initial parameters are kept, and every training call records (input, output, d loss /
    d output), from which the regression target is recovered: loss = sum_k mean_i (V_k(x_i) - G_i)^2."""

    made = []

    def __init__(self, *a):
        super().__init__(*a)
        self.args, self.initial_state, self.records = a, copy.deepcopy(self.state_dict()), []
        RecordingCritic.made.append(self)

    def forward(self, feat):
        out = super().forward(feat)
        if out.requires_grad:
            out.register_hook(lambda g: self.records.append((feat.detach(), out.detach(), g)))
        return out


def run_dmo_sapo(monkeypatch, tmp_path, entropy_offset, epochs=2):
    F_, HB = 3, H * B
    gen = torch.Generator().manual_seed(1)
    traj = {"feats": torch.randn(H, B, F_, generator=gen), "last_feat": torch.randn(B, F_, generator=gen),
            "soft_rewards": torch.randn(H, B, generator=gen), "rewards": torch.randn(H, B, generator=gen) - 5,
            "chunk": None}
    # entropies: mean above (or below) the target by entropy_offset, single values on both sides of it
    traj["entropies"] = TARGET + entropy_offset + torch.linspace(-2, 2, HB).view(H, B)
    coef = torch.randn(3, B, generator=gen)  # eq. (1)'s terms: coef_i * s, s = the sum of the actor's parameters
    calls = []

    def fake_imagine(args, actor, critic, rssm, rollouts, alpha):
        calls.append(dict(actor=actor, alpha=alpha.detach().clone()))
        s = sum(p.sum() for p in actor.parameters())
        return tuple(c * s for c in coef), traj

    class NoRollouts:
        def __init__(self, *a, **k):
            pass

        def restart_finished(self):
            pass

    RecordingCritic.made = []
    monkeypatch.setattr(dmo, "imagine_horizon", fake_imagine)
    monkeypatch.setattr(dmo, "Rollouts", NoRollouts)
    monkeypatch.setattr(dmo, "Critic", RecordingCritic)
    args = dmo.Args(**{**dmo.PRESETS["tiny"], "epochs": epochs, "num_envs": B, "horizon": H, "hidden": [8],
                       "no_rssm_finetune": True, "eval_every": 0, "patch_every": 0, "save_model": False,
                       "critic_epochs": 1, "critic_minibatch": HB, "max_grad_norm": 1e9, "gamma": GAMMA, "lam": 0.8,
                       "target_entropy": TARGET, "init_alpha": 0.5, "alpha_lr": 0.01})
    rssm = LinearRSSM()
    rssm.feat_dim = F_
    writer = SimpleNamespace(add_scalar=lambda *a, **k: None)
    actor, _, _ = dmo.dmo_sapo(args, None, None, None, None, rssm, torch.optim.Adam(rssm.parameters()),
                               torch.device("cpu"), writer, str(tmp_path))
    return SimpleNamespace(actor=actor, calls=calls, critic=RecordingCritic.made[0], traj=traj, coef=coef, args=args)


def test_actor_loss_is_equation_1_negated_averaged_and_divided_by_H(monkeypatch, tmp_path):
    run = run_dmo_sapo(monkeypatch, tmp_path, entropy_offset=1.0)
    assert run.calls[0]["actor"] is run.actor
    # loss = -(1/H) mean_b (reward_b + entropy_b + bootstrap_b); each term is coef * s, ds/dp = 1 for every p
    expected = -run.coef.sum(0).mean().item() / H
    for p in run.actor.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, expected))


def test_critic_targets_are_td_lambda_of_the_soft_rewards_with_the_twin_minimum(monkeypatch, tmp_path):
    run = run_dmo_sapo(monkeypatch, tmp_path, entropy_offset=1.0, epochs=1)
    traj, gamma, lam = run.traj, run.args.gamma, run.args.lam
    initial = dmo.Critic(*run.critic.args)
    initial.load_state_dict(run.critic.initial_state)
    nets = initial.nets
    # V(s_{h+1}) for h < H - 1 is the next step's feature; after the last step, the final feature l_H
    nxt = torch.cat([traj["feats"][1:], traj["last_feat"][None]])
    with torch.no_grad():
        v = torch.minimum(nets[0](nxt).squeeze(-1), nets[1](nxt).squeeze(-1)).tolist()
    soft = traj["soft_rewards"].tolist()
    ref = torch.zeros(H, B)
    for b in range(B):  # G_{H-1} = r + gamma V_H; G_h = r_h + gamma ((1 - lam) V_{h+1} + lam G_{h+1})
        g = soft[H - 1][b] + gamma * v[H - 1][b]
        ref[H - 1, b] = g
        for h in reversed(range(H - 1)):
            g = soft[h][b] + gamma * ((1 - lam) * v[h][b] + lam * g)
            ref[h, b] = g
    (feat, out, grad), = run.critic.records  # one minibatch of all H x B features
    n = len(feat)
    assert n == H * B
    targets = out - grad * n / 2  # d/d out of sum_k mean_i (out_ki - G_i)^2 = 2 (out_ki - G_i) / n
    torch.testing.assert_close(targets[0], targets[1])
    flat = traj["feats"].flatten(0, 1)
    order = torch.cdist(feat, flat).argmin(1)  # the minibatch is a permutation of the features
    assert sorted(order.tolist()) == list(range(n)) and torch.equal(feat, flat[order])
    torch.testing.assert_close(targets[0], ref.flatten()[order], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entropy_offset", [1.0, -1.0])
def test_temperature_falls_above_the_target_entropy_and_rises_below(monkeypatch, tmp_path, entropy_offset):
    run = run_dmo_sapo(monkeypatch, tmp_path, entropy_offset)
    alphas = [c["alpha"].item() for c in run.calls]
    assert alphas[0] == pytest.approx(run.args.init_alpha)
    # Adam's first step moves log alpha by lr against the sign of d loss / d log alpha = alpha |target| (H - target)
    expected = run.args.init_alpha * math.exp(-run.args.alpha_lr * np.sign(entropy_offset))
    assert alphas[1] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# The action convention: the data file stores the action taken after obs[t]; the RSSM takes the action that led
# into frame t (zero into an episode's first frame); DIAMOND is conditioned on the actions after its past frames
# ----------------------------------------------------------------------------------------------------
def coded_data(n=40, size=16):
    gen = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    action = torch.stack([torch.arange(n) / 100.0, -torch.arange(n) / 200.0], 1)  # action[t] = (t, -t/2) / 100
    is_first = torch.zeros(n, dtype=torch.bool)
    is_first[0] = True
    return dict(obs=obs, action=action, is_first=is_first, episode=torch.zeros(n, dtype=torch.long), state=None,
                reward=torch.arange(n, dtype=torch.float32))


def test_rssm_pretraining_sequences_take_the_action_into_each_frame():
    data = coded_data()
    idx = torch.tensor([3, 11, 20])[:, None] + torch.arange(6)
    frames, actions, is_first = dmo.rssm_sequences(data, idx)
    torch.testing.assert_close(frames, dmo.to_float(data["obs"][idx]))
    assert torch.equal(actions[:, 0], torch.zeros(3, 2)), "no action leads into a sequence's first frame"
    assert torch.equal(actions[:, 1:], data["action"][idx[:, :-1]]), "frame t follows the action taken after t - 1"
    assert is_first[:, 0].all() and not is_first[:, 1:].any()


def test_imagination_starts_are_filtered_with_the_action_into_each_frame():
    data, n = coded_data(), 4
    seen = {}

    class Recorder:  # the RSSM calls play_context makes
        image = True

        def encode(self, x):
            return x

        def observe(self, embed, actions, is_first, sample=True):
            seen.update(embed=embed, actions=actions, is_first=is_first)
            return {"deter": embed.flatten(2)}, None

    first = torch.tensor([0, 9, 30])
    frames, actions, _ = dmo.play_context(data, Recorder(), first, n)
    idx = first[:, None] + torch.arange(n)
    torch.testing.assert_close(seen["embed"], dmo.to_float(data["obs"][idx]) / 2)
    assert torch.equal(seen["actions"][:, 0], torch.zeros(3, 2))
    assert torch.equal(seen["actions"][:, 1:], data["action"][idx[:, :-1]])
    assert seen["is_first"][:, 0].all() and not seen["is_first"][:, 1:].any()
    # DIAMOND's context: the frames and the actions taken after all but the last (the policy's comes next)
    assert torch.equal(frames, dmo.to_float(data["obs"][idx])) and torch.equal(actions, data["action"][idx[:, :-1]])


def test_evaluation_feeds_the_rssm_the_action_that_led_into_each_frame(monkeypatch):
    args = dmo.Args(**{**dmo.PRESETS["tiny"], "env_id": "PushTReach-v0"})
    torch.manual_seed(0)
    rssm = dmo.RSSM(dmo.RSSMConfig.preset("tiny", obs_shape=(3, 32, 32), action_dim=2)).eval()
    seen, taken = [], []
    obs_step = rssm.obs_step
    monkeypatch.setattr(rssm, "obs_step", lambda state, action, embed, is_first, sample=True: seen.append(
        (action.clone(), embed.clone(), is_first.clone())) or obs_step(state, action, embed, is_first, sample))

    def actor(feat, deterministic=True):  # a different action at every step and in every episode
        t = len(taken)
        action = torch.tensor([[0.1 * (t + 1), -0.05 * (t + 1)], [-0.2, 0.03 * t]])
        taken.append(action)
        return action, None

    steps = 4
    _, _, (frames, actions, alive) = dmo.evaluate(args, rssm, actor, 2, args.eval_seed, torch.device("cpu"),
                                                  keep=steps, steps=steps)
    assert len(seen) == steps and alive.all()
    assert torch.equal(seen[0][0], torch.zeros(2, 2)) and seen[0][2].all()
    for t in range(1, steps):
        assert torch.equal(seen[t][0], taken[t - 1]), f"step {t}: the action taken after frame {t - 1}"
        assert not seen[t][2].any()
    for t in range(steps):  # ... with the embedding of frame t itself, and the kept actions taken after frame t
        torch.testing.assert_close(seen[t][1], rssm.encode(frames[:, t] / 2))
        assert torch.equal(actions[:, t], taken[t])


def test_diamond_rollouts_condition_each_frame_on_the_actions_after_its_past_frames():
    data, n = coded_data(), 4
    args = dmo.Args(**{**dmo.PRESETS["tiny"], "img_size": 16, "num_envs": 3, "wm_context": n,
                       "forward_model": "diamond"})
    torch.manual_seed(0)
    rssm = dmo.RSSM(dmo.RSSMConfig.preset("tiny", obs_shape=(3, 16, 16), action_dim=2)).eval()

    class Reward:  # r: the mean pixel of the frame
        embed_dim = 1

        def embed(self, frames):
            return frames.mean((-3, -2, -1))[..., None]

        def reward(self, e, e_start, e_goal):
            return e[..., 0]

    calls = []

    class Diamond:
        def sample(self, past_frames, past_actions, steps):
            calls.append((past_frames.clone(), past_actions.clone()))
            return torch.rand_like(past_frames[:, -1])

    rollouts = dmo.Rollouts(args, data, rssm, Reward(), torch.zeros(1, 1), torch.device("cpu"), Diamond())
    # each rollout's window: the play index of its first frame (the coded frames are all different)
    first = [int((data["obs"] == dmo.to_uint8(rollouts.frames[i, 0])).flatten(1).all(1).nonzero()[0]) for i in range(3)]
    a1, a2 = torch.rand(3, 2), torch.rand(3, 2)
    frame1, _, _ = rollouts.forward(a1)
    rollouts.push(frame1, frame1, a1)
    rollouts.forward(a2)
    for i, f in enumerate(first):
        past, acts = calls[0][0][i], calls[0][1][i]
        assert torch.equal(past, dmo.to_float(data["obs"][f:f + n]))
        assert torch.equal(acts[:n - 1], data["action"][f:f + n - 1]) and torch.equal(acts[-1], a1[i])
        past, acts = calls[1][0][i], calls[1][1][i]  # the window slid by the generated frame and its action
        assert torch.equal(past[:-1], dmo.to_float(data["obs"][f + 1:f + n])) and torch.equal(past[-1], frame1[i])
        assert torch.equal(acts[:n - 2], data["action"][f + 1:f + n - 1])
        assert torch.equal(acts[-2], a1[i]) and torch.equal(acts[-1], a2[i])


# ----------------------------------------------------------------------------------------------------
# EDM (DIAMOND): the training target and the Euler sampler against the formulas, with a stub network F
# ----------------------------------------------------------------------------------------------------
def edm_coefficients(sigma):
    """ALGORITHMS.md §3 with sigma_data 0.5 and offset noise 0.3, written out."""
    s = torch.sqrt(sigma**2 + 0.3**2)
    return s * 0.5 / torch.sqrt(s**2 + 0.25), 0.25 / (s**2 + 0.25)  # c_out, c_skip


def small_denoiser():
    torch.manual_seed(0)
    return dmo.Denoiser(action_dim=2, context=4, channels=[8, 8], depths=[1, 1], cond=16)


def test_edm_training_target_and_the_autoregressive_step():
    d, n = small_denoiser(), 4
    calls = []

    def F_(noisy, sigma, past_frames, past_actions):  # a stub network with a known output
        out = 0.3 * noisy - 0.1 * past_frames[:, -1] + 0.05
        calls.append(dict(noisy=noisy.clone(), sigma=sigma.clone(), past=past_frames.clone(),
                          actions=past_actions.clone(), out=out))
        return out

    d.model_output = F_
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(6, n + 2, 3, 8, 8, generator=gen) * 2 - 1  # one extra autoregressive step
    actions = torch.rand(6, n + 2, 2, generator=gen) * 2 - 1
    loss = d.loss(frames, actions)
    assert len(calls) == 2
    ref, past = 0.0, frames.clone()
    for i, c in enumerate(calls):
        assert torch.equal(c["past"], past[:, i:n + i]) and torch.equal(c["actions"], actions[:, i:n + i])
        c_out, c_skip = (x[:, None, None, None] for x in edm_coefficients(c["sigma"]))
        target = frames[:, n + i]
        # F's target: (x - c_skip x~) / c_out, the loss averaged over the two steps
        ref += ((c["out"] - (target - c_skip * c["noisy"]) / c_out) ** 2).mean() / 2
        # the next step is conditioned on the (quantised) one-step prediction D = c_skip x~ + c_out F
        past[:, n + i] = dmo.quantize(c_skip * c["noisy"] + c_out * c["out"])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_edm_training_noise_levels():
    d = small_denoiser()
    calls = []
    d.model_output = lambda noisy, sigma, past, acts: calls.append((noisy, sigma)) or torch.zeros_like(noisy)
    torch.manual_seed(0)
    frames = torch.rand(4000, 5, 3, 4, 4) * 2 - 1
    d.loss(frames, torch.zeros(4000, 5, 2))
    (noisy, sigma), = calls
    log_sigma = sigma.log()
    assert sigma.min() >= 2e-3 and sigma.max() <= 20
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.06)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.06)
    # x~ = x + offset (per channel) + sigma eps: within a channel the pixels scatter with sigma
    spread = (noisy - frames[:, 4]).var((2, 3)) / sigma[:, None] ** 2
    assert spread.mean().item() == pytest.approx(1.0, abs=0.05)


def test_denoiser_output_is_c_skip_x_plus_c_out_f():
    d = small_denoiser()
    d.model_output = lambda noisy, sigma, past, acts: 0.5 * torch.tanh(noisy) - 0.2
    x = torch.randn(5, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 1.0, 2.5, 10.0])
    c_out, c_skip = (c[:, None, None, None] for c in edm_coefficients(sigma))
    ref = dmo.quantize(c_skip * x + c_out * (0.5 * torch.tanh(x) - 0.2))
    torch.testing.assert_close(d.denoise(x, sigma, None, None), ref)


def test_euler_sampler_steps_along_dx_dsigma():
    d, steps = small_denoiser(), 3
    mu, s2 = 0.2, 0.3**2  # D is the ideal denoiser of N(mu, s^2) data: mu + s^2 / (s^2 + sigma^2) (x - mu)
    seen = []

    def D(x, sigma, past, acts):
        seen.append(sigma.clone())
        return mu + s2 / (s2 + sigma[:, None, None, None] ** 2) * (x - mu)

    d.denoise = D
    past = torch.zeros(2, 4, 3, 8, 8)
    out = d.sample(past, torch.zeros(2, 4, 2), steps, generator=torch.Generator().manual_seed(3))
    # reference: the Karras schedule and x <- x + (x - D(x)) / sigma (sigma_next - sigma), returning the last D
    rho, lo, hi = 7, 2e-3, 5.0
    sigmas = [(hi ** (1 / rho) + k / (steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for k in range(steps)]
    sigmas.append(0.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    for k in range(steps):
        denoised = mu + s2 / (s2 + sigmas[k] ** 2) * (x - mu)
        x = x + (x - denoised) / sigmas[k] * (sigmas[k + 1] - sigmas[k])
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), torch.tensor(sigmas[:-1]))
    torch.testing.assert_close(out, denoised)
    torch.testing.assert_close(x, denoised)  # the last step, to sigma = 0, lands on D
