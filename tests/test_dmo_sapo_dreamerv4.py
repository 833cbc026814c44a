"""dmo_sapo_dreamerv4.py: shortcut forcing, the block-causal dynamics and its KV cache, the tokenizer, the reward
head, distributed training, and runs of the whole pipeline."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import dmo_sapo_dreamerv4 as dv4
import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)


def small_dynamics(max_shortcut=8, registers=1):
    torch.manual_seed(0)
    return dv4.Dynamics(latents=3, bottleneck=4, dim=32, layers=2, heads=2, registers=registers,
                        max_shortcut=max_shortcut).eval()


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, "dmo_sapo_dreamerv4.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def play_data(tmp_path_factory):
    """600 frames of EgoPushCube-v0 play with labels, as the tiny preset collects."""
    path = tmp_path_factory.mktemp("data") / "EgoPushCube-v0_play_600.npz"
    envs.save_dataset(str(path), envs.collect("EgoPushCube-v0", 600, seed=0, verbose=False))
    return str(path)


class PerfectPredictor(nn.Module):
    """A 'dynamics' whose x-prediction is always the clean latents z1: every step of its sampler goes straight."""

    def __init__(self, z1, max_shortcut):
        super().__init__()
        self.z1, self.max_shortcut = z1, max_shortcut

    def forward(self, z, tau, d, actions):
        return self.z1.expand_as(z), None


class LinearPredictor(nn.Module):
    """f(z, tau, d) = 0.5 z + tau + 2 d, to check the two half steps by hand."""

    max_shortcut = 8

    def forward(self, z, tau, d, actions):
        return 0.5 * z + tau[..., None, None] + 2 * d[..., None, None], None


def test_shortcut_target_is_the_straight_velocity_for_a_perfect_predictor():
    torch.manual_seed(0)
    z1, noise = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    tau = torch.tensor([[0.0, 0.25, 0.5], [0.5, 0.0, 0.75]])
    d = torch.tensor([[0.5, 0.25, 0.5], [0.25, 1.0, 0.25]])
    z_noisy = (1 - tau[..., None, None]) * noise + tau[..., None, None] * z1
    target = dv4.shortcut_targets(PerfectPredictor(z1, 8), z_noisy, tau, d, torch.zeros(2, 3, 3))
    torch.testing.assert_close(target, z1 - noise)  # the flow's velocity, whatever tau and d


def test_shortcut_target_matches_a_hand_computation():
    z = torch.full((1, 1, 1, 1), 0.4)
    tau, d = torch.tensor([[0.25]]), torch.tensor([[0.5]])
    # first half step (d/2 = 0.25) from tau 0.25: f = 0.2 + 0.25 + 0.5 = 0.95, b' = (0.95 - 0.4) / 0.75
    b1 = 0.55 / 0.75
    z_mid = 0.4 + 0.25 * b1
    # second half step from tau 0.5: f = 0.5 z' + 0.5 + 0.5, b'' = (f - z') / 0.5
    b2 = (0.5 * z_mid + 1.0 - z_mid) / 0.5
    target = dv4.shortcut_targets(LinearPredictor(), z, tau, d, torch.zeros(1, 1, 3))
    assert target.item() == pytest.approx((b1 + b2) / 2, rel=1e-6)


def test_frames_at_the_smallest_step_stay_put_while_the_others_take_half_steps():
    seen = []

    class Recorder(LinearPredictor):
        def forward(self, z, tau, d, actions):
            seen.append((z.clone(), tau.clone(), d.clone()))
            return super().forward(z, tau, d, actions)

    z = torch.randn(1, 2, 1, 1)
    tau, d = torch.tensor([[0.5, 0.25]]), torch.tensor([[0.125, 0.5]])  # frame 0 at 1/K_max, frame 1 at 1/2
    dv4.shortcut_targets(Recorder(), z, tau, d, torch.zeros(1, 2, 3))
    (z1, tau1, d1), (z2, tau2, d2) = seen
    torch.testing.assert_close(d1, torch.tensor([[0.125, 0.25]]))  # half steps for the frame that takes them
    torch.testing.assert_close(d2, d1)
    torch.testing.assert_close(tau2, torch.tensor([[0.5, 0.5]]))  # the context frame's tau unchanged
    torch.testing.assert_close(z2[:, 0], z1[:, 0])  # and its latents
    assert not torch.allclose(z2[:, 1], z1[:, 1])


def test_smallest_step_size_reduces_to_flow_matching(monkeypatch):
    dyn = small_dynamics()
    monkeypatch.setattr(dv4, "shortcut_targets", lambda *a: pytest.fail("no bootstrap at d = 1 / K_max"))
    torch.manual_seed(1)
    z1, noise = torch.rand(3, 4, 3, 4) * 2 - 1, torch.randn(3, 4, 3, 4)
    tau = torch.randint(0, 8, (3, 4)).float() / 8
    d = torch.full((3, 4), 1 / 8)
    actions, labels = torch.rand(3, 4, 3) * 2 - 1, torch.randint(0, 3, (3, 4))
    loss, parts = dv4.dynamics_loss(dyn, z1, actions, labels, noise, tau, d, reward_scale=0.0)
    pred, _ = dyn((1 - tau[..., None, None]) * noise + tau[..., None, None] * z1, tau, d, actions)
    expected = ((0.9 * tau + 0.1) * ((pred - z1) ** 2).mean((-1, -2))).mean()
    torch.testing.assert_close(loss, expected)
    assert parts["shortcut"] == pytest.approx(expected.item(), rel=1e-6)


def test_larger_step_sizes_regress_on_the_bootstrap_velocity():
    dyn = small_dynamics()
    torch.manual_seed(2)
    z1, noise = torch.rand(2, 3, 3, 4) * 2 - 1, torch.randn(2, 3, 3, 4)
    tau, d = torch.full((2, 3), 0.5), torch.full((2, 3), 0.25)
    actions, labels = torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.long)
    loss, _ = dv4.dynamics_loss(dyn, z1, actions, labels, noise, tau, d, reward_scale=0.0)
    z_noisy = 0.5 * noise + 0.5 * z1
    pred, _ = dyn(z_noisy, tau, d, actions)
    target = dv4.shortcut_targets(dyn, z_noisy, tau, d, actions)
    boot = 0.25 * (((pred - z_noisy) / 0.5 - target) ** 2).mean((-1, -2))  # (1 - tau)^2 ||v - target||^2
    torch.testing.assert_close(loss, ((0.9 * 0.5 + 0.1) * boot).mean())


def test_sample_shortcut_puts_tau_on_the_grid_of_its_step_size():
    tau, d = dv4.sample_shortcut((4000,), 8, 0.25, generator=torch.Generator().manual_seed(0))
    assert set(d.unique().tolist()) == {1.0, 0.5, 0.25, 0.125}
    assert torch.all(tau >= 0) and torch.all(tau <= 1 - d)
    assert torch.allclose(tau / d, torch.round(tau / d))
    assert (tau[d == 0.125] == 0.875).any(), "the smallest steps reach the context's noise level"
    assert 0.72 < (d == 0.125).float().mean() < 0.78  # 3 of 4 frames regress on the clean latents
    for step in (1.0, 0.5, 0.25):  # the others spread evenly over the larger step sizes
        assert 0.07 < (d == step).float().mean() < 0.10
    _, d = dv4.sample_shortcut((100,), 1, 0.5)
    assert torch.all(d == 1.0), "K_max = 1: only flow matching"


def test_dynamics_is_block_causal():
    dyn = small_dynamics()
    torch.manual_seed(3)
    z, actions = torch.randn(2, 5, 3, 4), torch.rand(2, 5, 3) * 2 - 1
    tau, d = torch.full((2, 5), 0.5), torch.full((2, 5), 0.25)
    out, logits = dyn(z, tau, d, actions)
    z2, a2 = z.clone(), actions.clone()
    z2[:, 3:] += torch.randn_like(z2[:, 3:])
    a2[:, 3:] = -a2[:, 3:]
    out2, logits2 = dyn(z2, tau, d, a2)
    torch.testing.assert_close(out[:, :3], out2[:, :3])  # frame t never sees t + 1
    torch.testing.assert_close(logits[:, :3], logits2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])
    z3 = z.clone()
    z3[:, 1] += 1.0
    assert not torch.allclose(dyn(z3, tau, d, actions)[0][:, 2], out[:, 2]), "later frames do see earlier ones"


def test_kv_cache_gives_the_same_outputs_as_recomputation():
    dyn = small_dynamics()
    torch.manual_seed(4)
    T = 6
    z, actions = torch.randn(2, T, 3, 4), torch.rand(2, T, 3) * 2 - 1
    tau, d = torch.full((2, T), 0.875), torch.full((2, T), 0.125)
    full, full_logits = dyn(z, tau, d, actions)
    cache = dv4.KVCache(2, max_frames=T)
    for t in range(T):
        out, logits = dyn(z[:, t:t + 1], tau[:, t:t + 1], d[:, t:t + 1], actions[:, t:t + 1], cache=cache)
        torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, 0], full_logits[:, t], atol=1e-5, rtol=1e-5)
    assert cache.frames == T and cache.length == T
    # a read-only pass (write=False) leaves the cache as it was
    dyn(z[:, :1], tau[:, :1], d[:, :1], actions[:, :1], cache=cache, write=False)
    assert cache.frames == T and cache.length == T
    # a sliding window of 3 frames: every frame, in every layer, sees itself and the 3 before it (the oldest keys
    # dropped keep what they saw when written; rotary positions are relative, so absolute positions do not matter)
    window = dv4.KVCache(2, max_frames=3)
    banded, _ = dyn(z, tau, d, actions, window=3)
    assert not torch.allclose(banded[:, -1], full[:, -1])
    for t in range(T):
        out, _ = dyn(z[:, t:t + 1], tau[:, t:t + 1], d[:, t:t + 1], actions[:, t:t + 1], cache=window)
        torch.testing.assert_close(out[:, 0], banded[:, t], atol=1e-5, rtol=1e-5)
    assert window.frames == 3 and window.length == T


def test_cache_repeat_gives_each_candidate_its_rollouts_past():
    dyn = small_dynamics()
    torch.manual_seed(5)
    z, actions = torch.randn(2, 4, 3, 4), torch.rand(2, 4, 3) * 2 - 1
    cache = dv4.KVCache(2, 8)
    dv4.observe(dyn, cache, z, actions, 0.1)
    big = cache.repeat(3, dyn.n_tokens)
    nxt = torch.randn(6, 1, 3, 4)
    tau, d = torch.full((6, 1), 0.5), torch.full((6, 1), 0.5)
    a = torch.rand(6, 1, 3)
    out, _ = dyn(nxt, tau, d, a, cache=big, write=False)
    for b in range(2):
        single = cache.repeat(1, dyn.n_tokens)
        ref, _ = dyn(nxt[3 * b:3 * b + 3], tau[:3], d[:3], a[3 * b:3 * b + 3],
                     cache=_select(single, b, 3, dyn.n_tokens), write=False)
        torch.testing.assert_close(out[3 * b:3 * b + 3], ref, atol=1e-5, rtol=1e-5)


def _select(cache, b, n, slots):
    """The cache of rollout b alone, repeated n times."""
    out = dv4.KVCache(len(cache.k), cache.max_frames)
    pick = lambda t: t.unflatten(0, (-1, slots))[b:b + 1].repeat_interleave(n, 0).flatten(0, 1)
    pasts = [cache.past(i) for i in range(len(cache.k))]
    out.k, out.v = [pick(k) for k, _ in pasts], [pick(v) for _, v in pasts]
    out.frames, out.length = cache.frames, cache.length
    return out


def test_generate_denoises_in_the_given_steps_and_writes_one_frame():
    dyn = small_dynamics()
    cache = dv4.KVCache(2, 8)
    dv4.observe(dyn, cache, torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 3), 0.1)
    calls = []
    original = dyn.forward
    dyn.forward = lambda *a, **k: calls.append(k.get("write", True)) or original(*a, **k)
    z, logits = dv4.generate(dyn, cache, torch.zeros(2, 3), 4, 0.1)
    assert z.shape == (2, 1, 3, 4) and logits.shape == (2, 1, 3)
    assert calls == [False] * 4 + [True] and cache.frames == 4
    z, logits = dv4.generate(dyn, cache, None, 1, 0.1, chunk_actions=torch.zeros(2, 3, 3))  # chunk mode, 1 step
    assert z.shape == (2, 3, 3, 4) and cache.frames == 7


def test_tokenizer_masks_and_loss_falls_on_a_tiny_dataset(play_data):
    data = envs.load_dataset(play_data)
    frames = dv4.to_float(torch.as_tensor(np.stack([envs.resize_frame(o, 32) for o in data["obs"][:64]]))
                          .permute(0, 3, 1, 2))
    torch.manual_seed(0)
    tok = dv4.Tokenizer(32, 8, dim=32, layers=1, heads=2, latents=4, bottleneck=4)
    z = tok.encode(frames[:2])
    assert z.shape == (2, 4, 4) and z.abs().max() < 1  # tanh bottleneck
    # each frame is encoded on its own: another frame in the batch changes nothing
    other = frames[:2].clone()
    other[1] = frames[5]
    torch.testing.assert_close(tok.encode(other)[0], z[0])
    drop = dv4.draw_masks(1000, 16, 0.9, generator=torch.Generator().manual_seed(0))
    assert 0.35 < drop.float().mean() < 0.55  # E[p] = 0.45
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        batch = frames[torch.randint(64, (16,))]
        loss = dv4.tokenizer_loss(tok, batch, dv4.draw_masks(16, 16, 0.9))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_reward_head_learns_the_labels():
    torch.manual_seed(0)
    dyn = dv4.Dynamics(latents=3, bottleneck=4, dim=32, layers=2, heads=2, registers=1, max_shortcut=4)
    opt = torch.optim.Adam(dyn.parameters(), lr=3e-3)

    def batch(n=16):
        z1 = torch.randint(0, 2, (n, 4, 3, 4)).float() * 2 - 1
        labels = (z1[:, :, 0, 0] > 0).long() + (z1[:, :, 1, 1] > 0).long()  # 0, 1 or 2 from the frame's latents
        tau, d = dv4.sample_shortcut((n, 4), 4, 0.5)
        return z1, labels, tau, d

    for _ in range(300):
        z1, labels, tau, d = batch()
        loss, _ = dv4.dynamics_loss(dyn, z1, torch.zeros(16, 4, 3), labels, torch.randn_like(z1), tau, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z1, labels, _, _ = batch(64)
    tau = torch.full((64, 4), 0.75)  # 1 - context noise on the grid of K_max = 4, as generation reads the head
    _, logits = dyn((1 - 0.75) * torch.randn_like(z1) + 0.75 * z1, tau, torch.full_like(tau, 0.25),
                    torch.zeros(64, 4, 3))
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    majority = torch.bincount(labels.flatten()).max().item() / labels.numel()
    assert accuracy > 0.85 and accuracy > majority + 0.3
    # the expected reward is sum_label p(label) x the simulator's reward of that label
    one_hot = torch.tensor([[0.0, 50.0, 0.0], [0.0, 0.0, 50.0]])
    torch.testing.assert_close(dv4.expected_reward(one_hot), torch.tensor([1.0, 10.0]))


def test_label_weights_balance_rare_labels_and_weight_the_cross_entropy():
    labels = torch.tensor([0] * 80 + [1] * 16 + [2] * 4)
    assert torch.allclose(dv4.label_weights(labels, 0.0), torch.ones(3))
    w = dv4.label_weights(labels, 1.0)  # equal total weight per label, mean weight 1 over the frames
    assert torch.allclose(w * torch.tensor([0.80, 0.16, 0.04]), torch.full((3,), 1 / 3))
    w = dv4.label_weights(labels, 0.5)
    assert torch.allclose(w[1] / w[0], torch.tensor(5.0**0.5)) and torch.isclose((w * torch.tensor([.8, .16, .04])).sum(),
                                                                                torch.tensor(1.0))
    assert dv4.label_weights(torch.tensor([0, 0, 1]), 0.5)[2] == 0  # an absent label
    # in the loss, a frame's cross-entropy counts its label's weight: zeroing "other" leaves the other labels' terms
    torch.manual_seed(0)
    dyn = dv4.Dynamics(latents=3, bottleneck=4, dim=16, layers=1, heads=2, registers=1, max_shortcut=4)
    z1, labels = torch.randn(2, 4, 3, 4), torch.tensor([[0, 1, 0, 2], [1, 0, 0, 0]])
    tau, d = torch.full((2, 4), 0.5), torch.full((2, 4), 0.25)
    args = (dyn, z1, torch.zeros(2, 4, 3), labels, torch.randn_like(z1), tau, d)
    _, plain = dv4.dynamics_loss(*args)
    _, weighted = dv4.dynamics_loss(*args, class_weights=torch.tensor([0.0, 1.0, 1.0]))
    _, logits = dyn((1 - 0.5) * args[4] + 0.5 * z1, tau, d, args[2])
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    assert abs(plain["reward_ce"] - (0.5 * ce).mean().item()) < 1e-5
    assert abs(weighted["reward_ce"] - (0.5 * ce * (labels.flatten() > 0)).mean().item()) < 1e-5


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
import dmo_sapo_dreamerv4 as dv4
torch.set_num_threads(1)
args = dv4.Args(cuda=False)
device = dv4.init_distributed(args)
rank, world = dv4.DIST["rank"], dv4.DIST["world"]
batch = torch.load({batch!r})
torch.manual_seed(0)
dyn = dv4.Dynamics(latents=3, bottleneck=4, dim=32, layers=2, heads=2, registers=1, max_shortcut=4)
model = torch.nn.parallel.DistributedDataParallel(dyn) if world > 1 else dyn
opt = torch.optim.SGD(dyn.parameters(), lr=0.1)  # the step is the (clipped) gradient itself
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
part = slice(rank * len(batch["z1"]) // world, (rank + 1) * len(batch["z1"]) // world)
loss, _ = dv4.dynamics_loss(model, *(batch[k][part] for k in ("z1", "actions", "labels", "noise", "tau", "d")))
dv4.optimizer_step(dyn, opt, sched, loss)
if rank == 0:
    torch.save(dyn.state_dict(), {out!r})
"""


def test_two_process_ddp_step_equals_the_single_process_step(tmp_path, play_data):
    torch.manual_seed(0)
    B, T = 4, 3
    tau, d = dv4.sample_shortcut((B, T), 4, 0.5)
    batch = {"z1": torch.rand(B, T, 3, 4) * 2 - 1, "actions": torch.rand(B, T, 3), "labels": torch.randint(0, 3, (B, T)),
             "noise": torch.randn(B, T, 3, 4), "tau": tau, "d": d}
    torch.save(batch, tmp_path / "batch.pt")
    script, out = tmp_path / "step.py", tmp_path / "after.pt"
    script.write_text(DDP_SCRIPT.format(root=ROOT, batch=str(tmp_path / "batch.pt"), out=str(out)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(out)
    # the same step in this one process, on the whole batch
    torch.manual_seed(0)
    dyn = dv4.Dynamics(latents=3, bottleneck=4, dim=32, layers=2, heads=2, registers=1, max_shortcut=4)
    initial = {k: v.clone() for k, v in dyn.state_dict().items()}
    opt = torch.optim.SGD(dyn.parameters(), lr=0.1)
    loss, _ = dv4.dynamics_loss(dyn, *(batch[k] for k in ("z1", "actions", "labels", "noise", "tau", "d")))
    dv4.optimizer_step(dyn, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), loss)
    moved = 0
    for k, v in dyn.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=1e-6, rtol=1e-4)
        moved += not torch.equal(v, initial[k])
    assert moved > 10, "the step changed the weights"
    # the script itself trains its world models under torchrun: 2 processes, one run directory, checkpoints by rank 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(30500 + os.getpid() % 1000), "dmo_sapo_dreamerv4.py", "--preset", "tiny", "--runs-dir",
                        str(tmp_path / "runs"), "--data-path", play_data, "--stop-after", "dynamics"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "tokenizer.pt").exists() and (run_dir / "dynamics.pt").exists()
    assert "training 0.04M parameters for 20 steps on 2 processes" in r.stdout
    assert r.stdout.count("stopped after the dynamics") == 1


def test_tiny_preset_runs_the_pipeline_and_cem_mpc(play_data, tmp_path):
    r = run_script("--preset", "tiny", "--runs-dir", str(tmp_path), "--data-path", play_data)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    result = json.loads((run_dir / "eval.json").read_text())
    for key in ("env_id", "episodes", "successes", "success_rate", "mean_return", "global_step", "wall_time_s",
                "steps_to_success_mean", "steps_to_success_std", "straightness_mean", "straightness_std",
                "curvature_mean", "curvature_std", "mean_final_cube_to_net_m", "ms_per_action"):
        assert key in result, key
    assert result["episodes"] == 2 and result["global_step"] == 4 * 4 * 4 and result["mode"] == "dmo-sapo"
    assert result["frames_generated_per_action"] == 0
    for name in ("tokenizer.pt", "dynamics.pt", "rssm.pt", "agent.pt", "imagined_vs_real.mp4", "eval_episode_0.mp4"):
        assert (run_dir / name).exists(), name
    stages = [line.split(" |")[0] for line in r.stdout.splitlines() if line.startswith("stage ")]
    assert stages == ["stage 1 of 6: play data", "stage 2 of 6: tokenizer", "stage 3 of 6: dynamics",
                      "stage 4 of 6: RSSM pretraining", "stage 5 of 6: DMO-SAPO",
                      "stage 6 of 6: evaluation in the simulator"]
    assert "mean expected reward" in r.stdout and "recall" in r.stdout and "open-loop error over 16 steps" in r.stdout
    before = {name: (run_dir / name).read_bytes() for name in ("tokenizer.pt", "dynamics.pt", "agent.pt")}
    # CEM-MPC with the run's world model: its own eval file, the policy's eval.json kept, no stage trained again
    r = run_script("--resume", str(run_dir), "--mode", "cem-mpc")
    assert r.returncode == 0, r.stderr[-2000:]
    cem = json.loads((run_dir / "eval_cem_mpc.json").read_text())
    assert cem["mode"] == "cem-mpc" and cem["episodes"] == 2 and cem["global_step"] == 0
    # from the easier start distribution (the default): the cube before the net, at most 1.8 m from it; 10 steps of
    # a barely trained policy or planner move it little
    assert [len(x["success_by_episode"]) for x in (result, cem)] == [2, 2]  # per seed, for paired comparisons
    assert sum(result["success_by_episode"]) == result["successes"] and sum(cem["success_by_episode"]) == cem["successes"]
    assert result["start"] == cem["start"] == "near" and max(result["mean_final_cube_to_net_m"],
                                                             cem["mean_final_cube_to_net_m"]) < 2.1
    assert cem["frames_generated_per_action"] == 8 * 2 and cem["ms_per_action"] > 0
    assert json.loads((run_dir / "eval.json").read_text()) == result
    assert all((run_dir / name).read_bytes() == b for name, b in before.items())
    assert json.loads((run_dir / "args.json").read_text())["mode"] == "dmo-sapo", "the run stays what it was"
    # the other low-level controller (Fig. 12): the same policy, its own file
    r = run_script("--resume", str(run_dir), "--eval-controller", "alt")
    assert r.returncode == 0, r.stderr[-2000:]
    alt = json.loads((run_dir / "eval_alt_controller.json").read_text())
    assert alt["controller"] == "alt" and json.loads((run_dir / "eval.json").read_text()) == result


def test_the_near_start_has_its_own_play_data_file():
    full, near = dv4.Args(data_dir="d", start="full"), dv4.Args(data_dir="d")
    assert dv4.play_data_path(full) == os.path.join("d", "EgoPushCube-v0_play_30000.npz")
    assert dv4.play_data_path(near) == os.path.join("d", "EgoPushCube-v0_near_play_30000.npz")
    after = dv4.Args(data_dir="d", play_after_success=8)
    assert dv4.play_data_path(after) == os.path.join("d", "EgoPushCube-v0_near_after8_play_30000.npz")
    assert dv4.parse_args(["--preset", "paper"]).start == "full" and dv4.parse_args([]).start == "near"


def test_stopped_run_resumes_and_no_diffusion_skips_the_world_model(play_data, tmp_path):
    r = run_script("--preset", "tiny", "--runs-dir", str(tmp_path / "a"), "--data-path", play_data,
                   "--stop-after", "dynamics", "--no-capture-video")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "a").iterdir()
    assert r.stdout.strip().splitlines()[-1] == ("stopped after the dynamics (--stop-after dynamics); continue with: "
                                                 f"python dmo_sapo_dreamerv4.py --resume {run_dir}")
    assert not (run_dir / "rssm.pt").exists()
    tokenizer = (run_dir / "tokenizer.pt").read_bytes()
    with SummaryWriter(str(run_dir)) as lost:  # what a killed process logged after the last checkpoint (step 20)
        lost.add_scalar("rssm/loss", 1.0, 21)
        lost.add_scalar("rssm/loss", 2.0, 500)
    r = run_script("--resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the tokenizer: loaded" in r.stdout and "the dynamics: loaded" in r.stdout
    assert (run_dir / "tokenizer.pt").read_bytes() == tokenizer and (run_dir / "eval.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("world_model/tokenizer_mse")] == list(range(20)), "finished stages kept"
    assert [e.value for e in events.Scalars("rssm/loss") if e.step in (21, 500)] == [], "the lost events purged"
    assert [e.step for e in events.Scalars("rssm/loss")] == list(range(20)), "the resumed stage logged anew"
    # a flag the run's checkpoints refuse: a one-line error before anything is rewritten
    args_json = (run_dir / "args.json").read_text()
    r = run_script("--resume", str(run_dir), "--dyn-dim", "64", timeout=60)
    assert r.returncode == 1 and "dynamics.pt: checkpoint has dyn_dim=32" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (run_dir / "args.json").read_text() == args_json
    # "No Diffusion": the RSSM generates the trajectories; no tokenizer or dynamics is trained
    r = run_script("--preset", "tiny", "--runs-dir", str(tmp_path / "b"), "--data-path", play_data,
                   "--forward-model", "rssm")
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "b").iterdir()
    assert not (run_dir / "dynamics.pt").exists() and (run_dir / "agent.pt").exists()
    assert "stage 4 of 4: evaluation in the simulator" in r.stdout


def test_bad_input_is_a_one_line_error(play_data, tmp_path, capsys):
    data = envs.load_dataset(play_data)
    del data["reward_label"]
    envs.save_dataset(str(tmp_path / "no_labels.npz"), data)
    runs = ["--preset", "tiny", "--runs-dir", str(tmp_path / "runs")]
    for flags, message in ((["--data-path", str(tmp_path / "no_labels.npz")], "key 'reward_label': missing"),
                           (["--dyn-sampling-steps", "3"], "dyn_sampling_steps (3) must be a power of 2"),
                           (["--cem-elites", "99"], "cem_elites (99) must be at most cem_candidates"),
                           (["--mode", "cem-mpc", "--forward-model", "rssm"], "needs --forward-model dreamerv4"),
                           (["--dyn-seq-len", "200"], "dyn_seq_len (200) must be at most dyn_max_context + 1"),
                           (["--tok-checkpoint", str(tmp_path / "missing.pt")], "missing.pt: cannot read checkpoint")):
        assert dv4.main(runs + ["--data-path", play_data] + flags) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not (tmp_path / "runs").exists()
