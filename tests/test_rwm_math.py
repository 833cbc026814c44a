"""rwm_mbpo_ppo.py's core math against plain references written here: PPO's adaptive-KL learning rate, the
rollout's GAE across episode ends, the running normaliser's merge of batches, and replay windows that never
cross an episode boundary. Each test fails under a deliberate one-line bug (benchmarks/mutation_check.py)."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rwm_mbpo_ppo as rwm  # noqa: E402

torch.set_num_threads(1)
TASK = rwm.CheetahVelocityEnv


# ----------------------------------------------------------------------------------------------------
# PPO: the learning rate follows the KL between the rollout's policy and the current one (rsl_rl)
# ----------------------------------------------------------------------------------------------------
def ppo_batch(agent, n, mean_shift, gen):
    obs = torch.randn(n, TASK.policy_obs_dim, generator=gen)
    with torch.no_grad():
        mu = agent.actor(obs)
        actions = mu + torch.randn(n, TASK.act_dim, generator=gen)
        logprobs = torch.distributions.Normal(mu, 1.0).log_prob(actions).sum(-1)
    values = torch.randn(n, generator=gen)
    advantages = torch.randn(n, generator=gen)
    # the policy that collected the batch had its means shifted by mean_shift from the current one
    return dict(obs=obs, actions=actions, logprobs=logprobs, values=values, advantages=advantages,
                returns=advantages + values, mus=mu + mean_shift)


@pytest.mark.parametrize("mean_shift, lr", [(0.3, 1e-3), (0.0, 1e-3), (0.05, 1e-3), (0.3, 1.2e-5), (0.0, 8e-3)])
def test_ppo_learning_rate_follows_the_kl_to_the_rollout_policy(mean_shift, lr):
    torch.manual_seed(0)
    agent, gen = rwm.Agent(TASK), torch.Generator().manual_seed(1)
    with torch.no_grad():
        agent.log_std.fill_(-0.3)
    b = ppo_batch(agent, 64, mean_shift, gen)
    args = rwm.Args(**{**rwm.PRESETS["tiny"], "update_epochs": 3, "num_minibatches": 1, "learning_rate": lr})
    optimizer = torch.optim.Adam(agent.parameters(), lr=lr)
    before = []  # the policy (its means on the batch, its std) and the learning rate at every step
    optimizer.register_step_pre_hook(lambda opt, a, k: before.append(
        (agent.actor(b["obs"]).detach(), agent.log_std.exp().detach().clone(), opt.param_groups[0]["lr"])))
    std_old = agent.log_std.exp().detach().clone()
    stats = rwm.ppo_update(agent, optimizer, b, args)
    assert len(before) == 3
    ref_lr = lr
    for mu, std, used in before:
        # KL(old || new) of the diagonal Gaussians, averaged over the batch (one minibatch: all of it)
        old = torch.distributions.Normal(b["mus"], std_old.expand_as(mu))
        kl = torch.distributions.kl_divergence(old, torch.distributions.Normal(mu, std.expand_as(mu))).sum(-1).mean()
        if kl > 2 * args.desired_kl:
            ref_lr = max(1e-5, ref_lr / 1.5)
        elif kl < args.desired_kl / 2:
            ref_lr = min(1e-2, ref_lr * 1.5)
        assert used == pytest.approx(ref_lr, rel=1e-9), (kl.item(), used, ref_lr)
    assert stats["approx_kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert stats["learning_rate"] == pytest.approx(ref_lr) and optimizer.param_groups[0]["lr"] == pytest.approx(ref_lr)
    assert not torch.allclose(before[-1][1], std_old), "the std moved: the KL's log-std terms were exercised"


# ----------------------------------------------------------------------------------------------------
# The rollout's GAE: advantages stop at the step that ends an episode
# ----------------------------------------------------------------------------------------------------
T, B = 7, 3


class TableEnv:
    """An environment whose rewards, done and time-out flags come from tables; its observation is the step index t,
    and the state an episode reached at step t before its reset is observed as T + 1 + t."""

    def __init__(self, rewards, dones, time_outs=None):
        self.rewards, self.dones, self.t = rewards, dones, 0
        self.time_outs = torch.zeros_like(dones) if time_outs is None else time_outs

    def policy_obs(self):
        return torch.full((B, 1), float(self.t))

    def step(self, action):
        self.t += 1
        final_obs = torch.full((B, 1), float(T + self.t))
        return self.rewards[self.t - 1], self.dones[self.t - 1], self.time_outs[self.t - 1], final_obs


class TableAgent:
    """V(obs at step t) = values[t] (t = 0 .. T; values[T] is the bootstrap after the last step), and V of the state
    reached at step t before a reset = final_values[t]."""

    def __init__(self, values, final_values=None):
        self.values, self.final_values = values, final_values

    def get_value(self, obs):
        i = int(obs[0, 0])
        return self.values[i] if i <= T else self.final_values[i - T - 1]

    def get_action_and_value(self, obs):
        z = torch.zeros(B, TASK.act_dim)
        return z, torch.zeros(B), torch.zeros(B), self.get_value(obs), z


def reference_advantages(r, v, d, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, up to and including the step that ends the episode, whose delta has no
    bootstrap (the next value belongs to the next episode's first state)."""
    out = []
    for t in range(T):
        ref, discount = 0.0, 1.0
        for k in range(t, T):
            ref += discount * (r[k] + (0.0 if d[k] else gamma * v[k + 1]) - v[k])
            if d[k]:
                break
            discount *= gamma * lam
        out.append(ref)
    return out


def test_rollout_gae_stops_at_episode_ends():
    gamma, lam = 0.9, 0.8
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(T, B, generator=g), torch.randn(T + 1, B, generator=g)
    dones = torch.zeros(T, B)
    dones[2, 0] = dones[6, 1] = dones[0, 2] = dones[3, 2] = 1  # the episode ends with these steps
    b = rwm.rollout(TableAgent(values), TableEnv(rewards, dones), T, gamma, lam)
    advantages, returns = b["advantages"].view(T, B), b["returns"].view(T, B)
    for j in range(B):
        ref = reference_advantages(rewards[:, j].tolist(), values[:, j].tolist(), dones[:, j].tolist(), gamma, lam)
        for t in range(T):
            assert advantages[t, j].item() == pytest.approx(ref[t], rel=1e-5, abs=1e-6), (t, j)
            assert returns[t, j].item() == pytest.approx(ref[t] + values[t, j].item(), rel=1e-5, abs=1e-6)


def test_rollout_bootstraps_time_outs_with_the_value_of_the_state_reached():
    """rsl_rl: an episode cut by the time limit ends its GAE chain, but its last reward gets gamma V(s_final) (the
    state it reached, not the next episode's first state); an episode that terminates gets nothing."""
    gamma, lam = 0.9, 0.8
    g = torch.Generator().manual_seed(1)
    rewards, values, finals = (torch.randn(T, B, generator=g), torch.randn(T + 1, B, generator=g),
                               torch.randn(T, B, generator=g))
    dones, time_outs = torch.zeros(T, B), torch.zeros(T, B)
    dones[2, 0] = time_outs[2, 0] = 1  # env 0: a time-out at step 2
    dones[4, 1] = 1  # env 1: a termination at step 4
    dones[1, 2] = time_outs[1, 2] = dones[5, 2] = 1  # env 2: a time-out, then a termination
    b = rwm.rollout(TableAgent(values, finals), TableEnv(rewards, dones, time_outs), T, gamma, lam)
    advantages = b["advantages"].view(T, B)
    for j in range(B):
        r = (rewards[:, j] + gamma * time_outs[:, j] * finals[:, j]).tolist()
        ref = reference_advantages(r, values[:, j].tolist(), dones[:, j].tolist(), gamma, lam)
        for t in range(T):
            assert advantages[t, j].item() == pytest.approx(ref[t], rel=1e-5, abs=1e-6), (t, j)
    assert b["rewards"].view(T, B)[2, 0].item() == pytest.approx((rewards[2, 0] + gamma * finals[2, 0]).item())
    assert b["rewards"].view(T, B)[4, 1].item() == pytest.approx(rewards[4, 1].item())


# ----------------------------------------------------------------------------------------------------
# The running normaliser: batches merged exactly (mean, and variance with the between-batch term)
# ----------------------------------------------------------------------------------------------------
def test_normalizer_merges_batches_as_one_pooled_sample():
    g = np.random.default_rng(0)
    batches = [g.normal(2.0, 1.0, (50, TASK.obs_dim)), g.normal(-1.0, 3.0, (70, TASK.obs_dim)),
               g.normal(5.0, 0.5, (1, TASK.obs_dim)), g.normal(0.0, 2.0, (4, 2, TASK.obs_dim))]
    rms = rwm.Normalizer(TASK.obs_dim)
    for x in batches:
        rms.update(x)
    # the pooled mean and variance of all rows, plus the initial pseudo-sample (weight 1e-4, mean 0, variance 1)
    x = np.concatenate([b.reshape(-1, TASK.obs_dim) for b in batches])
    prior = 1e-4
    total = prior + len(x)
    mean = x.sum(0) / total
    var = (prior * (1.0 + mean**2) + ((x - mean) ** 2).sum(0)) / total
    assert rms.count.item() == pytest.approx(total)
    np.testing.assert_allclose(rms.mean.numpy(), mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rms.var.numpy(), var, rtol=1e-10)
    y = torch.as_tensor(x[:5])
    torch.testing.assert_close(rms(y), torch.as_tensor((x[:5] - mean) / np.sqrt(var + 1e-8), dtype=torch.float32))
    torch.testing.assert_close(rms.denormalize(rms(y).double()), y.float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Replay: windows of consecutive steps of one episode, from the steps the FIFO still holds
# ----------------------------------------------------------------------------------------------------
def test_replay_windows_never_cross_an_episode_boundary_or_the_fifo_start():
    E, size, steps, L = 2, 30, 55, 5
    ends = {0: {6, 7, 19, 40}, 1: {12, 30, 33, 34}}  # steps after which each env's episode ends
    buffer, episode, next_id = rwm.ReplayBuffer(TASK, E, size), np.array([0, 1]), 2
    for t in range(steps):
        obs = np.zeros((E, TASK.obs_dim), np.float32)
        obs[:, 0], obs[:, 1] = episode, t  # each step carries its episode id and its time
        buffer.add(episode.copy(), obs=obs, action=np.zeros((E, TASK.act_dim)), next_obs=obs,
                   next_contacts=np.zeros((E, TASK.con_dim)), next_term=np.zeros(E))
        for e in range(E):
            if t in ends[e]:
                episode[e], next_id = next_id, next_id + 1
    # every (env, start) whose L steps lie in one episode and in the last `size` steps, by brute force
    valid = set()
    for e in range(E):
        for s in range(steps - size, steps - L + 1):
            if not any(s <= end < s + L - 1 for end in ends[e]):
                valid.add((e, s))
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = buffer.sample(64, L, rng)
        ids, times = b["obs"][..., 0], b["obs"][..., 1]
        assert (ids == ids[:, :1]).all(), "a window spans two episodes"
        assert (times - times[:, :1] == torch.arange(L)).all(), "a window is not consecutive steps"
        assert (times[:, 0] >= steps - size).all(), "a window reaches past the FIFO's oldest step"
        for i, t0 in zip(ids[:, 0].tolist(), times[:, 0].tolist()):
            e = next(e for e in range(E) if any(
                buffer.episode[e, int(t) % size] == i for t in range(steps - size, steps)))
            seen.add((e, int(t0)))
    assert seen == valid, (sorted(valid - seen), sorted(seen - valid))
